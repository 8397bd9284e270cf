"""tuned: a persistent, checkpointed hyperparameter-tuning engine and daemon.

``import tuned as ag`` gives the API of AutoGluon's searcher/scheduler system:
``ag.args``, ``ag.space``, ``ag.scheduler.FIFOScheduler``, ``HyperbandScheduler``,
``RLScheduler``.
"""

from tuned import scheduler, space
from tuned.args import Args, args

__version__ = "0.1.0"

__all__ = ["Args", "args", "scheduler", "space", "__version__"]
