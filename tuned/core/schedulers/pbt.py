"""Population based training (Jaderberg et al., "Population Based Training of Neural
Networks", 2017), asynchronous, as a trial scheduler.

The population is the trials that run (the first ones come from the searcher). Every
`perturbation_interval` units of `time_attr` a trial records its score at that boundary. If
it then ranks in the bottom `quantile_fraction` of the population (by each member's latest
boundary score), it is stopped and replaced: *exploit*, a new trial starts from the
checkpoint of a trial drawn from the top `quantile_fraction`, with *explore*, that trial's
config changed: each numeric value multiplied by 0.8 or 1.2 (clipped to its domain, rounded
for integers), each categorical moved to a neighbouring choice, each boolean kept, or, with
`resample_probability`, drawn anew from its domain. The new trial's `parent` is the trial it
starts from, which gives each trial's lineage. A report at or past `max_t` ends a trial
COMPLETED.

Pure: the memory is the boundary records (rung entries at level = the boundary, decision
STOP for a replaced trial) and the configs the engine tells it (`on_trial_add`); the random
draws of a decision come from ``default_rng([seed, trial_id, boundary])``, so a scheduler
rebuilt from the store decides as the original would have.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from tuned.core.decisions import Decision
from tuned.core.schedulers.base import CONTINUE, Clone, Outcome, RungEntry, TrialScheduler
from tuned.core.space import Bool, Categorical, Int, Real, Space

_FACTORS = (0.8, 1.2)


class PopulationBasedTraining(TrialScheduler):
    """See the module docstring. ValueError names a bad option."""

    kind = "pbt"
    needs_configs = True

    def __init__(self, space: Space, max_t: float, perturbation_interval: float,
                 quantile_fraction: float = 0.25, resample_probability: float = 0.25,
                 seed: int = 0):
        if not _positive(max_t):
            raise ValueError(f"max_t must be a number > 0, got {max_t!r}")
        if not _positive(perturbation_interval) or perturbation_interval >= max_t:
            raise ValueError(f"perturbation_interval must be a number > 0 and < max_t "
                             f"({max_t:g}), got {perturbation_interval!r}")
        if not (_number(quantile_fraction) and 0 < quantile_fraction <= 0.5):
            raise ValueError(f"quantile_fraction must be in (0, 0.5], got {quantile_fraction!r}")
        if not (_number(resample_probability) and 0 <= resample_probability <= 1):
            raise ValueError(f"resample_probability must be in [0, 1], "
                             f"got {resample_probability!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        self.space = space
        self.max_t = max_t
        self.interval = perturbation_interval
        self.quantile_fraction = quantile_fraction
        self.resample_probability = resample_probability
        self.seed = seed
        self._configs: dict[int, dict[str, Any]] = {}
        self._alive: set[int] = set()
        # trial -> (its latest boundary, its score there; None before its first record).
        self._last: dict[int, tuple[float, float | None]] = {}

    def on_trial_add(self, trial_id: int, config: dict[str, Any], time: float = 0.0) -> None:
        """A trial of the population, starting at `time` (a clone starts where its parent's
        checkpoint was): its first boundary is the first one after `time`."""
        self._configs[trial_id] = dict(config)
        self._alive.add(trial_id)
        if time > 0 and trial_id not in self._last:
            self._last[trial_id] = (self._boundary(time), None)

    def on_trial_end(self, trial_id: int) -> None:
        self._alive.discard(trial_id)

    def _boundary(self, time_value: float) -> float:
        return math.floor(time_value / self.interval) * self.interval

    def on_report(self, trial_id: int, bracket: int, time_value: float,
                  score: float) -> Outcome:
        if time_value >= self.max_t:
            # Done training: no longer a member to copy from (a clone of it would start at
            # max_t, with nothing left to do).
            self._alive.discard(trial_id)
            return Outcome(Decision.STOP, f"reached max_t={self.max_t:g}", completed=True)
        level = self._boundary(time_value)
        last = self._last.get(trial_id)
        if level < self.interval or (last is not None and level <= last[0]):
            return CONTINUE
        self._last[trial_id] = (level, score)
        source = self._exploit_source(trial_id, level)
        if source is None:
            return Outcome(Decision.CONTINUE, f"boundary {level:g}: kept",
                           (RungEntry(0, level, trial_id, score, Decision.CONTINUE),))
        rng = np.random.default_rng([self.seed, trial_id, int(round(level * 1000))])
        source = source[int(rng.integers(len(source)))]
        config = self.explore(self._configs[source], rng)
        return Outcome(Decision.STOP, f"boundary {level:g}: bottom of the population; "
                       f"replaced by a clone of trial {source}",
                       (RungEntry(0, level, trial_id, score, Decision.STOP),),
                       clone=Clone(source, config))

    def _exploit_source(self, trial_id: int, level: float) -> list[int] | None:
        """The top-quantile members to copy from if `trial_id` is in the bottom quantile,
        else None."""
        scored = sorted((-s, t) for t in self._alive
                        if (rec := self._last.get(t)) is not None and (s := rec[1]) is not None)
        k = math.floor(len(scored) * self.quantile_fraction)
        if k < 1:
            return None
        bottom = {t for _, t in scored[-k:]}
        if trial_id not in bottom:
            return None
        top = [t for _, t in scored[:k] if t != trial_id and t in self._configs]
        return top or None

    def explore(self, config: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        """A changed copy of `config` (see the module docstring)."""
        out = dict(config)
        for name, domain in self.space.items():
            if name not in out:
                continue
            if rng.random() < self.resample_probability:
                out[name] = domain.sample(rng)
            else:
                out[name] = _perturb(domain, out[name], rng)
        return out

    def load_rungs(self, entries: Iterable[RungEntry]) -> None:
        for e in entries:
            self._last[e.trial_id] = (e.level, e.score)
            if Decision(e.decision) is Decision.STOP:
                self._alive.discard(e.trial_id)


def _perturb(domain: Any, value: Any, rng: np.random.Generator) -> Any:
    if isinstance(domain, (Real, Int)):
        factor = _FACTORS[int(rng.integers(2))]
        new = min(max(value * factor, domain.lower), domain.upper)
        if isinstance(domain, Int):
            new = int(round(new))
            if new == value:  # a small integer would never move: step by one instead
                new = min(max(value + (1 if factor > 1 else -1), domain.lower), domain.upper)
        return new
    if isinstance(domain, Bool):
        return value
    if isinstance(domain, Categorical):
        choices = list(domain.choices)
        i = choices.index(value) if value in choices else 0
        return choices[min(max(i + (1 if rng.random() < 0.5 else -1), 0), len(choices) - 1)]
    return value


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _positive(v: Any) -> bool:
    return _number(v) and v > 0
