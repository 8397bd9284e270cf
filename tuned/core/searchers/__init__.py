"""Searchers: random, grid, bayesopt and the RL controller, all behind
`tuned.core.searchers.base.Searcher`."""

from __future__ import annotations

import importlib
from typing import Any

from tuned.core.searchers.base import Searcher, SearcherStateError
from tuned.core.space import Space

__all__ = ["Searcher", "SearcherStateError", "make_searcher", "SEARCHERS"]


# name -> (module, class); imported on first use.
_REGISTRY = {
    "random": ("tuned.core.searchers.random", "RandomSearcher"),
    "grid": ("tuned.core.searchers.grid", "GridSearcher"),
    "rl": ("tuned.core.searchers.rl", "RLSearcher"),
    "bayesopt": ("tuned.core.searchers.bayesopt", "BayesOptSearcher"),
}
SEARCHERS = tuple(_REGISTRY)


def make_searcher(name: str, space: Space, seed: int | None = None,
                  resource_max: float | None = None, **options: Any) -> Searcher:
    """Build the searcher called `name` over `space`.

    `resource_max` is the largest resource a trial reaches (the scheduler's `max_t`), when
    the scheduler has one: a searcher whose class sets `multi_fidelity` gets it as its
    `max_t` option unless `options` give one; other searchers ignore it.

    Raises ValueError naming the searcher when the name is unknown, and naming the option when
    an option is unknown or invalid.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown searcher {name!r}; choose one of {sorted(_REGISTRY)}")
    module, attr = _REGISTRY[name]
    cls = getattr(importlib.import_module(module), attr)
    if cls.multi_fidelity and resource_max is not None:
        options.setdefault("max_t", resource_max)
    try:
        return cls(space, seed=seed, **options)
    except TypeError as exc:
        raise ValueError(f"searcher {name!r}: {exc}") from None
