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
