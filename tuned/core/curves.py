"""Learning curves as numbers (pure): a trial's points, the ranking of trials by their
last value, the best value so far. The charts (`tuned.ui.charts`) draw them; the read models
(`tuned.store.views`) answer with them."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

Curves = Mapping[Any, Sequence[Sequence[float]]]
"""``{trial: [xs, ys]}``, xs and ys of the same length."""


def curve_points(reports: list[dict[str, Any]], reward_attr: str,
                 time_attr: str | None) -> tuple[list[float], list[float]]:
    """(times, rewards) of one trial; a report without `time_attr` counts as step 1, 2, ...

    Reports without `reward_attr` are skipped (they still count as a step)."""
    xs, ys = [], []
    for i, metrics in enumerate(reports, start=1):
        if reward_attr not in metrics:
            continue
        t = metrics.get(time_attr, i) if time_attr else i
        xs.append(float(t))
        ys.append(float(metrics[reward_attr]))
    return xs, ys


def check_mode(mode: str) -> None:
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', not {mode!r}")


def rank_trials(curves: Curves, mode: str = "max") -> list[Any]:
    """The trials of `curves` (``{trial: [xs, ys]}``) that have at least one point, best
    first by their last y value: higher first for ``mode="max"``, lower first for "min".

    A trial whose last value is not finite (NaN, inf from a diverged run) ranks after the
    finite ones; ties keep the order of `curves`. Raises ValueError on another mode."""
    check_mode(mode)
    sign = -1.0 if mode == "max" else 1.0
    last = {n: float(ys[-1]) for n, (_xs, ys) in curves.items() if len(ys)}
    return sorted(last, key=lambda n: (not math.isfinite(last[n]),
                                       sign * last[n] if math.isfinite(last[n]) else 0.0))


def best_so_far(points: Sequence[tuple[float, float]],
                mode: str = "max") -> tuple[list[float], list[float]]:
    """The running best of `points` (``(x, value)`` pairs in x order) as step points.

    Returns ``(xs, ys)``: one point at each x where the best strictly improves (the first
    finite value is the first improvement), then, unless the last point was itself an
    improvement, the last x of `points` with the final best, so a step line drawn
    through them reaches the end. Non-finite values (NaN, inf) never count as
    improvements. ``([], [])`` when there is no finite value.

    Raises ValueError when `mode` is not "max" or "min", or when the xs decrease.
    """
    check_mode(mode)
    xs: list[float] = []
    ys: list[float] = []
    prev_x = -math.inf
    for x, value in points:
        x, value = float(x), float(value)
        if x < prev_x:
            raise ValueError(f"points are not in x order: {x} after {prev_x}")
        prev_x = x
        if not math.isfinite(value):
            continue
        if not ys or (value > ys[-1] if mode == "max" else value < ys[-1]):
            xs.append(x)
            ys.append(value)
    if ys and points and float(points[-1][0]) != xs[-1]:
        xs.append(float(points[-1][0]))
        ys.append(ys[-1])
    return xs, ys
