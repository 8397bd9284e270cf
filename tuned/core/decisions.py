"""The words the engine, the schedulers and the store share: decisions and trial states."""

from __future__ import annotations

from enum import Enum


class Decision(str, Enum):
    """What a scheduler tells a trial after one of its reports."""

    CONTINUE = "continue"
    PAUSE = "pause"
    STOP = "stop"


class TrialState(str, Enum):
    """The life of a trial.

    PENDING -> RUNNING -> one of COMPLETED (its function returned, or it used its whole
    budget), STOPPED (a scheduler stopped it early), FAILED (an error, a crash, a bad report)
    or back to PENDING when a run is interrupted and the trial is retried. PAUSED trials wait
    for a promotion or a resume.
    """

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    PAUSED = "PAUSED"
    COMPLETED = "COMPLETED"
    STOPPED = "STOPPED"
    FAILED = "FAILED"

    @property
    def finished(self) -> bool:
        return self in (TrialState.COMPLETED, TrialState.STOPPED, TrialState.FAILED)


FINISHED_STATES = tuple(s.value for s in TrialState if s.finished)
