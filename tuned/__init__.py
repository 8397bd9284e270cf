"""tuned: a persistent, checkpointed hyperparameter-tuning engine and daemon.

``import tuned as ag`` gives the API of AutoGluon's searcher/scheduler system:
``ag.args``, ``ag.space``, ``ag.scheduler.FIFOScheduler``, ``HyperbandScheduler``,
``RLScheduler``; and ``ag.ExperimentFailed``, what ``run()`` raises when every trial
failed. They are imported on first use, so that light commands (`tunectl`) do not pay for
numpy and the engine.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

__all__ = ["Args", "ExperimentFailed", "args", "scheduler", "space", "__version__"]

_LAZY = {"scheduler": ("tuned.scheduler", None), "space": ("tuned.space", None),
         "args": ("tuned.trial_args", "args"), "Args": ("tuned.trial_args", "Args"),
         "ExperimentFailed": ("tuned.lifecycle", "ExperimentFailed")}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'tuned' has no attribute {name!r}")
    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value
