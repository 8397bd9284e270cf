"""Learning curves: each trial's reward against its time attribute, drawn with matplotlib."""

from __future__ import annotations

from typing import Any


def curve_points(reports: list[dict[str, Any]], reward_attr: str,
                 time_attr: str | None) -> tuple[list[float], list[float]]:
    """(times, rewards) of one trial; a report without `time_attr` counts as step 1, 2, ..."""
    xs, ys = [], []
    for i, metrics in enumerate(reports, start=1):
        if reward_attr not in metrics:
            continue
        t = metrics.get(time_attr, i) if time_attr else i
        xs.append(float(t))
        ys.append(float(metrics[reward_attr]))
    return xs, ys


def draw_training_curves(history: dict[int, list[dict[str, Any]]], reward_attr: str,
                         time_attr: str | None, filename: str | None = None,
                         plot: bool = False, use_legend: bool = True) -> None:
    """Plot every trial's curve; save to `filename` (PNG) and/or show it.

    Raises RuntimeError saying how to install matplotlib when it is missing.
    """
    try:
        import matplotlib

        if not plot:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError("training curves need matplotlib: pip install 'tuned[plot]'") from exc
    fig, ax = plt.subplots(figsize=(8, 5))
    for number, reports in history.items():
        xs, ys = curve_points(reports, reward_attr, time_attr)
        if xs:
            ax.plot(xs, ys, marker="." if len(xs) < 3 else None, label=f"trial {number}")
    ax.set_xlabel(time_attr or "report")
    ax.set_ylabel(reward_attr)
    ax.set_title(f"{reward_attr} against {time_attr or 'report'}")
    if use_legend and history:
        ax.legend(loc="best", fontsize="small", ncol=2)
    if filename:
        fig.savefig(filename, dpi=100, bbox_inches="tight")
    if plot:
        plt.show()
    plt.close(fig)


def draw_curves_png(curves: dict[int, list[list[float]]], metric: str, time_attr: str | None,
                    filename: str) -> None:
    """Save curves given as {trial: [xs, ys]} to a PNG."""
    history = {n: [{metric: y, **({time_attr: x} if time_attr else {})}
                   for x, y in zip(xs, ys, strict=True)] for n, (xs, ys) in curves.items()}
    draw_training_curves(history, metric, time_attr, filename=filename, use_legend=False)


def text_chart(curves: dict[int, list[list[float]]], metric: str, time_attr: str | None,
               width: int = 60, height: int = 15) -> str:
    """A plain-text chart of every curve: the best value seen at each cell, one char per
    trial (0-9, a-z cycling), for a terminal."""
    points = [(x, y, n) for n, (xs, ys) in curves.items() for x, y in zip(xs, ys, strict=True)]
    if not points:
        return "no reports yet"
    x_lo, x_hi = min(p[0] for p in points), max(p[0] for p in points)
    y_lo, y_hi = min(p[1] for p in points), max(p[1] for p in points)
    grid = [[" "] * width for _ in range(height)]
    marks = "0123456789abcdefghijklmnopqrstuvwxyz"
    for x, y, n in points:
        col = 0 if x_hi == x_lo else round((x - x_lo) / (x_hi - x_lo) * (width - 1))
        row = 0 if y_hi == y_lo else round((y_hi - y) / (y_hi - y_lo) * (height - 1))
        grid[row][col] = marks[n % len(marks)]
    lines = [f"{metric} ({len(curves)} trials)"]
    for i, row in enumerate(grid):
        label = f"{y_hi:9.4g} |" if i == 0 else (f"{y_lo:9.4g} |" if i == height - 1
                                                 else " " * 9 + " |")
        lines.append(label + "".join(row))
    lines.append(" " * 10 + "+" + "-" * width)
    lines.append(" " * 11 + f"{x_lo:<10g}{(time_attr or 'report'):^{width - 20}}{x_hi:>10g}")
    return "\n".join(lines)
