"""Asynchronous successive halving, stopping variant (AutoGluon's `HyperbandScheduler`,
`type='stopping'`).

Each trial belongs to a bracket. Bracket `b` has rung levels
`grace_period * reduction_factor ** (b + k)` for `k = 0, 1, ...` while the level is below
`max_t`; bracket 0 is the most aggressive. When a trial's report reaches a rung it has not
entered yet, it enters it and is ranked against every trial that entered that rung before.
With `n` entries (the new one included), `c` of them already told to continue and
`k = ceil(n / reduction_factor)`, the new trial continues iff `c < k` and fewer than `k`
entries have a strictly higher score. Hence at every moment at most `ceil(n / rf)` of a
rung's `n` entries were continued. Scores are higher-is-better; NaN ranks below everything.

The scheduler is pure (stdlib and numpy only). Its memory is its rung entries: the rows
returned in `Outcome.rungs`, which `load_rungs` turns back into the same memory.
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_right
from collections.abc import Collection, Iterable
from numbers import Integral, Real

import numpy as np

from tuned.core.decisions import Decision
from tuned.core.schedulers.base import CONTINUE, Outcome, RungEntry, TrialScheduler

_STOPPED = -1  # progress marker of a trial that was told STOP at a rung
_ALREADY_STOPPED = Outcome(Decision.STOP, "already stopped at a rung")


class _SortedScores:
    """A sorted multiset of floats, kept as buckets of bounded size.

    `add` inserts a value and returns how many stored values are strictly greater, in
    O(log n) comparisons plus an O(bucket) list insert; a Fenwick tree over the bucket
    sizes gives the count of values in later buckets.
    """

    _LOAD = 512

    __slots__ = ("_buckets", "_maxes", "_tree", "_size")

    def __init__(self) -> None:
        self._buckets: list[list[float]] = []
        self._maxes: list[float] = []
        self._tree: list[int] = [0]
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def add(self, x: float) -> int:
        """Insert `x`; return the number of values (other than `x`) strictly above it."""
        buckets, maxes = self._buckets, self._maxes
        i = bisect_right(maxes, x)
        if i == len(maxes):
            # x is at least every stored value: nothing is above it.
            if not buckets:
                buckets.append([x])
                maxes.append(x)
                self._size = 1
                self._rebuild_tree()
                return 0
            i -= 1
            buckets[i].append(x)
            maxes[i] = x
            above = 0
        else:
            bucket = buckets[i]
            j = bisect_right(bucket, x)
            above = len(bucket) - j + self._size - self._prefix(i + 1)
            bucket.insert(j, x)
        self._size += 1
        self._bump(i)
        if len(buckets[i]) > 2 * self._LOAD:
            self._split(i)
        return above

    def count_above(self, x: float) -> int:
        """How many stored values are strictly greater than `x`."""
        i = bisect_right(self._maxes, x)
        if i == len(self._maxes):
            return 0
        bucket = self._buckets[i]
        return len(bucket) - bisect_right(bucket, x) + self._size - self._prefix(i + 1)

    def _split(self, i: int) -> None:
        bucket = self._buckets[i]
        half = len(bucket) // 2
        self._buckets[i:i + 1] = [bucket[:half], bucket[half:]]
        self._maxes[i:i + 1] = [bucket[half - 1], bucket[-1]]
        self._rebuild_tree()

    def _rebuild_tree(self) -> None:
        tree = [0] + [len(b) for b in self._buckets]
        for i in range(1, len(tree)):
            parent = i + (i & -i)
            if parent < len(tree):
                tree[parent] += tree[i]
        self._tree = tree

    def _bump(self, i: int) -> None:
        tree = self._tree
        i += 1
        while i < len(tree):
            tree[i] += 1
            i += i & -i

    def _prefix(self, i: int) -> int:
        """Total size of buckets `0 .. i-1`."""
        tree, total = self._tree, 0
        while i > 0:
            total += tree[i]
            i -= i & -i
        return total


class _Rung:
    """The entries of one rung: their scores, who entered with what decision, and how many
    were told to continue."""

    __slots__ = ("scores", "members", "continued", "waiting", "waiting_scores")

    def __init__(self) -> None:
        self.scores = _SortedScores()
        self.members: dict[int, Decision] = {}
        self.continued = 0
        # Promotion variant: trials paused here, awaiting promotion, best first:
        # (-rank key, trial_id); `waiting_scores` holds their rank keys.
        self.waiting: list[tuple[float, int]] = []
        self.waiting_scores: dict[int, float] = {}


def _rank_key(score: float) -> float:
    """The value a score is ranked by: NaN ranks below every other score."""
    return -math.inf if score != score else float(score)


def _check_real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return value  # type: ignore[return-value]


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


class HyperbandStopping(TrialScheduler):
    """Asynchronous successive halving with early stopping (see the module docstring).

    `assign_bracket` is a pure function of `(seed, trial_number)`; `on_report` depends only
    on the rung entries recorded so far and the trial's own entries, so a scheduler rebuilt
    with `load_rungs` decides every later report as the original would have.
    """

    kind = "hyperband_stopping"

    def __init__(self, max_t: float, grace_period: float = 1, reduction_factor: float = 3,
                 brackets: int = 1, seed: int = 0):
        max_t = _check_real("max_t", max_t)
        if max_t <= 0:
            raise ValueError(f"max_t must be > 0, got {max_t!r}")
        grace_period = _check_real("grace_period", grace_period)
        if grace_period <= 0:
            raise ValueError(f"grace_period must be > 0, got {grace_period!r}")
        reduction_factor = _check_real("reduction_factor", reduction_factor)
        if reduction_factor <= 1:
            raise ValueError(f"reduction_factor must be > 1 (an integer >= 2 or a float "
                             f"> 1), got {reduction_factor!r}")
        brackets = _check_int("brackets", brackets, 1)
        self.seed = _check_int("seed", seed, 0)
        self.max_t = max_t
        self.grace_period = grace_period
        self.reduction_factor = reduction_factor

        top = self._levels_from(0)
        if brackets > max(1, len(top)):
            raise ValueError(
                f"brackets={brackets} exceeds the {len(top)} rung level(s) available with "
                f"grace_period={grace_period:g}, reduction_factor={reduction_factor:g}, "
                f"max_t={max_t:g}")
        self.brackets = brackets
        self._levels = [tuple(top[b:]) for b in range(brackets)]
        self._level_index = [{lv: k for k, lv in enumerate(lvs)} for lvs in self._levels]
        self._rungs = [[_Rung() for _ in lvs] for lvs in self._levels]
        self._cum_probs = np.cumsum(self.bracket_probabilities()).tolist()
        # Per-trial cache: index of the next rung to enter, or _STOPPED. Derivable from the
        # rungs' members, so on_trial_end may drop it.
        self._next: dict[int, int] = {}

    def _levels_from(self, first: int) -> list[float]:
        levels, k = [], first
        while (level := self.grace_period * self.reduction_factor ** k) < self.max_t:
            levels.append(level)
            k += 1
        return levels

    def rung_levels(self, bracket: int) -> list[float]:
        """The rung levels of `bracket` (0-based), ascending, all below `max_t`."""
        self._check_bracket(bracket)
        return list(self._levels[bracket])

    def bracket_probabilities(self) -> list[float]:
        """The probability of each bracket in `assign_bracket`.

        Proportional to the number of configurations synchronous Hyperband starts in that
        bracket: with `L` rung levels in bracket 0 (so `s_max = L` halvings there) and
        `eta = reduction_factor`, bracket `b` makes `s = L - b` halvings and starts
        `n_b = (s_max + 1) / (s + 1) * eta ** s` configurations (before rounding up).
        Divided by `eta ** s_max` this is AutoGluon's weight `(L + 1) / ((L + 1 - b) * eta ** b)`.
        """
        n_levels = len(self._levels_from(0))
        weights = [(n_levels + 1) / ((n_levels + 1 - b) * self.reduction_factor ** b)
                   for b in range(self.brackets)]
        total = sum(weights)
        return [w / total for w in weights]

    def assign_bracket(self, trial_number: int) -> int:
        """The bracket of trial `trial_number`: 0 with one bracket, otherwise drawn with
        `bracket_probabilities()` from `np.random.default_rng([seed, trial_number])`."""
        if self.brackets == 1:
            return 0
        trial_number = _check_int("trial_number", trial_number, 0)
        u = float(np.random.default_rng([self.seed, trial_number]).random())
        return min(bisect_right(self._cum_probs, u), self.brackets - 1)

    def _check_bracket(self, bracket: int) -> None:
        if not (isinstance(bracket, Integral) and 0 <= bracket < self.brackets):
            raise ValueError(f"bracket must be in 0..{self.brackets - 1}, got {bracket!r}")

    def on_report(self, trial_id: int, bracket: int, time_value: float,
                  score: float) -> Outcome:
        """Decide one report (see the module docstring for the rule).

        Enters every rung of `bracket` at or below `time_value` that the trial has not
        entered, in ascending order, stopping at the first STOP; the new rows are in
        `Outcome.rungs`. A report at or past `max_t` is told STOP with `completed=True`,
        unless the trial had already been stopped at a rung (then STOP, not completed).
        """
        if not 0 <= bracket < self.brackets:
            self._check_bracket(bracket)
        nxt = self._next.get(trial_id)
        if nxt is None:
            nxt = self._next[trial_id] = self._restore_progress(trial_id, bracket)
        if nxt == _STOPPED:
            return _ALREADY_STOPPED
        levels = self._levels[bracket]
        if nxt < len(levels) and levels[nxt] <= time_value:
            return self._enter_rungs(trial_id, bracket, nxt, time_value, score)
        if time_value >= self.max_t:
            return Outcome(Decision.STOP, self._max_t_reason(), completed=True)
        return CONTINUE

    def _enter_rungs(self, trial_id: int, bracket: int, nxt: int, time_value: float,
                     score: float) -> Outcome:
        levels = self._levels[bracket]
        rows: list[RungEntry] = []
        reasons: list[str] = []
        decision = Decision.CONTINUE
        while nxt < len(levels) and levels[nxt] <= time_value:
            decision, reason = self._decide(self._rungs[bracket][nxt], trial_id, score)
            level = levels[nxt]
            rows.append(RungEntry(bracket, level, trial_id, score, decision))
            reasons.append(f"rung {level:g}: {reason}")
            nxt += 1
            if decision is Decision.STOP:
                break
        self._next[trial_id] = _STOPPED if decision is Decision.STOP else nxt
        if time_value >= self.max_t:
            reasons.append(self._max_t_reason())
            return Outcome(Decision.STOP, "; ".join(reasons), tuple(rows), completed=True)
        return Outcome(decision, "; ".join(reasons), tuple(rows))

    def _decide(self, rung: _Rung, trial_id: int, score: float) -> tuple[Decision, str]:
        """Enter `trial_id` into `rung` and apply the rule."""
        above = rung.scores.add(_rank_key(score))
        n = len(rung.scores)
        keeps = math.ceil(n / self.reduction_factor)
        reason = f"rank {above + 1} of {n}, keeps {keeps}"
        if rung.continued < keeps and above < keeps:
            decision = Decision.CONTINUE
            rung.continued += 1
        else:
            decision = Decision.STOP
            if rung.continued >= keeps:
                reason += f", {rung.continued} already continued"
        rung.members[trial_id] = decision
        return decision, reason

    def _max_t_reason(self) -> str:
        return f"reached max_t={self.max_t:g}"

    def _restore_progress(self, trial_id: int, bracket: int) -> int:
        """The trial's next rung index (or _STOPPED), read from the rungs' members."""
        k = 0
        for rung in self._rungs[bracket]:
            decision = rung.members.get(trial_id)
            if decision is None:
                break
            if decision is Decision.STOP:
                return _STOPPED
            k += 1
        return k

    def on_trial_end(self, trial_id: int) -> None:
        """Drop the trial's progress cache; its rung entries stay."""
        self._next.pop(trial_id, None)

    def load_rungs(self, entries: Iterable[RungEntry]) -> None:
        """Replay stored rung entries, in their stored order, into the rung memory.

        Raises ValueError for an entry whose bracket or level is not one of this
        scheduler's rungs, or that repeats a `(bracket, level, trial_id)` already held.
        """
        for e in entries:
            self._check_bracket(e.bracket)
            k = self._level_index[e.bracket].get(e.level)
            if k is None:
                raise ValueError(f"level {e.level!r} is not a rung of bracket {e.bracket}")
            rung = self._rungs[e.bracket][k]
            if e.trial_id in rung.members:
                raise ValueError(f"trial {e.trial_id} entered rung {e.level!r} of bracket "
                                 f"{e.bracket} twice")
            decision = Decision(e.decision)
            rung.scores.add(_rank_key(e.score))
            rung.members[e.trial_id] = decision
            if decision is Decision.CONTINUE:
                rung.continued += 1
            self._replayed(rung, e, decision)
            self._next.pop(e.trial_id, None)

    def _replayed(self, rung: _Rung, entry: RungEntry, decision: Decision) -> None:
        """What a subclass remembers beyond the rung's scores and members of a replayed
        entry; nothing here."""


class HyperbandPromotion(HyperbandStopping):
    """Asynchronous successive halving with promotion (ASHA; AutoGluon's
    `HyperbandScheduler`, `type='promotion'`; Li et al., "A System for Massively Parallel
    Hyperparameter Tuning", MLSys 2020).

    Brackets, levels and `assign_bracket` are those of `HyperbandStopping`. A trial that
    reaches a rung of its bracket enters it and is told PAUSE: it checkpoints, its process
    ends and its slot is free. `promote()` picks, from the highest rung down, the best trial
    waiting at a rung that ranks within the top ``floor(n / reduction_factor)`` of that
    rung's `n` entries (the trial's own entry counted, ties going to the lower trial id),
    while fewer than that many of the rung were promoted;
    the engine runs it again, from its checkpoint, up to the next rung. A report at or past
    `max_t` is told STOP with `completed=True`.

    The rung entries are the memory: a waiting trial's entry has decision PAUSE, a promoted
    one's CONTINUE (`promote` returns the entry to store in its place), so `load_rungs`
    rebuilds the scheduler.
    """

    kind = "hyperband_promotion"

    def on_report(self, trial_id: int, bracket: int, time_value: float,
                  score: float) -> Outcome:
        """PAUSE at the next rung the report reaches (one rung per run), STOP at max_t."""
        if not 0 <= bracket < self.brackets:
            self._check_bracket(bracket)
        nxt = self._next.get(trial_id)
        if nxt is None:
            nxt = self._next[trial_id] = self._restore_progress(trial_id, bracket)
        levels = self._levels[bracket]
        if time_value >= self.max_t:
            return Outcome(Decision.STOP, self._max_t_reason(), completed=True)
        if nxt < len(levels) and levels[nxt] <= time_value:
            level = levels[nxt]
            rung = self._rungs[bracket][nxt]
            key = _rank_key(score)
            rung.scores.add(key)
            rung.members[trial_id] = Decision.PAUSE
            heapq.heappush(rung.waiting, (-key, trial_id))
            rung.waiting_scores[trial_id] = key
            self._next[trial_id] = nxt + 1
            entry = RungEntry(bracket, level, trial_id, score, Decision.PAUSE)
            return Outcome(Decision.PAUSE, f"rung {level:g}: waits for promotion", (entry,))
        return CONTINUE

    def can_promote(self, busy: Collection[int] = ()) -> bool:
        """Whether `promote(busy)` would promote a trial now."""
        return self._candidate(busy) is not None

    def promote(self, busy: Collection[int] = ()) -> RungEntry | None:
        """Promote the best promotable waiting trial that is not in `busy` (trials told to
        pause whose process has not ended yet); its rung entry, now CONTINUE (to store in
        place of the PAUSE one), or None when no waiting trial is promotable."""
        found = self._candidate(busy)
        if found is None:
            return None
        bracket, k, neg_key, trial_id = found
        rung = self._rungs[bracket][k]
        rung.waiting.remove((neg_key, trial_id))
        heapq.heapify(rung.waiting)
        del rung.waiting_scores[trial_id]
        rung.members[trial_id] = Decision.CONTINUE
        rung.continued += 1
        return RungEntry(bracket, self._levels[bracket][k], trial_id, -neg_key,
                         Decision.CONTINUE)

    def _candidate(self, busy: Collection[int]) -> tuple[int, int, float, int] | None:
        """(bracket, rung index, -rank key, trial id) of the trial `promote` would pick."""
        best: tuple[float, int, int, float, int] | None = None
        for bracket, rungs in enumerate(self._rungs):
            for k in range(len(rungs) - 1, -1, -1):
                found = self._promotable(rungs[k], busy)
                if found is not None:
                    # Higher rungs first; across brackets, the higher level wins.
                    order = (-self._levels[bracket][k], bracket, k, *found)
                    if best is None or order < best:
                        best = order
                    break
        return None if best is None else best[1:]

    def _promotable(self, rung: _Rung, busy: Collection[int]) -> tuple[float, int] | None:
        """The best waiting entry of `rung` not in `busy`, if it ranks in the top
        floor(n / reduction_factor) of the rung."""
        top = math.floor(len(rung.scores) / self.reduction_factor)
        if not rung.waiting or rung.continued >= top:
            return None
        for neg_key, trial_id in heapq.nsmallest(len(busy) + 1, rung.waiting):
            if rung.scores.count_above(-neg_key) >= top:
                return None
            if trial_id not in busy:
                return neg_key, trial_id
        return None

    def holds(self, trial_id: int) -> bool:
        """Whether the trial is paused at a rung, waiting for promotion."""
        return any(trial_id in rung.waiting_scores
                   for rungs in self._rungs for rung in rungs)

    def waiting(self) -> list[int]:
        """The trials waiting at rungs, in no particular order."""
        return [t for rungs in self._rungs for rung in rungs for t in rung.waiting_scores]

    def on_trial_end(self, trial_id: int) -> None:
        """A trial that ends (stopped by the user, failed, retired) waits no more."""
        super().on_trial_end(trial_id)
        for rungs in self._rungs:
            for rung in rungs:
                if rung.waiting_scores.pop(trial_id, None) is not None:
                    rung.waiting = [w for w in rung.waiting if w[1] != trial_id]
                    heapq.heapify(rung.waiting)

    def _replayed(self, rung: _Rung, entry: RungEntry, decision: Decision) -> None:
        """A replayed PAUSE entry waits for promotion; a CONTINUE one was promoted."""
        if decision is not Decision.CONTINUE:
            key = _rank_key(entry.score)
            heapq.heappush(rung.waiting, (-key, entry.trial_id))
            rung.waiting_scores[entry.trial_id] = key

    def _restore_progress(self, trial_id: int, bracket: int) -> int:
        k = 0
        for rung in self._rungs[bracket]:
            if trial_id not in rung.members:
                break
            k += 1
        return k
