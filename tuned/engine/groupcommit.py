"""Group commit: how long a batch of reports waits for more before it is stored (pure).

Each report is stored, with its decision, in a durable transaction before its trial hears
the decision; a commit costs an fdatasync. A trial that reports in a loop sends its next
report within microseconds of its answer, so a batch waits a moment for the reports of the
trials answered lately, and they all share one commit instead of one each.

Worth waiting for are the running trials answered less than the hold ago that have not
spoken since, unless that answer ended them (they exit rather than report). The hold is
`HOLD_MAX` at most, and no longer than a durable commit takes here (so that the wait costs
less than the commit it saves); it counts from the first report of the batch and from each
awaited trial's answer, and ends as soon as every awaited trial has spoken. A batch without
reports (or of a non-durable store) is never held. The reports are handled in the order they
came, as they would be one by one, so they get the same decisions.
"""

from __future__ import annotations

from collections.abc import Iterable

# Reports are held back at most this long for the reports of other trials expected within it
# (and never longer than a durable commit takes here).
HOLD_MAX = 0.001


def hold_time(held_since: float, commit_seconds: float, answered: Iterable[float],
              now: float) -> float | None:
    """Seconds a batch whose first report came at `held_since` waits for the trials
    answered at `answered` (monotonic times; those still awaited), given that a durable
    commit takes about `commit_seconds`; None when it waits no more."""
    cap = min(HOLD_MAX, commit_seconds)
    due = [at + cap for at in answered]
    if not due:
        return None
    wait = min(held_since + cap, max(due)) - now
    return wait if wait > 0 else None
