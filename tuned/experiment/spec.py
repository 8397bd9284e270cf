"""The experiment spec: everything the engine needs to know about one experiment, as data.

`ExperimentSpec.from_dict` validates a plain dict (from Python keyword arguments, or later
from a TOML/JSON file) and raises `SpecError` listing every problem, each naming its key.
`to_dict` gives the JSON form stored with the experiment, so a resumed run (or a restarted
daemon) rebuilds the same searcher and scheduler.

A daemon's spec names its training code: either `entry` ("path/to/file.py:function",
relative to `workdir`, or "package.module:function"), or `command` (an argument list of a
program that reports through the channel named in its environment). The in-process API gives
neither: it passes the function itself. Reading spec files and importing entries live in
`tuned.experiment.files`; this module never imports user code.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from tuned.core.factory import (
    SCHEDULER_ALIASES,
    SCHEDULER_NAMES,
    SEARCHER_NAMES,
    resolve_scheduler,
)
from tuned.core.lifecycle import DEFAULT_MAX_FAILURES
from tuned.core.space import Space

MODES = ("max", "min")
START_METHODS = ("fork", "spawn")
#: Where the trials run: "local" (child processes of the daemon's host) or "dask" (tasks on
#: the Dask cluster the daemon is connected to, `tuned serve --dask`).
EXECUTORS = ("local", "dask")
#: The longest report lag a spec may ask for (seconds): a stop reaches a trial that late.
MAX_REPORT_LAG = 1.0

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
#: "path/to/file.py:function" (any path ending in .py) or "dotted.module:function".
ENTRY_RE = re.compile(rf"^(?:(?P<path>.+\.py)|(?P<module>{_IDENT}(?:\.{_IDENT})*)):"
                      rf"(?P<function>{_IDENT})$")


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
    seed: int | None = None
    num_cpus: float = 1
    num_gpus: int = 0
    max_concurrent: int | None = None
    max_retries: int = 0
    max_failures: int = DEFAULT_MAX_FAILURES
    entry: str | None = None
    command: list[str] | None = None
    workdir: str | None = None
    start_method: str = "fork"
    executor: str = "local"
    report_timeout: float | None = None
    report_lag: float = 0.0
    keep_checkpoints: int | None = None
    schedule: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["space"] = self.space.to_json()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExperimentSpec:
        """Validate and build; SpecError listing every problem.

        A scheduler alias (e.g. "hyperband", and the tutorial's "hyperband" with
        ``[scheduler_options] type = "stopping" | "promotion"``) is replaced by its canonical
        name (`tuned.core.factory.resolve_scheduler`), so `to_dict` always gives the canonical
        one. `data` itself is not modified.
        """
        problems: list[str] = []
        known = {f for f in cls.__dataclass_fields__}
        for key in sorted(set(data) - known, key=str):
            problems.append(f"{key}: unknown key")
        space = _space(data.get("space", {}), problems)
        values = {k: v for k, v in data.items() if k in known and k != "space"}
        if isinstance(values.get("scheduler"), str) and \
                isinstance(values.get("scheduler_options", {}), dict):
            try:
                values["scheduler"], values["scheduler_options"] = resolve_scheduler(
                    values["scheduler"], values.get("scheduler_options", {}))
            except ValueError as exc:
                problems.append(str(exc))
        _check_values(values, problems)
        _check_launch(values, problems)
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
    _choice(v, "scheduler", SCHEDULER_NAMES + tuple(SCHEDULER_ALIASES), problems)
    _choice(v, "mode", MODES, problems)
    for key in ("searcher_options", "scheduler_options", "constants"):
        if key in v and not isinstance(v[key], dict):
            problems.append(f"{key}: must be a table, got {v[key]!r}")
    _positive_int(v, "num_trials", problems, optional=True)
    _positive_int(v, "max_concurrent", problems, optional=True)
    keep = v.get("keep_checkpoints")
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 0):
        problems.append(f"keep_checkpoints: must be an integer >= 0 (the best trials whose "
                        f"checkpoints are kept once they end), got {keep!r}")
    if "max_retries" in v and (not isinstance(v["max_retries"], int) or v["max_retries"] < 0
                               or isinstance(v["max_retries"], bool)):
        problems.append(f"max_retries: must be an integer >= 0, got {v['max_retries']!r}")
    failures = v.get("max_failures", DEFAULT_MAX_FAILURES)
    if isinstance(failures, bool) or not isinstance(failures, int) or failures < 1:
        problems.append(f"max_failures: must be an integer >= 1 (the experiment fails once "
                        f"that many trials failed before any succeeded), got {failures!r}")
    t = v.get("time_out")
    if t is not None and (not _is_number(t) or t <= 0):
        problems.append(f"time_out: must be a number of seconds > 0, got {t!r}")
    if v.get("num_trials") is None and v.get("time_out") is None:
        problems.append("num_trials: give num_trials or time_out (or both)")
    if not isinstance(v.get("reward_attr", "accuracy"), str):
        problems.append(f"reward_attr: must be a metric name, got {v['reward_attr']!r}")
    if v.get("time_attr") is not None and not isinstance(v["time_attr"], str):
        problems.append(f"time_attr: must be a metric name, got {v['time_attr']!r}")
    seed = v.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        problems.append(f"seed: must be an integer >= 0, got {seed!r}")
    cpus = v.get("num_cpus", 1)
    if not _is_number(cpus) or cpus <= 0:
        problems.append(f"num_cpus: must be a number > 0, got {cpus!r}")
    gpus = v.get("num_gpus", 0)
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 0:
        problems.append(f"num_gpus: must be an integer >= 0, got {gpus!r}")
    lag = v.get("report_lag", 0.0)
    if not _is_number(lag) or not 0 <= lag <= MAX_REPORT_LAG:
        problems.append(f"report_lag: must be a number of seconds from 0 to {MAX_REPORT_LAG:g} "
                        f"(how long a trial's reports may go unanswered), got {lag!r}")


def _check_launch(v: dict[str, Any], problems: list[str]) -> None:
    """Check the daemon's keys: entry/command, workdir, start_method, report_timeout,
    schedule. Appends one 'key: what is wrong' per problem."""
    entry, command = v.get("entry"), v.get("command")
    if entry is not None and command is not None:
        problems.append("entry: give entry or command, not both")
    if entry is not None and (not isinstance(entry, str) or not ENTRY_RE.match(entry)):
        problems.append('entry: must look like "path/to/file.py:function" or '
                        f'"package.module:function", got {entry!r}')
    if command is not None and not _is_command(command):
        problems.append(f"command: must be a non-empty list of strings (the program first), "
                        f"got {command!r}")
    workdir = v.get("workdir")
    if workdir is not None and (not isinstance(workdir, str) or not os.path.isabs(workdir)):
        problems.append(f"workdir: must be an absolute path, got {workdir!r}")
    _choice(v, "start_method", START_METHODS, problems)
    _choice(v, "executor", EXECUTORS, problems)
    timeout = v.get("report_timeout")
    if timeout is not None and (not _is_number(timeout) or timeout <= 0):
        problems.append(f"report_timeout: must be a number of seconds > 0, got {timeout!r}")
    if v.get("schedule") is not None:
        problem = cron_problem(v["schedule"])
        if problem:
            problems.append(f"schedule: {problem}")


def _is_command(command: Any) -> bool:
    """True for a non-empty list of strings whose first item (the program) is not empty."""
    return (isinstance(command, list) and bool(command)
            and all(isinstance(a, str) for a in command) and bool(command[0]))


def cron_problem(expr: Any) -> str | None:
    """What is wrong with the cron string `expr` (as APScheduler says it), or None.

    APScheduler is imported only here, so specs without a schedule never need it.
    """
    if not isinstance(expr, str):
        return f"must be a cron string like '0 3 * * *', got {expr!r}"
    from apscheduler.triggers.cron import CronTrigger

    try:
        CronTrigger.from_crontab(expr)
    except (ValueError, TypeError) as exc:
        return f"{expr!r} is not a valid cron string: {exc}"
    return None


def _choice(v: dict[str, Any], key: str, allowed: tuple[str, ...], problems: list[str]) -> None:
    if key in v and v[key] not in allowed:
        problems.append(f"{key}: must be one of {list(allowed)}, got {v[key]!r}")


def _positive_int(v: dict[str, Any], key: str, problems: list[str], optional: bool) -> None:
    value = v.get(key)
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        problems.append(f"{key}: must be an integer >= 1, got {value!r}")


def json_safe(values: dict[str, Any]) -> dict[str, Any]:
    """`values` with each value that JSON cannot hold replaced by ``{"repr": ...}``, for the
    record (trials get the live objects: they are forked from the process that holds them)."""
    out = {}
    for key, value in values.items():
        try:
            json.dumps(value, allow_nan=False)
            out[key] = value
        except (TypeError, ValueError):
            out[key] = {"repr": repr(value)[:200]}
    return out
