"""tuned.ui.charts: text charts, PNGs (real matplotlib, in tmp_path) and best-so-far."""

from __future__ import annotations

import math
import random
import re
import sys

import pytest

from tuned.core import curves as P
from tuned.ui import charts as C

PNG = b"\x89PNG\r\n\x1a\n"


def _curves(n: int = 20, seed: int = 0) -> dict[int, list[list[float]]]:
    """n trials of 1..10 reports; trial k's last value is k / 100 (so the order is known)."""
    rng = random.Random(seed)
    out = {}
    numbers = list(range(1, n + 1))
    rng.shuffle(numbers)  # insertion order must not matter
    for k in numbers:
        xs = list(range(1, rng.randint(1, 10) + 1))
        ys = [rng.random() for _ in xs[:-1]] + [k / 100]
        out[k] = [xs, ys]
    return out


def _legend(text: str) -> list[str]:
    return [line for line in text.splitlines() if re.match(r"^[A-Z] trial |^\. \d+ other", line)]


def _grid(text: str) -> list[str]:
    lines = text.splitlines()
    axis = next(i for i, line in enumerate(lines) if re.match(r"^ *\+-+$", line))
    return [line.split("|", 1)[1] for line in lines[1:axis]]


def _x_labels(text: str) -> list[str]:
    lines = text.splitlines()
    axis = next(i for i, line in enumerate(lines) if re.match(r"^ *\+-+$", line))
    return lines[axis + 1].split()


# --------------------------------------------------------------------------- text chart


@pytest.mark.parametrize("mode, top", [("max", [20, 19, 18, 17, 16]), ("min", [1, 2, 3, 4, 5])])
def test_text_chart_legend_names_the_best_in_order(mode, top):
    text = C.text_chart(_curves(), "accuracy", "epoch", mode=mode)
    assert text.splitlines()[0] == f"accuracy ({mode}), 20 trials"
    legend = _legend(text)
    assert [int(line.split()[2]) for line in legend[:5]] == top
    assert [line[0] for line in legend[:5]] == list("ABCDE")
    assert re.fullmatch(rf"A trial {top[0]} +{top[0] / 100:.5g} at \d+", legend[0])
    assert legend[5] == ". 15 other trials"
    assert len(legend) == 6


def test_text_chart_last_value_and_x_in_legend():
    curves = {45: [[1, 5, 10], [0.3, 0.9, 0.99996]], 7: [[1, 2], [0.1, 0.2]]}
    text = C.text_chart(curves, "accuracy", "epoch", highlight=1)
    assert "A trial 45  0.99996 at 10" in text.splitlines()
    assert ". 1 other trial" in text.splitlines()


def test_text_chart_highlight_and_best_list():
    curves = _curves()
    text = C.text_chart(curves, "accuracy", None, best=[3, 99, 1, 3], highlight=5)
    legend = _legend(text)
    # 99 is not a trial, the repeated 3 counts once; the rest are "others".
    assert [int(line.split()[2]) for line in legend[:-1]] == [3, 1]
    assert legend[-1] == ". 18 other trials"
    assert "B" in "".join(_grid(text)) and "C" not in "".join(_grid(text))
    none = C.text_chart(curves, "accuracy", None, highlight=0)
    assert _legend(none) == [". 20 other trials"]
    assert set("".join(_grid(none))) <= {" ", "."}


def test_text_chart_marks_in_grid():
    text = C.text_chart(_curves(), "accuracy", "epoch")
    cells = "".join(_grid(text))
    for mark in "ABCDE.":
        assert mark in cells
    assert set(cells) <= set("ABCDE. ")


def test_text_chart_best_trial_wins_a_shared_cell():
    # Every trial starts at (1, 0.5); trial 1 ends highest, trial 2 lowest.
    curves = {2: [[1, 2], [0.5, 0.2]], 3: [[1], [0.5]], 1: [[1, 2], [0.5, 1.0]]}

    def first_column(grid):
        return [row[0] for row in grid if row and row[0] != " "]

    for mode, best, worst in (("max", "A", "C"), ("min", "C", "A")):
        for highlight in (3, 1):
            grid = _grid(C.text_chart(curves, "acc", None, width=20, height=5, mode=mode,
                                      highlight=highlight))
            assert first_column(grid) == ["A"]  # over the others' marks, dimmed or not
            if highlight == 3:
                assert grid[0].rstrip().endswith(best)  # trial 1's end, at 1.0
                assert grid[-1].rstrip().endswith(worst)  # trial 2's end, at 0.2


def test_text_chart_lines_fit_in_100_columns():
    curves = {n: [[x * 1e6 for x in xs], [-y * 1.23456789e-7 for y in ys]]
              for n, (xs, ys) in _curves(40).items()}
    curves[10**12] = [[1.0000001e6, 1.0000002e6], [1.0000001, 1.0000002]]
    for width in (60, 95, 200):
        text = C.text_chart(curves, "a_rather_long_metric_name" * 5, "t" * 150, width=width,
                            best=[10**12])
        assert max(len(line) for line in text.splitlines()) <= 100
        assert "A trial 1000000000000" in text
    assert max(len(line) for line in C.text_chart(_curves(), "acc", "epoch").splitlines()) <= 80


def test_text_chart_one_report_per_trial_pads_x():
    curves = {n: [[1], [n / 10]] for n in range(1, 8)}
    text = C.text_chart(curves, "accuracy", None)
    labels = _x_labels(text)
    assert labels[0] != labels[-1]
    assert (labels[0], labels[-1]) == ("0.5", "1.5")
    assert "A" in "".join(_grid(text))


def test_text_chart_single_point_and_constant_metric():
    text = C.text_chart({1: [[3], [0.5]]}, "loss", "epoch", mode="min")
    assert text.splitlines()[0] == "loss (min), 1 trial"
    y_top, y_bottom = (line.split("|")[0].strip() for line in (text.splitlines()[1],
                                                               _row(text, -1)))
    assert y_top != y_bottom
    assert _x_labels(text)[0] != _x_labels(text)[-1]
    assert "".join(_grid(text)).strip() == "A"
    for height in (15, 6, 2):
        flat = C.text_chart({1: [[1, 2, 3], [0.0, 0.0, 0.0]]}, "loss", None, height=height)
        row = _row(flat, (height - 1) // 2)
        assert row.split("|")[0].strip() == "0"  # the middle label is the constant value
        assert row.split("|")[1] == "A" * 60


def _row(text: str, i: int) -> str:
    lines = text.splitlines()
    axis = next(k for k, line in enumerate(lines) if re.match(r"^ *\+-+$", line))
    return lines[1:axis][i]


def test_text_chart_no_reports():
    assert C.text_chart({}, "accuracy", "epoch") == "no reports yet"
    assert C.text_chart({1: [[], []]}, "accuracy", "epoch") == "no reports yet"
    assert C.text_chart({1: [[1], [math.nan]]}, "accuracy", "epoch") == "no reports yet"


def test_text_chart_nan_ranks_last_and_bad_arguments_raise():
    curves = {1: [[1, 2], [0.9, math.nan]], 2: [[1, 2], [0.1, 0.2]]}
    assert P.rank_trials(curves, "max") == [2, 1]
    assert P.rank_trials(curves, "min") == [2, 1]
    assert "A trial 2" in C.text_chart(curves, "acc", None)
    with pytest.raises(ValueError, match="mode"):
        C.text_chart(curves, "acc", None, mode="best")
    with pytest.raises(ValueError, match="highlight"):
        C.text_chart(curves, "acc", None, highlight=-1)
    with pytest.raises(ValueError):
        C.text_chart({1: [[1, 2], [0.5]]}, "acc", None)
    with pytest.raises(ValueError):
        C.text_chart(curves, "acc", None, width=1)


def test_text_chart_old_positional_signature():
    text = C.text_chart(_curves(), "accuracy", "epoch", 40, 8)
    assert len(_grid(text)) == 8
    assert max(len(line) for line in _grid(text)) <= 40


# --------------------------------------------------------------------------- PNGs


def _many(n: int = 100) -> dict[int, list[list[float]]]:
    rng = random.Random(1)
    out = {}
    for k in range(n):
        xs = [float(x) for x in range(1, rng.randint(1, 12) + 1)]
        out[k] = [xs, [rng.random() for _ in xs]]
    return out


def _inspect(fig, highlight):
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    (ax,) = fig.axes
    legend = ax.get_legend()
    assert legend is not None
    texts = [t.get_text() for t in legend.get_texts()]
    assert len(texts) == highlight
    assert all(re.fullmatch(r"trial \d+ \(.+\)", t) for t in texts)
    box, axes_box = legend.get_window_extent(renderer), ax.get_window_extent(renderer)
    assert box.x0 >= axes_box.x1  # right of the axes, never over the plot
    assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel()
    return ax, texts


@pytest.mark.parametrize("highlight", [5, 3])
def test_curves_png_of_100_trials(tmp_path, monkeypatch, highlight):
    curves = _many()
    figures = []
    finish = C._finish
    monkeypatch.setattr(C, "_finish", lambda fig, *a, **k: (figures.append(fig),
                                                           finish(fig, *a, **k)))
    out = tmp_path / "curves.png"
    C.draw_curves_png(curves, "accuracy", "epoch", str(out), highlight=highlight)
    assert out.read_bytes()[:8] == PNG
    ax, texts = _inspect(figures[0], highlight)
    top = P.rank_trials(curves, "max")[:highlight]
    assert texts == [f"trial {n} ({curves[n][1][-1]:.5g})" for n in top]
    assert ax.get_title() == "accuracy (max) against epoch: 100 trials"
    assert ax.get_xlabel() == "epoch" and ax.get_ylabel() == "accuracy"
    assert len(ax.get_lines()) == 100  # every curve drawn
    grey = [line for line in ax.get_lines() if line.get_label() == "_nolegend_"]
    assert len(grey) == 100 - highlight


def test_training_curves_png_of_100_trials(tmp_path, monkeypatch):
    rng = random.Random(2)
    history = {n: [{"loss": rng.random(), "epoch": e} for e in range(1, rng.randint(1, 9) + 1)]
               for n in range(100)}
    history[100] = [{"loss": -1.0, "epoch": 4}]  # a singleton, and the best for min
    figures = []
    finish = C._finish
    monkeypatch.setattr(C, "_finish", lambda fig, *a, **k: (figures.append(fig),
                                                           finish(fig, *a, **k)))
    out = tmp_path / "training.png"
    C.draw_training_curves(history, "loss", "epoch", str(out), False, True, mode="min",
                           title="my title")
    assert out.read_bytes()[:8] == PNG
    ax, texts = _inspect(figures[0], 5)
    assert texts[0] == "trial 100 (-1)"
    assert ax.get_title() == "my title"
    (single,) = [line for line in ax.get_lines() if line.get_label() == "trial 100 (-1)"]
    assert single.get_marker() not in (None, "None", "", " ")
    # use_legend=False (the examples) still draws every curve, but no legend.
    C.draw_training_curves(history, "loss", "epoch", str(tmp_path / "b.png"), use_legend=False)
    assert figures[1].axes[0].get_legend() is None
    assert len(figures[1].axes[0].get_lines()) == 101


def test_curves_figure_default_title_and_best_list():
    fig = C._curves_figure(C._series(_many(10)), "acc", None, best=[7, 2], highlight=5)
    ax, texts = _inspect(fig, 2)
    assert [t.split()[1] for t in texts] == ["7", "2"]
    assert ax.get_title() == "acc (max) against report: 10 trials"
    assert ax.get_xlabel() == "report"


def test_png_without_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg",
                 "matplotlib.pyplot"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(RuntimeError, match="pip install"):
        C.draw_curves_png({1: [[1], [1]]}, "acc", None, str(tmp_path / "x.png"))
    with pytest.raises(RuntimeError, match="pip install"):
        C.draw_best_so_far_png([[1], [1]], [[0], [1]], "acc", "max", str(tmp_path / "y.png"))


# --------------------------------------------------------------------------- best so far


def test_best_so_far_max_and_min():
    points = [(1, 0.5), (2, 0.4), (3, 0.7), (4, 0.7), (5, 0.6)]
    assert P.best_so_far(points, "max") == ([1, 3, 5], [0.5, 0.7, 0.7])
    assert P.best_so_far(points, "min") == ([1, 2, 5], [0.5, 0.4, 0.4])
    # The last point improves: it is not repeated.
    assert P.best_so_far([(1, 1), (2, 3)]) == ([1, 2], [1, 3])
    assert P.best_so_far([(1, 1), (2, 3)], "min") == ([1, 2], [1, 1])
    assert P.best_so_far([(4, 2.0)]) == ([4], [2])
    assert P.best_so_far([]) == ([], [])


def test_best_so_far_only_improvements_and_final_point():
    rng = random.Random(3)
    points = [(t, rng.random()) for t in range(200)]
    for mode, better in (("max", float.__gt__), ("min", float.__lt__)):
        xs, ys = P.best_so_far(points, mode)
        assert xs[-1] == 199
        assert all(better(b, a) for a, b in zip(ys[:-2], ys[1:-1], strict=True))
        assert ys[-1] == (max if mode == "max" else min)(v for _t, v in points)
        assert all(x0 < x1 for x0, x1 in zip(xs, xs[1:], strict=False))


def test_best_so_far_skips_nan_and_checks_arguments():
    assert P.best_so_far([(1, math.nan), (2, 0.3), (3, math.nan)]) == ([2, 3], [0.3, 0.3])
    assert P.best_so_far([(1, math.nan)]) == ([], [])
    with pytest.raises(ValueError, match="order"):
        P.best_so_far([(2, 1.0), (1, 2.0)])
    with pytest.raises(ValueError, match="mode"):
        P.best_so_far([(1, 1.0)], "maximum")


def _sections(text: str) -> list[str]:
    return text.split("\n\n")


def test_best_so_far_chart_many_points():
    rng = random.Random(4)
    points = [(t, rng.random()) for t in range(1, 101)]
    by_trial = P.best_so_far(points, "max")
    by_time = P.best_so_far([(t * 3.5, v) for t, v in points], "max")
    text = C.best_so_far_chart(by_trial, by_time, "accuracy", "max")
    assert max(len(line) for line in text.splitlines()) <= 100
    trials, times = _sections(text)
    assert trials.splitlines()[0] == "best accuracy (max) against trials"
    assert times.splitlines()[0] == "best accuracy (max) against time (s)"
    assert _x_labels(trials)[0] == "1" and _x_labels(trials)[-1] == "100"
    assert _x_labels(times)[-1] == "350"
    grid = _grid(trials)
    assert "".join(grid).count("*") <= len(by_trial[0])  # one per improvement, some may merge
    assert "-" in "".join(grid) and "|" in "".join(grid)
    # a staircase for max: the top row holds the final best, reaching the right edge
    assert grid[0].rstrip().endswith(("-", "*")) and len(grid[0].rstrip()) == 60
    xs, ys = by_trial
    reached = xs[-2] if len(ys) > 1 and ys[-1] == ys[-2] else xs[-1]
    assert trials.splitlines()[-1] == f"best {ys[-1]:.5g}, reached at trial {reached:.5g}"
    # for min, the final best is on the bottom row
    low = P.best_so_far(points, "min")
    grid = _grid(_sections(C.best_so_far_chart(low, low, "loss", "min"))[0])
    assert grid[-1].rstrip().endswith(("-", "*")) and len(grid[-1].rstrip()) == 60


def test_best_so_far_chart_single_point_and_empty():
    text = C.best_so_far_chart([[1], [0.5]], [[0.0], [0.5]], "accuracy", "max")
    for section in _sections(text):
        labels = _x_labels(section)
        assert labels[0] != labels[-1]
        assert "".join(_grid(section)).strip() == "*"
    assert C.best_so_far_chart([[], []], [[], []], "accuracy", "max") == "no reports yet"
    half = C.best_so_far_chart([[1], [0.5]], [[], []], "accuracy", "min")
    assert half.splitlines()[-2:] == ["best accuracy (min) against time (s)", "no reports yet"]
    with pytest.raises(ValueError, match="mode"):
        C.best_so_far_chart([[1], [0.5]], [[1], [0.5]], "accuracy", "up")


@pytest.mark.parametrize("n", [0, 1, 60])
def test_best_so_far_png(tmp_path, n):
    rng = random.Random(n)
    points = [(t, rng.random()) for t in range(1, n + 1)]
    by_trial = P.best_so_far(points, "min")
    by_time = P.best_so_far([(t * 2.0, v) for t, v in points], "min")
    out = tmp_path / "best.png"
    C.draw_best_so_far_png(by_trial, by_time, "loss", "min", str(out))
    assert out.read_bytes()[:8] == PNG
    fig = C._best_so_far_figure(by_trial, by_time, "loss", "min")
    left, right = fig.axes
    assert left.get_title() == "best loss (min) against trials"
    assert right.get_title() == "best loss (min) against time (s)"
    assert left.get_xlabel() == "trial" and right.get_xlabel() == "seconds since the first trial"
    assert left.get_ylabel() == right.get_ylabel() == "best loss"
    assert fig._suptitle.get_text() == "best loss (min) so far"
    for ax, (xs, _ys) in ((left, by_trial), (right, by_time)):
        if n:
            step = ax.get_lines()[0]
            assert step.get_drawstyle() == "steps-post"
            assert list(step.get_xdata()) == xs
        else:
            assert not ax.get_lines()
            assert [t.get_text() for t in ax.texts] == ["no reports yet"]
