"""Named points where a crash test can have this process killed (or interrupted).

``TUNED_FAILPOINTS="reported:3,claimed"`` makes the process send itself SIGKILL the 3rd time
it reaches `hit("reported")`, and the first time it reaches `hit("claimed")`; a third field
names another signal: ``fork_asked:5:INT`` sends SIGINT (Ctrl-C) the 5th time. Unset
(always, outside tests), `hit` is one dictionary test. The points (see `tuned.engine.engine` and
`tuned.executors.template`):

- ``suggested``: a new trial and the searcher state that suggested it are written, not
  committed;
- ``claimed``: the step's transaction (new trials claimed by their reserved processes) is
  committed, no trial told to start yet;
- ``reported``: a report and its decision are committed, the trial not answered yet;
- ``promoted``: a paused trial's promotion is written, not committed;
- ``fork_asked``: a template was asked for a child, the request not recorded yet.
"""

from __future__ import annotations

import os
import signal

ENV = "TUNED_FAILPOINTS"


def _parse(text: str) -> dict[str, tuple[int, signal.Signals]]:
    points: dict[str, tuple[int, signal.Signals]] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        name, count, sig = (item.split(":") + ["", ""])[:3]
        points[name] = (int(count) if count else 1, signal.Signals[f"SIG{sig or 'KILL'}"])
    return points


_ARMED = _parse(os.environ.get(ENV, ""))
_REACHED: dict[str, int] = {}


def hit(name: str) -> None:
    """Count a pass through point `name`; signal this process on the armed pass."""
    if not _ARMED or name not in _ARMED:
        return
    _REACHED[name] = _REACHED.get(name, 0) + 1
    count, sig = _ARMED[name]
    if _REACHED[name] == count:
        os.kill(os.getpid(), sig)
