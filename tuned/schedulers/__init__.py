"""Trial schedulers: FIFO and asynchronous successive halving (Hyperband, stopping type)."""

from tuned.schedulers.base import CONTINUE, FIFOScheduler, Outcome, RungEntry, TrialScheduler

__all__ = ["CONTINUE", "FIFOScheduler", "Outcome", "RungEntry", "TrialScheduler"]
