"""The trial-scheduler contract.

A trial scheduler decides, after each report, whether a trial goes on. It is pure: no I/O,
no threads, no wall clock. Its memory is data the store keeps: rung entries, rows of
`(bracket, level, trial_id, score, decision)`, unique per `(bracket, level, trial_id)`.
Feeding the stored rung entries to `load_rungs` of a fresh scheduler rebuilds it, and it then
decides every later report exactly as the original would have.

Scores are "higher is better": the engine negates rewards when the mode is 'min'.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

from tuned.core.decisions import Decision


@dataclass(frozen=True)
class RungEntry:
    """One trial's arrival at one rung, with the decision taken there."""

    bracket: int
    level: float
    trial_id: int
    score: float
    decision: Decision


@dataclass(frozen=True)
class Clone:
    """Start a new trial from trial `source`'s latest checkpoint with `config` (population
    based training's exploit and explore)."""

    source: int
    config: dict[str, Any]


@dataclass(frozen=True)
class Outcome:
    """A scheduler's answer to one report.

    `rungs` are the new rung entries to store in the same transaction as the report.
    `completed` is True when the trial has used its whole budget (`max_t`): it is told to
    stop, and it ends COMPLETED rather than STOPPED. `clone`: a new trial to start in the
    same transaction (the reporting trial is told to stop).
    """

    decision: Decision
    reason: str = ""
    rungs: tuple[RungEntry, ...] = field(default_factory=tuple)
    completed: bool = False
    clone: Clone | None = None


CONTINUE = Outcome(Decision.CONTINUE)


class TrialScheduler:
    """Base class: every trial runs to its end (FIFO)."""

    kind = "fifo"
    # Whether the engine must tell `on_trial_add` about every trial (population based
    # training, which copies configs); others never need it.
    needs_configs = False

    def on_trial_add(self, trial_id: int, config: dict[str, Any], time: float = 0.0) -> None:
        """A trial joined (created, or found in the store); `time`: where it starts."""

    def assign_bracket(self, trial_number: int) -> int:
        """The bracket of the trial numbered `trial_number` (0-based, per experiment)."""
        return 0

    def on_report(self, trial_id: int, bracket: int, time_value: float,
                  score: float) -> Outcome:
        return CONTINUE

    def on_trial_end(self, trial_id: int) -> None:
        """A trial ended, however it ended."""

    def load_rungs(self, entries: Iterable[RungEntry]) -> None:
        """Rebuild the scheduler's memory from stored rung entries, in their stored order."""

    # A scheduler that pauses trials and runs them again later (promotion) overrides these.

    def can_promote(self, busy: Collection[int] = ()) -> bool:
        """Whether a paused trial not in `busy` should run again now."""
        return False

    def promote(self, busy: Collection[int] = ()) -> RungEntry | None:
        """Pick a paused trial to run again, not one in `busy` (told to pause, its process
        not ended yet): its rung entry as it must now be stored (the engine stores it in
        place of the old one, then runs the trial), or None."""
        return None

    def holds(self, trial_id: int) -> bool:
        """Whether the scheduler keeps this trial paused (an experiment's resume must not
        run it again; only `promote` does)."""
        return False

    def waiting(self) -> list[int]:
        """The trials the scheduler holds paused."""
        return []


class FIFOScheduler(TrialScheduler):
    """Every trial runs to its end; the only stop is `max_t`, when given."""

    def __init__(self, max_t: float | None = None):
        self.max_t = max_t

    def on_report(self, trial_id: int, bracket: int, time_value: float,
                  score: float) -> Outcome:
        if self.max_t is not None and time_value >= self.max_t:
            return Outcome(Decision.STOP, f"reached max_t={self.max_t:g}", completed=True)
        return CONTINUE
