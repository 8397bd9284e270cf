"""Trial schedulers: FIFO, asynchronous successive halving (Hyperband, stopping and
promotion types) and population based training."""

from tuned.core.schedulers.base import (
    CONTINUE,
    Clone,
    FIFOScheduler,
    Outcome,
    RungEntry,
    TrialScheduler,
)
from tuned.core.schedulers.hyperband import HyperbandPromotion, HyperbandStopping
from tuned.core.schedulers.pbt import PopulationBasedTraining

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
