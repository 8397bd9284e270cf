"""The searcher contract.

A searcher proposes configurations and learns from their results. It is pure: no I/O, no
threads, no wall clock; its randomness comes from a `numpy.random.Generator` whose state is
part of `state_dict()`, so that a searcher saved and loaded (or rebuilt in another process
with the same seed and the same observations) suggests exactly what the original would have.

Scores given to `observe` are "higher is better": the engine negates rewards when the
experiment's mode is 'min'.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tuned.core.space import Space


class SearcherStateError(ValueError):
    """A state dict that does not belong to this searcher or this version."""


class Searcher:
    """Base class: holds the space and a seeded RNG; subclasses add their own state.

    `suggest(trial_id)` returns a configuration (a dict in the space's order) or None when the
    searcher has nothing more to propose (a grid walked to its end, a finite space exhausted).
    `observe(trial_id, config, score, final, time)` reports a result; `score` is None for a
    trial that failed. The engine calls it with ``final=True`` once per trial, when it ends
    (`time` None); a searcher whose class sets `wants_reports` also hears every stored report,
    with ``final=False`` and the report's `time` (the value of `time_attr`, the resource
    used so far), as multi-fidelity methods need; a class that sets `multi_fidelity` takes a
    `max_t` option, which the engine fills with the scheduler's `max_t`. `state_dict()` is
    JSON-serialisable (JSON-native values) and versioned; `load_state_dict()` raises
    SearcherStateError for a state of another kind or version.
    """

    kind = "base"
    version = 1
    wants_reports = False
    multi_fidelity = False

    def __init__(self, space: Space, seed: int | None = None):
        self.space = space
        self.seed = seed
        self.rng = np.random.default_rng(seed)

    def suggest(self, trial_id: int) -> dict[str, Any] | None:
        raise NotImplementedError

    def observe(self, trial_id: int, config: dict[str, Any], score: float | None,
                final: bool = True, time: float | None = None) -> None:
        """Learn from a result; the base searcher ignores it."""

    def state_dict(self) -> dict[str, Any]:
        return {"v": self.version, "kind": self.kind, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != self.kind or state.get("v") != self.version:
            raise SearcherStateError(
                f"state of searcher {state.get('kind')!r} v{state.get('v')} cannot be loaded "
                f"into {self.kind!r} v{self.version}")
        self.rng.bit_generator.state = state["rng"]
