"""Searchers: random, grid and the RL controller, all behind `tuned.searchers.base.Searcher`."""

from __future__ import annotations

from typing import Any

from tuned.searchers.base import Searcher, SearcherStateError
from tuned.space import Space

__all__ = ["Searcher", "SearcherStateError", "make_searcher", "SEARCHERS"]


def _registry() -> dict[str, type[Searcher]]:
    from tuned.searchers.grid import GridSearcher
    from tuned.searchers.random import RandomSearcher
    from tuned.searchers.rl import RLSearcher

    return {"random": RandomSearcher, "grid": GridSearcher, "rl": RLSearcher}


SEARCHERS = ("random", "grid", "rl")


def make_searcher(name: str, space: Space, seed: int | None = None,
                  **options: Any) -> Searcher:
    """Build the searcher called `name` over `space`.

    Raises ValueError naming the searcher when the name is unknown, and naming the option when
    an option is unknown or invalid.
    """
    registry = _registry()
    if name not in registry:
        raise ValueError(f"unknown searcher {name!r}; choose one of {sorted(registry)}")
    cls = registry[name]
    try:
        return cls(space, seed=seed, **options)
    except TypeError as exc:
        raise ValueError(f"searcher {name!r}: {exc}") from None
