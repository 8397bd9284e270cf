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

from tuned._version import __version__

__all__ = ["Args", "ExperimentFailed", "args", "scheduler", "space", "__version__"]

_LAZY = {"scheduler": ("tuned.scheduler", None), "space": ("tuned.space", None),
         "args": ("tuned.core.args", "args"), "Args": ("tuned.core.args", "Args"),
         "ExperimentFailed": ("tuned.core.lifecycle", "ExperimentFailed")}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'tuned' has no attribute {name!r}")
    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value
