"""Searchers: random, grid and the RL controller, all behind `tuned.searchers.base.Searcher`."""

from __future__ import annotations

import importlib
from typing import Any

from tuned.searchers.base import Searcher, SearcherStateError
from tuned.space import Space

__all__ = ["Searcher", "SearcherStateError", "make_searcher", "SEARCHERS"]


# name -> (module, class); imported on first use.
_REGISTRY = {
    "random": ("tuned.searchers.random", "RandomSearcher"),
    "grid": ("tuned.searchers.grid", "GridSearcher"),
    "rl": ("tuned.searchers.rl", "RLSearcher"),
    "bayesopt": ("tuned.searchers.bayesopt", "BayesOptSearcher"),
}
SEARCHERS = tuple(_REGISTRY)


def make_searcher(name: str, space: Space, seed: int | None = None,
                  **options: Any) -> Searcher:
    """Build the searcher called `name` over `space`.

    Raises ValueError naming the searcher when the name is unknown, and naming the option when
    an option is unknown or invalid.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown searcher {name!r}; choose one of {sorted(_REGISTRY)}")
    module, attr = _REGISTRY[name]
    cls = getattr(importlib.import_module(module), attr)
    try:
        return cls(space, seed=seed, **options)
    except TypeError as exc:
        raise ValueError(f"searcher {name!r}: {exc}") from None
