"""Random search: the space's default first, then fresh random samples, never a repeat.

The searcher remembers every configuration it has suggested (as canonical JSON text) and
does not suggest one twice while the space has others left. Its behaviour is a function of
its state only (the RNG state and the set of suggested configurations), so a searcher saved
and loaded suggests exactly what the original would have.
"""

from __future__ import annotations

import json
from typing import Any

from tuned.core.searchers.base import Searcher, SearcherStateError
from tuned.core.space import Space

__all__ = ["RandomSearcher", "config_key"]

#: How many samples `suggest` draws looking for an unseen configuration before it gives up
#: on sampling.
MAX_TRIES = 100
#: Finite spaces with at most this many configurations may be enumerated.
ENUMERATE_LIMIT = 100_000
#: Suggested keys per part of the state ("seen.0", "seen.1", ...): the store rewrites only
#: the parts that changed, so a suggestion costs one part, not the whole history.
CHUNK = 512


def config_key(config: dict[str, Any]) -> str:
    """The canonical JSON text of a configuration: equal configurations, equal keys."""
    return json.dumps(config, sort_keys=True)


class RandomSearcher(Searcher):
    """Suggests `space.default()` first, then random samples from `space.sample(rng)`.

    A configuration is never suggested twice while the space has others left: sampling is
    retried up to `MAX_TRIES` times; a finite space of at most `ENUMERATE_LIMIT`
    configurations that is three-quarters used (or where sampling found nothing new) is
    enumerated instead and one of the configurations left is picked with the RNG.
    `suggest` returns None once a finite space is exhausted, and also when sampling finds
    nothing new in a space too large to enumerate (in practice only a continuous space with
    degenerate ranges).
    """

    kind = "random"
    version = 2

    def __init__(self, space: Space, seed: int | None = None):
        super().__init__(space, seed)
        self._seen: set[str] = set()
        self._order: list[str] = []  # the keys of `_seen`, in the order suggested
        # (key, configuration) of those not yet suggested, in grid order: derived from the
        # space and `_seen` (so not part of the state), built when first needed.
        self._left: list[tuple[str, dict[str, Any]]] | None = None

    def suggest(self, trial_id: int) -> dict[str, Any] | None:
        """The next configuration, or None when there is nothing new to suggest."""
        if self._exhausted():
            return None
        if not self._seen:
            config = self.space.default()
        elif self._enumerable() and 4 * self._n_left() <= self.space.cardinality:
            config = self._pick_left()
        else:
            config = self._sample_new()
            if config is None and self._enumerable():
                config = self._pick_left()
        if config is not None:
            self._remember(config)
        return config

    def state_dict(self) -> dict[str, Any]:
        """`{"v": 2, "kind", "rng", "seen.0", "seen.1", ...}`: the suggested keys in the
        order suggested, `CHUNK` per part."""
        state = super().state_dict()
        for i in range(0, len(self._order), CHUNK):
            state[f"seen.{i // CHUNK}"] = self._order[i:i + CHUNK]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict()` (or a version 1 one, whose `seen` is one sorted list);
        SearcherStateError (and nothing changed) when it is not a valid one."""
        if state.get("kind") == self.kind and state.get("v") == 1:
            state = {**{k: v for k, v in state.items() if k != "seen"}, "v": 2,
                     "seen.0": state.get("seen")}
        rng_before = self.rng.bit_generator.state
        super().load_state_dict(state)
        order: list[str] = []
        for i in range(sum(1 for k in state if k.startswith("seen."))):
            part = state.get(f"seen.{i}")
            if not isinstance(part, list) or not all(isinstance(k, str) for k in part):
                self.rng.bit_generator.state = rng_before
                raise SearcherStateError(f"random searcher state: 'seen.{i}' must be a list "
                                         "of strings")
            order += part
        self._order = order
        self._seen = set(order)
        self._left = None

    def _n_left(self) -> int:
        cardinality = self.space.cardinality
        assert cardinality is not None
        return cardinality - len(self._seen)

    def _exhausted(self) -> bool:
        return self.space.cardinality is not None and self._n_left() <= 0

    def _enumerable(self) -> bool:
        cardinality = self.space.cardinality
        return cardinality is not None and cardinality <= ENUMERATE_LIMIT

    def _sample_new(self) -> dict[str, Any] | None:
        """A sample not suggested before, or None after `MAX_TRIES` repeats."""
        for _ in range(MAX_TRIES):
            config = self.space.sample(self.rng)
            if config_key(config) not in self._seen:
                return config
        return None

    def _pick_left(self) -> dict[str, Any] | None:
        """One of the configurations not yet suggested, picked uniformly with the RNG."""
        if self._left is None:
            pairs = ((config_key(c), c) for c in self.space.grid())
            self._left = [(k, c) for k, c in pairs if k not in self._seen]
        elif len(self._left) != self._n_left():
            # Something was suggested since (a sample): drop it, keeping the order.
            self._left = [(k, c) for k, c in self._left if k not in self._seen]
        if not self._left:
            return None
        return self._left.pop(int(self.rng.integers(len(self._left))))[1]

    def _remember(self, config: dict[str, Any]) -> None:
        key = config_key(config)
        self._seen.add(key)
        self._order.append(key)
