"""Report intake: whether a trial's report is valid, and the time it reports at (pure).

A report's metrics must be JSON numbers, strings or bools, finite but for the reward (which
is checked on its own: present, a number, finite), and its `time_attr`, when it has one, a
finite number. The engine fails a trial whose report is not (`check_metrics` says why).
"""

from __future__ import annotations

import math
from typing import Any


def time_value(metrics: dict[str, Any], time_attr: str | None, seq: int) -> float:
    """The progress a report is at: its `time_attr` metric, else its sequence number."""
    if time_attr is not None and time_attr in metrics:
        return float(metrics[time_attr])
    return float(seq)


def check_metrics(metrics: Any, reward_attr: str, time_attr: str | None) -> str | None:
    """None when a report is valid, else a sentence saying what is wrong with it."""
    if not isinstance(metrics, dict) or not metrics:
        return f"a report must have metrics, got {metrics!r}"
    for name, value in metrics.items():
        if not isinstance(value, (bool, int, float, str)):
            return f"metric {name!r}: {value!r} is not a JSON number, string or bool"
        if isinstance(value, float) and not math.isfinite(value) and name != reward_attr:
            return f"metric {name!r}: {value!r} is not a finite number"
    if reward_attr not in metrics:
        return (f"the report has no reward metric {reward_attr!r} "
                f"(it has {sorted(metrics)}); set reward_attr to the metric to optimise")
    reward = metrics[reward_attr]
    if isinstance(reward, bool) or not isinstance(reward, (int, float)):
        return f"reward {reward_attr!r}: {reward!r} is not a number"
    if not math.isfinite(reward):
        return f"reward {reward_attr!r} is {reward!r}"
    if time_attr is not None and time_attr in metrics:
        t = metrics[time_attr]
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
            return f"time metric {time_attr!r}: {t!r} is not a finite number"
    return None
