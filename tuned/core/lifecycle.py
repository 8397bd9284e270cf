"""The life of an experiment: its states, the one table of allowed transitions, and the rule
that decides how a finished experiment ended (pure: stdlib only).

    SCHEDULED --its cron time--> RUNNING <--resume-- PAUSED
    RUNNING --pause--> PAUSED
    RUNNING, PAUSED --stop--> STOPPED          (and SCHEDULED --stop--> STOPPED: cancelled)
    RUNNING --budget spent, some trial succeeded--> COMPLETED
    RUNNING --every trial failed, or max_failures failures before any success--> FAILED
    RUNNING, PAUSED --the entry cannot be loaded any more--> FAILED
    STOPPED, COMPLETED --resume (with a larger budget for COMPLETED)--> RUNNING
    SCHEDULED, COMPLETED, STOPPED, FAILED --delete--> DELETING (then its rows are gone)

A trial *succeeds* when it ends COMPLETED or STOPPED (stopped early by the scheduler, with a
reward); it *fails* when it ends FAILED for a reason of its own, not because the user
stopped the experiment or killed it, or the experiment failed (`NOT_FAILURES`). COMPLETED
means the budget was spent: `num_trials` trials made, `time_out` passed or the search space
exhausted.
"""

from __future__ import annotations

from enum import Enum


class ExperimentState(str, Enum):
    SCHEDULED = "SCHEDULED"
    RUNNING = "RUNNING"
    PAUSED = "PAUSED"
    COMPLETED = "COMPLETED"
    STOPPED = "STOPPED"
    FAILED = "FAILED"
    DELETING = "DELETING"  # a delete in progress: finished by the next daemon if cut short

    @property
    def finished(self) -> bool:
        """Nothing of it runs, and nothing will unless the user resumes it."""
        return self in _FINISHED


_FINISHED = frozenset({ExperimentState.COMPLETED, ExperimentState.STOPPED,
                       ExperimentState.FAILED})

E = ExperimentState
#: Every allowed change of state (staying in the same state is always allowed).
TRANSITIONS: dict[ExperimentState, frozenset[ExperimentState]] = {
    E.SCHEDULED: frozenset({E.RUNNING, E.STOPPED, E.DELETING}),
    E.RUNNING: frozenset({E.PAUSED, E.STOPPED, E.COMPLETED, E.FAILED}),
    E.PAUSED: frozenset({E.RUNNING, E.STOPPED, E.FAILED}),
    E.COMPLETED: frozenset({E.RUNNING, E.DELETING}),
    E.STOPPED: frozenset({E.RUNNING, E.DELETING}),
    E.FAILED: frozenset({E.DELETING}),
    E.DELETING: frozenset(),
}
del E

FINISHED_EXPERIMENT_STATES = tuple(s.value for s in ExperimentState if s.finished)

#: The errors of trials ended from outside, by the user or by their experiment's failure:
#: they count neither as failures nor as successes.
STOPPED_BY_USER = "stopped by the user"
KILLED_BY_USER = "killed by the user"
EXPERIMENT_FAILED = "stopped: the experiment failed"
NOT_FAILURES = (STOPPED_BY_USER, KILLED_BY_USER, EXPERIMENT_FAILED)

#: A spec's `max_failures` when it gives none.
DEFAULT_MAX_FAILURES = 10


class BadTransition(ValueError):
    """A change of state the table does not allow; the message names both states. A control
    op that meets one answers it as a ``conflict``."""

    code = "conflict"

    @property
    def message(self) -> str:
        return str(self)


def check_transition(old: str, new: str) -> None:
    """Return if an experiment may go from `old` to `new`; BadTransition otherwise (also
    for a state name that is not one of `ExperimentState`)."""
    try:
        before, after = ExperimentState(old), ExperimentState(new)
    except ValueError:
        raise BadTransition(f"unknown experiment state in {old!r} -> {new!r}") from None
    if before is not after and after not in TRANSITIONS[before]:
        allowed = ", ".join(sorted(s.value for s in TRANSITIONS[before])) or "none"
        raise BadTransition(f"an experiment cannot go from {old} to {new} "
                            f"(from {old}: {allowed})")


class ExperimentFailed(RuntimeError):
    """The experiment ended FAILED (raised by the in-process API's `run()`); the message
    gives the reason, with the last trials' errors."""


def failed_early(failures: int, successes: int, max_failures: int) -> bool:
    """Whether an experiment must end FAILED now: `max_failures` trials failed before any
    succeeded."""
    return successes == 0 and failures >= max_failures


def final_state(successes: int, failures: int) -> ExperimentState:
    """How an experiment whose budget is spent ended: FAILED when trials failed and none
    succeeded, else COMPLETED (also for one that made no trial at all)."""
    return ExperimentState.FAILED if failures and not successes else ExperimentState.COMPLETED


def failure_reason(failures: int, max_failures: int | None,
                   last_errors: list[tuple[int, str]]) -> str:
    """The reason stored with a FAILED experiment: how many trials failed, and the errors
    of the last ones (`last_errors`: (trial number, error), newest first)."""
    head = (f"{failures} trial(s) failed and none succeeded" if max_failures is None else
            f"{failures} trial(s) failed before any succeeded (max_failures = {max_failures})")
    if not last_errors:
        return head
    shown = "; ".join(f"trial {n}: {_short(e)}" for n, e in last_errors)
    return f"{head}; last errors: {shown}"


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."
