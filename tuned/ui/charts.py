"""Learning curves and best-so-far plots, as plain text for a terminal and as PNGs.

Two inputs: `history`, ``{trial: [metrics dict, ...]}`` (the scheduler's training history),
and `curves`, ``{trial: [xs, ys]}`` (the daemon's ``curves`` op). Every chart draws all the
trials it is given; the `highlight` best of them (by their last value, higher is better
for ``mode="max"``, lower for ``mode="min"``, unless a ranking is passed as `best`) stand
out with a mark or colour of their own and a legend entry, the others are dimmed and
counted. matplotlib is imported only inside the functions that draw PNGs; the text charts
and `best_so_far` need nothing beyond the standard library.
"""

from __future__ import annotations

import math
import string
from collections.abc import Mapping, Sequence
from typing import Any

from tuned.core.curves import (
    Curves,
    check_mode,
    curve_points,
    rank_trials,
)
from tuned.ui.render import clip

MAX_COLUMNS = 100
"""No line of a text chart is wider than this."""

HIGHLIGHT_MARKS = string.ascii_uppercase
"""The marks of the highlighted trials in a text chart, best first; at most 26 stand out."""

OTHER_MARK = "."
"""The mark of every trial that is not highlighted in a text chart."""

NO_REPORTS = "no reports yet"

_MATPLOTLIB_MISSING = "training curves need matplotlib: pip install 'tuned[plot]'"



# ---------------------------------------------------------------------------------------------
# Ranking


def _series(curves: Curves) -> dict[Any, tuple[list[float], list[float]]]:
    """``{trial: (xs, ys)}`` as floats; ValueError when a curve's xs and ys differ in length."""
    out = {}
    for number, (xs, ys) in curves.items():
        if len(xs) != len(ys):
            raise ValueError(f"trial {number}: {len(xs)} x values but {len(ys)} y values")
        out[number] = ([float(x) for x in xs], [float(y) for y in ys])
    return out


def _highlighted(series: Mapping[Any, tuple[list[float], list[float]]], mode: str,
                 best: Sequence[Any] | None, highlight: int) -> list[Any]:
    """The trials to highlight, best first: the first `highlight` of `best` (or of our own
    ranking) that have points in `series`."""
    if highlight < 0:
        raise ValueError(f"highlight must be >= 0, not {highlight}")
    check_mode(mode)
    if best is None:
        ranked = rank_trials({n: [xs, ys] for n, (xs, ys) in series.items()}, mode)
    else:
        seen: set[Any] = set()
        ranked = []
        for n in best:
            if n in series and series[n][0] and n not in seen:
                seen.add(n)
                ranked.append(n)
    return ranked[:highlight]


# ---------------------------------------------------------------------------------------------
# Text charts


def _pad(lo: float, hi: float, *, at_least: float = 0.0, row: int = 1,
         rows: int = 3) -> tuple[float, float]:
    """(lo, hi) unchanged when hi > lo; otherwise a range around the single value, 1% of it
    (at least `at_least`; 0.5 when the value is 0) on its wider side, so that the ends
    differ and the value falls on `row` of `rows` equal steps from the top."""
    if hi > lo:
        return lo, hi
    pad = max(abs(lo) * 0.01, at_least)
    if not lo - pad < lo < lo + pad:  # 0, or too small to move lo
        pad = 0.5
    above, below = row, rows - 1 - row
    return lo - pad * below / max(above, below), hi + pad * above / max(above, below)


def _precision(lo: float, hi: float) -> int:
    """The fewest significant digits, 5 or more, that tell lo and hi apart."""
    for p in range(5, 18):
        if f"{lo:.{p}g}" != f"{hi:.{p}g}":
            return p
    return 17


class _Canvas:
    """A character grid over the ranges of the xs and ys it is given, with y labels on the
    left (top, middle, bottom rows) and x labels under it; the width shrinks so that no
    rendered line is wider than MAX_COLUMNS.

    A single x is padded to at least +-0.5 (x 1 -> [0.5, 1.5]); a single y by 1% of it, so
    that it lies on the middle row and reads as the middle label."""

    def __init__(self, xs: Sequence[float], ys: Sequence[float], width: int,
                 height: int) -> None:
        if width < 2 or height < 2:
            raise ValueError(f"a chart needs width and height >= 2, not {width}x{height}")
        middle = (height - 1) // 2
        self.x_lo, self.x_hi = _pad(min(xs), max(xs), at_least=0.5)
        self.y_lo, self.y_hi = _pad(min(ys), max(ys), row=middle, rows=height)
        p = _precision(self.y_lo, self.y_hi)
        mid = self.y_hi - middle / (height - 1) * (self.y_hi - self.y_lo)
        self.y_labels = {0: f"{self.y_hi:.{p}g}", middle: f"{mid:.{p}g}",
                         height - 1: f"{self.y_lo:.{p}g}"}
        self.label_width = max(len(s) for s in self.y_labels.values())
        self.width = max(2, min(width, MAX_COLUMNS - self.label_width - 2))
        self.height = height
        self.cells = [[" "] * self.width for _ in range(height)]

    def cell(self, x: float, y: float) -> tuple[int, int]:
        """(row, col) of a point; points outside the ranges land on the border."""
        col = round((x - self.x_lo) / (self.x_hi - self.x_lo) * (self.width - 1))
        row = round((self.y_hi - y) / (self.y_hi - self.y_lo) * (self.height - 1))
        return min(max(row, 0), self.height - 1), min(max(col, 0), self.width - 1)

    def put(self, cell: tuple[int, int], mark: str) -> None:
        self.cells[cell[0]][cell[1]] = mark

    def line(self, a: tuple[int, int], b: tuple[int, int], mark: str) -> None:
        """Every cell on the straight line from cell `a` to cell `b`, both included."""
        steps = max(abs(b[0] - a[0]), abs(b[1] - a[1]))
        for k in range(steps + 1):
            t = k / steps if steps else 0.0
            self.put((round(a[0] + (b[0] - a[0]) * t), round(a[1] + (b[1] - a[1]) * t)), mark)

    def render(self, x_name: str) -> list[str]:
        lw = self.label_width
        lines = [f"{self.y_labels.get(i, ''):>{lw}} |" + "".join(row).rstrip()
                 for i, row in enumerate(self.cells)]
        lines.append(" " * lw + " +" + "-" * self.width)
        p = _precision(self.x_lo, self.x_hi)
        left, right = f"{self.x_lo:.{p}g}", f"{self.x_hi:.{p}g}"
        room = self.width - len(left) - len(right)
        name = x_name[:max(room - 2, 0)]
        lines.append((" " * (lw + 2) + left + f"{name:^{max(room, 0)}}" + right)[:MAX_COLUMNS])
        return lines


def _trials(n: int) -> str:
    return f"{n} trial" if n == 1 else f"{n} trials"


def text_chart(curves: Curves, metric: str, time_attr: str | None, width: int = 60,
               height: int = 15, *, best: Sequence[Any] | None = None, mode: str = "max",
               highlight: int = 5) -> str:
    """A plain-ASCII chart of every curve of `curves` (``{trial: [xs, ys]}``) for a terminal.

    Layout, every line at most MAX_COLUMNS (100) wide (`width` shrinks to fit the y labels):
    a header ``"<metric> (<mode>), N trials"``; the grid, its y labels at the top, middle
    and bottom rows, its x labels (lowest, `time_attr` or "report", highest) under it; then
    the legend, one line ``"A trial 45  0.99996 at 10"`` per highlighted trial (its last
    value at its last x, 5 significant digits) and ``". 15 other trials"`` when there are
    others.

    The highlighted trials are the first `highlight` (at most 26) of `best`, a list of trial
    numbers best first, or, when `best` is None, the trials with the best last values
    (``mode="max"``: highest first; "min": lowest first). Each is drawn as a line joining its
    points with its own mark, ``A`` the best, ``B`` the next, ...; the other trials are drawn
    as their points only, with ``.``. Highlighted marks are drawn after the others, the best
    last, so the better trial wins a shared cell. Non-finite values are not drawn.

    A range with a single value (one report per trial, a constant metric) is padded so
    that its two labels differ: x 1 is drawn over [0.5, 1.5]; a constant y lies on the
    middle row, which is labelled with it.

    Returns ``"no reports yet"`` when there is no finite point. Raises ValueError for a
    `mode` other than "max"/"min", a negative `highlight`, `width` or `height` under 2, or
    a curve whose xs and ys differ in length.
    """
    series = _series(curves)
    chosen = _highlighted(series, mode, best, min(highlight, len(HIGHLIGHT_MARKS)))
    finite = [(x, y) for xs, ys in series.values() for x, y in zip(xs, ys, strict=True)
              if math.isfinite(x) and math.isfinite(y)]
    if not finite:
        return NO_REPORTS
    canvas = _Canvas([p[0] for p in finite], [p[1] for p in finite], width, height)

    def cells(number: Any) -> list[tuple[int, int]]:
        xs, ys = series[number]
        return [canvas.cell(x, y) for x, y in zip(xs, ys, strict=True)
                if math.isfinite(x) and math.isfinite(y)]

    others = [n for n in series if n not in chosen]
    for number in others:
        for c in cells(number):
            canvas.put(c, OTHER_MARK)
    for rank in reversed(range(len(chosen))):
        mark, points = HIGHLIGHT_MARKS[rank], cells(chosen[rank])
        for a, b in zip(points, points[1:], strict=False):
            canvas.line(a, b, mark)
        for c in points:
            canvas.put(c, mark)

    lines = [clip(f"{metric} ({mode}), {_trials(len(series))}")]
    lines += canvas.render(time_attr or "report")
    number_width = max((len(str(n)) for n in chosen), default=0)
    for rank, number in enumerate(chosen):
        xs, ys = series[number]
        lines.append(clip(f"{HIGHLIGHT_MARKS[rank]} trial {number!s:<{number_width}}  "
                           f"{ys[-1]:.5g} at {xs[-1]:.5g}"))
    if others:
        lines.append(f"{OTHER_MARK} {len(others)} other " + _trials(len(others)).split()[1])
    return "\n".join(lines)


STEP_MARK, RUN_MARK, RISE_MARK = "*", "-", "|"
"""Best-so-far text charts: ``*`` where the best improves, ``-`` along x while it holds,
``|`` up or down to the next improvement, so the line reads as a staircase."""


def _staircase(xs: Sequence[float], ys: Sequence[float], header: str, x_name: str,
               reached: str, width: int, height: int) -> list[str]:
    """One best-so-far chart; `reached` formats the x of the last improvement."""
    if len(xs) != len(ys):
        raise ValueError(f"{len(xs)} x values but {len(ys)} y values")
    pairs = [(float(x), float(y)) for x, y in zip(xs, ys, strict=True)
             if math.isfinite(x) and math.isfinite(y)]
    if not pairs:
        return [clip(header), NO_REPORTS]
    xs, ys = [p[0] for p in pairs], [p[1] for p in pairs]
    canvas = _Canvas(xs, ys, width, height)
    cells = [canvas.cell(x, y) for x, y in zip(xs, ys, strict=True)]
    for i in range(1, len(cells)):
        (r0, c0), (r1, c1) = cells[i - 1], cells[i]
        for c in range(c0 + 1, c1 + 1):
            canvas.put((r0, c), RUN_MARK)
        step = 1 if r1 > r0 else -1
        for r in range(r0 + step, r1, step) if r1 != r0 else ():
            canvas.put((r, c1), RISE_MARK)
    for i, c in enumerate(cells):
        if i == 0 or ys[i] != ys[i - 1]:
            canvas.put(c, STEP_MARK)
    last_step = max(i for i in range(len(ys)) if i == 0 or ys[i] != ys[i - 1])
    return ([clip(header)] + canvas.render(x_name)
            + [clip(f"best {ys[-1]:.5g}, reached {reached.format(xs[last_step])}")])


def best_so_far_chart(by_trial: Sequence[Sequence[float]], by_time: Sequence[Sequence[float]],
                      metric: str, mode: str, width: int = 60, height: int = 10) -> str:
    """Two plain-ASCII step charts of the best value so far, one above the other: against
    the trial number (`by_trial`) and against seconds since the first trial (`by_time`),
    each ``[xs, ys]`` as `best_so_far` returns it (xs are drawn as given).

    Each chart: a header ``"best <metric> (<mode>) against trials"`` (``... against time
    (s)``), the grid with its y and x labels, then ``"best V, reached at trial N"``
    (``... reached after S s``). Non-finite points are left out. The line is
    a staircase: ``*`` at each improvement, ``-`` along x while the best holds, ``|`` up
    (or down, for "min") to the next improvement. A single point is drawn in a padded range;
    an empty chart reads ``"no reports yet"`` under its header, and when both are empty
    the whole result is ``"no reports yet"``. Every line is at most 100 columns.

    Raises ValueError for a `mode` other than "max"/"min", `width` or `height` under 2, or xs
    and ys of different lengths.
    """
    check_mode(mode)
    (trial_xs, trial_ys), (time_xs, time_ys) = by_trial, by_time
    if not trial_xs and not time_xs:
        return NO_REPORTS
    top = _staircase(trial_xs, trial_ys, f"best {metric} ({mode}) against trials", "trial",
                     "at trial {:.5g}", width, height)
    bottom = _staircase(time_xs, time_ys, f"best {metric} ({mode}) against time (s)",
                        "seconds since the first trial", "after {:.5g} s", width, height)
    return "\n".join(top + [""] + bottom)


# ---------------------------------------------------------------------------------------------
# PNGs (matplotlib imported here only)


def _new_figure(figsize: tuple[float, float], plot: bool = False) -> Any:
    """A matplotlib Figure with an Agg canvas (no pyplot, no global backend change), or a
    pyplot figure when it is to be shown. RuntimeError when matplotlib is missing."""
    try:
        if plot:
            import matplotlib.pyplot as plt

            return plt.figure(figsize=figsize)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise RuntimeError(_MATPLOTLIB_MISSING) from exc
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _finish(fig: Any, filename: str | None, plot: bool = False) -> None:
    """Save `fig` to `filename` (PNG, legend included), show it when `plot`, release it."""
    try:
        if filename:
            fig.savefig(filename, dpi=100, bbox_inches="tight")
        if plot:
            import matplotlib.pyplot as plt

            plt.show()
    finally:
        if plot:
            import matplotlib.pyplot as plt

            plt.close(fig)


def _curves_figure(series: Mapping[Any, tuple[list[float], list[float]]], metric: str,
                   time_attr: str | None, *, mode: str = "max", highlight: int = 5,
                   best: Sequence[Any] | None = None, title: str | None = None,
                   use_legend: bool = True, plot: bool = False) -> Any:
    """The learning-curves Figure (see `draw_training_curves`), for saving or inspecting."""
    chosen = _highlighted(series, mode, best, highlight)
    fig = _new_figure((9.0, 5.0), plot)
    ax = fig.add_subplot()
    for number, (xs, ys) in series.items():
        if xs and number not in chosen:
            ax.plot(xs, ys, color="0.78", linewidth=0.7, zorder=1,
                    marker="o" if len(xs) == 1 else None, markersize=3, label="_nolegend_")
    handles = []
    for rank, number in enumerate(chosen):
        xs, ys = series[number]
        (line,) = ax.plot(xs, ys, color=f"C{rank % 10}", linewidth=1.8,
                          zorder=2 + len(chosen) - rank, marker="o" if len(xs) < 3 else None,
                          markersize=5, label=f"trial {number} ({ys[-1]:.5g})")
        handles.append(line)
    if not any(xs for xs, _ys in series.values()):
        ax.text(0.5, 0.5, NO_REPORTS, ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(time_attr or "report")
    ax.set_ylabel(metric)
    ax.set_title(title if title is not None else
                 f"{metric} ({mode}) against {time_attr or 'report'}: {_trials(len(series))}")
    ax.grid(True, alpha=0.3)
    if use_legend and handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                  borderaxespad=0.0, fontsize="small",
                  title=f"best {len(handles)} of {_trials(len(series))}")
        fig.subplots_adjust(right=0.74)  # room for the legend in a window too
    return fig


def draw_training_curves(history: dict[int, list[dict[str, Any]]], reward_attr: str,
                         time_attr: str | None, filename: str | None = None,
                         plot: bool = False, use_legend: bool = True, *, mode: str = "max",
                         highlight: int = 5, title: str | None = None,
                         best: Sequence[Any] | None = None) -> None:
    """Plot every trial's `reward_attr` against `time_attr` (report number when None);
    save a PNG to `filename` when given, show it when `plot`.

    The `highlight` best trials (the first of `best`, trial numbers best first, or, when
    None, the best last values for `mode`) are drawn in colour, the best on top, each with
    a legend entry ``"trial N (value)"``; the others thin and light grey, without one. The
    legend, drawn when `use_legend`, lies outside the axes on the right, never over the
    curves. Title (default ``"<reward_attr> (<mode>) against <time_attr>: N trials"``) and
    axis labels. A curve of one or two points also gets markers, so it is visible.

    Raises RuntimeError saying how to install matplotlib when it is missing, ValueError for
    a `mode` other than "max"/"min" or a negative `highlight`.
    """
    series = {n: curve_points(reports, reward_attr, time_attr) for n, reports in history.items()}
    fig = _curves_figure(series, reward_attr, time_attr, mode=mode, highlight=highlight,
                         best=best, title=title, use_legend=use_legend, plot=plot)
    _finish(fig, filename, plot)


def draw_curves_png(curves: Curves, metric: str, time_attr: str | None, filename: str, *,
                    mode: str = "max", title: str | None = None, highlight: int = 5,
                    best: Sequence[Any] | None = None) -> None:
    """Save curves given as ``{trial: [xs, ys]}`` to a PNG: the figure of
    `draw_training_curves` (the best `highlight` in colour with a legend outside the axes,
    the others grey, a title).

    Raises RuntimeError when matplotlib is missing, ValueError as `draw_training_curves`
    does or when a curve's xs and ys differ in length.
    """
    fig = _curves_figure(_series(curves), metric, time_attr, mode=mode, highlight=highlight,
                         best=best, title=title)
    _finish(fig, filename)


def _best_so_far_figure(by_trial: Sequence[Sequence[float]],
                        by_time: Sequence[Sequence[float]], metric: str, mode: str,
                        title: str | None = None) -> Any:
    """The best-so-far Figure (see `draw_best_so_far_png`), for saving or inspecting."""
    check_mode(mode)
    fig = _new_figure((11.0, 4.5))
    panels = ((by_trial, "trials", "trial"), (by_time, "time (s)", "seconds since the first trial"))
    for i, ((xs, ys), against, x_label) in enumerate(panels, start=1):
        if len(xs) != len(ys):
            raise ValueError(f"{len(xs)} x values but {len(ys)} y values")
        ax = fig.add_subplot(1, 2, i)
        if xs:
            ax.plot(xs, ys, drawstyle="steps-post", color="C0", linewidth=1.8)
            steps = [k for k in range(len(ys)) if k == 0 or ys[k] != ys[k - 1]]
            ax.plot([xs[k] for k in steps], [ys[k] for k in steps], linestyle="none",
                    marker="o", markersize=4, color="C0")
        else:
            ax.text(0.5, 0.5, NO_REPORTS, ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"best {metric} ({mode}) against {against}")
        ax.set_xlabel(x_label)
        ax.set_ylabel(f"best {metric}")
        ax.grid(True, alpha=0.3)
    fig.suptitle(title if title is not None else f"best {metric} ({mode}) so far")
    fig.tight_layout()
    return fig


def draw_best_so_far_png(by_trial: Sequence[Sequence[float]], by_time: Sequence[Sequence[float]],
                         metric: str, mode: str, filename: str, title: str | None = None) -> None:
    """Save a PNG with two step plots side by side (``drawstyle="steps-post"``, a marker at
    each improvement): the best value so far against the trial number (`by_trial`) and
    against seconds since the first trial (`by_time`), each ``[xs, ys]`` as `best_so_far`
    returns it. Each subplot has a title and axis labels, the figure a title (default
    ``"best <metric> (<mode>) so far"``); an empty one reads "no reports yet".

    Raises RuntimeError when matplotlib is missing, ValueError for a `mode` other than
    "max"/"min" or xs and ys of different lengths.
    """
    _finish(_best_so_far_figure(by_trial, by_time, metric, mode, title), filename)
