"""Grid search: every configuration of `space.grid(grid_points)`, in order, then None.

The state is the position in the grid; the grid itself is walked lazily, never built whole.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np

from tuned.core.searchers.base import Searcher, SearcherStateError
from tuned.core.space import Space

__all__ = ["GridSearcher"]


class GridSearcher(Searcher):
    """Walks `space.grid(grid_points)` in order; `suggest` returns None at its end.

    `grid_points` is how many values a `Real` (or an `Int` with more values than that)
    contributes to the grid; ValueError naming it when it is not an integer >= 1.
    """

    kind = "grid"
    version = 1

    def __init__(self, space: Space, seed: int | None = None, grid_points: int = 5):
        if (isinstance(grid_points, bool) or not isinstance(grid_points, (int, np.integer))
                or grid_points < 1):
            raise ValueError(f"grid_points must be an integer >= 1, got {grid_points!r}")
        super().__init__(space, seed)
        self.grid_points = int(grid_points)
        self.position = 0
        space.grid(self.grid_points)  # raises now, not at the first suggestion
        self._walk: Iterator[dict[str, Any]] | None = None

    def suggest(self, trial_id: int) -> dict[str, Any] | None:
        """The configuration at the current position of the grid, or None past its end."""
        if self._walk is None:
            self._walk = itertools.islice(self.space.grid(self.grid_points), self.position,
                                          None)
        config = next(self._walk, None)
        if config is not None:
            self.position += 1
        return config

    def state_dict(self) -> dict[str, Any]:
        """`{"v", "kind", "rng", "position", "grid_points"}`."""
        state = super().state_dict()
        state["position"] = self.position
        state["grid_points"] = self.grid_points
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict()`; SearcherStateError when it is not a valid one, or was
        made with other `grid_points` (its position would mean another configuration).
        Nothing changes when it raises."""
        rng_before = self.rng.bit_generator.state
        super().load_state_dict(state)
        try:
            self.position = self._parse_position(state)
        except SearcherStateError:
            self.rng.bit_generator.state = rng_before
            raise
        self._walk = None

    def _parse_position(self, state: dict[str, Any]) -> int:
        position = state.get("position")
        if isinstance(position, bool) or not isinstance(position, int) or position < 0:
            raise SearcherStateError(f"grid searcher state: bad position {position!r}")
        if state.get("grid_points") != self.grid_points:
            raise SearcherStateError(
                f"grid searcher state was made with grid_points={state.get('grid_points')!r}, "
                f"this searcher has grid_points={self.grid_points}")
        return position
