"""Trial schedulers: FIFO, asynchronous successive halving (Hyperband, stopping and
promotion types) and population based training."""

from tuned.schedulers.base import (
    CONTINUE,
    Clone,
    FIFOScheduler,
    Outcome,
    RungEntry,
    TrialScheduler,
)
from tuned.schedulers.hyperband import HyperbandPromotion, HyperbandStopping
from tuned.schedulers.pbt import PopulationBasedTraining

__all__ = [
    "CONTINUE",
    "Clone",
    "FIFOScheduler",
    "HyperbandPromotion",
    "HyperbandStopping",
    "PopulationBasedTraining",
    "Outcome",
    "RungEntry",
    "TrialScheduler",
]
