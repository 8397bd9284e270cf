"""Trial schedulers: FIFO and asynchronous successive halving (Hyperband, stopping type)."""

from tuned.schedulers.base import CONTINUE, FIFOScheduler, Outcome, RungEntry, TrialScheduler
from tuned.schedulers.hyperband import HyperbandStopping

__all__ = [
    "CONTINUE",
    "FIFOScheduler",
    "HyperbandStopping",
    "Outcome",
    "RungEntry",
    "TrialScheduler",
]
