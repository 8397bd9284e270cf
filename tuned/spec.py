"""The experiment spec: everything the engine needs to know about one experiment, as data.

`ExperimentSpec.from_dict` validates a plain dict (from Python keyword arguments, or later
from a TOML/JSON file) and raises `SpecError` listing every problem, each naming its key.
`to_dict` gives the JSON form stored with the experiment, so a resumed run (or a restarted
daemon) rebuilds the same searcher and scheduler.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from tuned.space import Space

SEARCHER_NAMES = ("random", "grid", "rl")
SCHEDULER_NAMES = ("fifo", "hyperband_stopping")
MODES = ("max", "min")


class SpecError(ValueError):
    """An invalid spec; `problems` lists each problem as 'key: what is wrong'."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid experiment spec:\n  - " + "\n  - ".join(problems))


@dataclass
class ExperimentSpec:
    name: str
    space: Space
    constants: dict[str, Any] = field(default_factory=dict)
    searcher: str = "random"
    searcher_options: dict[str, Any] = field(default_factory=dict)
    scheduler: str = "fifo"
    scheduler_options: dict[str, Any] = field(default_factory=dict)
    num_trials: int | None = None
    time_out: float | None = None
    reward_attr: str = "accuracy"
    time_attr: str | None = "epoch"
    mode: str = "max"
    seed: int = 0
    num_cpus: float = 1
    num_gpus: int = 0
    max_concurrent: int | None = None
    max_retries: int = 0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["space"] = self.space.to_json()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExperimentSpec:
        """Validate and build; SpecError listing every problem."""
        problems: list[str] = []
        known = {f for f in cls.__dataclass_fields__}
        for key in sorted(set(data) - known):
            problems.append(f"{key}: unknown key")
        space = _space(data.get("space", {}), problems)
        values = {k: v for k, v in data.items() if k in known and k != "space"}
        _check_values(values, problems)
        if problems:
            raise SpecError(problems)
        return cls(space=space, **values)

    def sign(self, reward: float) -> float:
        """The score of a reward: higher is better whatever the mode."""
        return reward if self.mode == "max" else -reward


def _space(data: Any, problems: list[str]) -> Space:
    if isinstance(data, Space):
        return data
    try:
        return Space.from_json(data)
    except ValueError as exc:
        problems.append(f"space: {exc}")
        return Space({})


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_values(v: dict[str, Any], problems: list[str]) -> None:
    name = v.get("name")
    if not isinstance(name, str) or not name or "/" in name or len(name) > 200:
        problems.append(f"name: must be a non-empty string without '/', got {name!r}")
    _choice(v, "searcher", SEARCHER_NAMES, problems)
    _choice(v, "scheduler", SCHEDULER_NAMES, problems)
    _choice(v, "mode", MODES, problems)
    for key in ("searcher_options", "scheduler_options", "constants"):
        if key in v and not isinstance(v[key], dict):
            problems.append(f"{key}: must be a table, got {v[key]!r}")
    _positive_int(v, "num_trials", problems, optional=True)
    _positive_int(v, "max_concurrent", problems, optional=True)
    if "max_retries" in v and (not isinstance(v["max_retries"], int) or v["max_retries"] < 0
                               or isinstance(v["max_retries"], bool)):
        problems.append(f"max_retries: must be an integer >= 0, got {v['max_retries']!r}")
    t = v.get("time_out")
    if t is not None and (not _is_number(t) or t <= 0):
        problems.append(f"time_out: must be a number of seconds > 0, got {t!r}")
    if v.get("num_trials") is None and v.get("time_out") is None:
        problems.append("num_trials: give num_trials or time_out (or both)")
    if not isinstance(v.get("reward_attr", "accuracy"), str):
        problems.append(f"reward_attr: must be a metric name, got {v['reward_attr']!r}")
    if v.get("time_attr") is not None and not isinstance(v["time_attr"], str):
        problems.append(f"time_attr: must be a metric name, got {v['time_attr']!r}")
    seed = v.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        problems.append(f"seed: must be an integer >= 0, got {seed!r}")
    cpus = v.get("num_cpus", 1)
    if not _is_number(cpus) or cpus <= 0:
        problems.append(f"num_cpus: must be a number > 0, got {cpus!r}")
    gpus = v.get("num_gpus", 0)
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 0:
        problems.append(f"num_gpus: must be an integer >= 0, got {gpus!r}")


def _choice(v: dict[str, Any], key: str, allowed: tuple[str, ...], problems: list[str]) -> None:
    if key in v and v[key] not in allowed:
        problems.append(f"{key}: must be one of {list(allowed)}, got {v[key]!r}")


def _positive_int(v: dict[str, Any], key: str, problems: list[str], optional: bool) -> None:
    value = v.get(key)
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        problems.append(f"{key}: must be an integer >= 1, got {value!r}")
