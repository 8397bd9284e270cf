"""Tests of the asynchronous successive-halving scheduler (stopping variant)."""

from __future__ import annotations

import math
from collections import defaultdict
from functools import partial

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tuned.core.decisions import Decision
from tuned.core.schedulers import CONTINUE, HyperbandStopping, RungEntry
from tuned.core.schedulers.hyperband import _SortedScores

# --- rung levels and arguments ---------------------------------------------------------


def test_tutorial_rung_levels():
    sched = HyperbandStopping(max_t=10, grace_period=1, reduction_factor=3)
    assert sched.rung_levels(0) == [1, 3, 9]
    assert sched.kind == "hyperband_stopping"


def test_rung_levels_of_several_brackets():
    sched = HyperbandStopping(max_t=81, grace_period=1, reduction_factor=3, brackets=4)
    assert [sched.rung_levels(b) for b in range(4)] == [[1, 3, 9, 27], [3, 9, 27], [9, 27],
                                                        [27]]
    sched = HyperbandStopping(max_t=100, grace_period=2, reduction_factor=2, brackets=3)
    assert sched.rung_levels(0) == [2, 4, 8, 16, 32, 64]
    assert sched.rung_levels(2) == [8, 16, 32, 64]
    assert HyperbandStopping(max_t=10, reduction_factor=2.5).rung_levels(0) == [1, 2.5, 6.25]


def test_no_rungs_when_grace_period_reaches_max_t():
    sched = HyperbandStopping(max_t=5, grace_period=5)
    assert sched.rung_levels(0) == []
    assert sched.on_report(1, 0, 4, 0.5) is CONTINUE
    out = sched.on_report(1, 0, 5, 0.5)
    assert (out.decision, out.completed, out.rungs) == (Decision.STOP, True, ())


@pytest.mark.parametrize("kwargs, name", [
    ({"max_t": 0}, "max_t"),
    ({"max_t": -1}, "max_t"),
    ({"max_t": float("nan")}, "max_t"),
    ({"max_t": "10"}, "max_t"),
    ({"max_t": 10, "grace_period": 0}, "grace_period"),
    ({"max_t": 10, "grace_period": -2}, "grace_period"),
    ({"max_t": 10, "reduction_factor": 1}, "reduction_factor"),
    ({"max_t": 10, "reduction_factor": 0.5}, "reduction_factor"),
    ({"max_t": 10, "brackets": 0}, "brackets"),
    ({"max_t": 10, "brackets": 1.5}, "brackets"),
    ({"max_t": 10, "brackets": 4}, "brackets"),
    ({"max_t": 5, "grace_period": 5, "brackets": 2}, "brackets"),
    ({"max_t": 10, "seed": -1}, "seed"),
])
def test_argument_validation_names_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        HyperbandStopping(**kwargs)


def test_too_many_brackets_says_how_many_levels():
    with pytest.raises(ValueError, match="3 rung level"):
        HyperbandStopping(max_t=10, brackets=4)


def test_bad_bracket_is_refused():
    sched = HyperbandStopping(max_t=10)
    with pytest.raises(ValueError, match="bracket"):
        sched.on_report(1, 1, 1, 0.5)
    with pytest.raises(ValueError, match="bracket"):
        sched.rung_levels(-1)


# --- the rule at one rung --------------------------------------------------------------


def test_max_t_gives_completed():
    sched = HyperbandStopping(max_t=10)
    out = sched.on_report(1, 0, 10, 0.9)
    assert out.decision is Decision.STOP and out.completed
    # A jump past rungs records them first; the first rung entry of each rung continues.
    assert [(r.level, r.decision) for r in out.rungs] == [(1, Decision.CONTINUE),
                                                          (3, Decision.CONTINUE),
                                                          (9, Decision.CONTINUE)]


def test_rule_at_one_rung():
    sched = HyperbandStopping(max_t=10)
    decisions = [sched.on_report(t, 0, 1, s).decision
                 for t, s in enumerate([0.5, 0.9, 0.1, 0.95, 0.2, 0.3, 0.99])]
    # n=1 k=1 c=0 top -> C; n=2 k=1 c=1 -> S; n=3 -> S; n=4 k=2 c=1 rank 0 -> C;
    # n=5 k=2 c=2 -> S; n=6 -> S; n=7 k=3 c=2 rank 0 -> C
    C, S = Decision.CONTINUE, Decision.STOP
    assert decisions == [C, S, S, C, S, S, C]
    out = sched.on_report(7, 0, 1, 0.0)
    assert out.reason == "rung 1: rank 8 of 8, keeps 3, 3 already continued"


def test_no_rung_entered_twice_and_stop_sticks():
    sched = HyperbandStopping(max_t=10)
    assert sched.on_report(1, 0, 1, 0.5).rungs
    assert sched.on_report(1, 0, 1, 0.6) is CONTINUE
    assert sched.on_report(1, 0, 2, 0.6) is CONTINUE
    assert sched.on_report(2, 0, 1, 0.1).decision is Decision.STOP
    again = sched.on_report(2, 0, 3, 0.9)
    assert again.decision is Decision.STOP and again.rungs == ()


def test_on_trial_end_keeps_rungs():
    sched = HyperbandStopping(max_t=10)
    sched.on_report(1, 0, 1, 0.5)
    sched.on_trial_end(1)
    # A retried trial does not re-enter rung 1.
    assert sched.on_report(1, 0, 1, 0.5) is CONTINUE
    sched.on_report(2, 0, 1, 0.1)
    sched.on_trial_end(2)
    assert sched.on_report(2, 0, 3, 0.9).decision is Decision.STOP


def test_load_rungs_refuses_unknown_level_and_duplicates():
    sched = HyperbandStopping(max_t=10)
    with pytest.raises(ValueError, match="level"):
        sched.load_rungs([RungEntry(0, 2, 1, 0.5, Decision.STOP)])
    row = RungEntry(0, 1, 1, 0.5, Decision.CONTINUE)
    sched.load_rungs([row])
    with pytest.raises(ValueError, match="twice"):
        sched.load_rungs([row])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(allow_nan=True, allow_infinity=True) | st.integers(-3, 3),
                max_size=200))
def test_sorted_scores_counts_values_above(values):
    class Small(_SortedScores):
        _LOAD = 2

    scores, seen = Small(), []
    for v in values:
        key = -math.inf if v != v else float(v)
        assert scores.add(key) == sum(1 for s in seen if s > key)
        seen.append(key)
        assert len(scores) == len(seen)


# --- random report sequences -----------------------------------------------------------

CONFIGS = [  # (max_t, reduction_factor, brackets)
    (30, 3, 1), (30, 3, 3), (30, 2, 4), (20, 2.5, 2),
]

report_ops = st.lists(
    st.tuples(st.integers(0, 11),                                   # trial
              st.integers(1, 6),                                    # time step
              st.floats(-1, 1) | st.sampled_from([0.0, 0.5, float("nan")])),  # score
    max_size=150)


def drive(sched, ops, times=None):
    """Feed `ops` to `sched` (times increase per trial, from `times`); return
    [(trial, outcome)]."""
    times = {} if times is None else times
    log = []
    for trial, step, score in ops:
        times[trial] = times.get(trial, 0) + step
        out = sched.on_report(trial, sched.assign_bracket(trial), times[trial], score)
        log.append((trial, out))
    return log


def key(log):
    return [(t, o.decision, o.reason, o.rungs, o.completed) for t, o in log]


@settings(max_examples=80, deadline=None)
@given(st.sampled_from(CONFIGS), st.integers(0, 3), report_ops)
def test_rungs_keep_at_most_a_fraction(config, seed, ops):
    max_t, rf, brackets = config
    sched = HyperbandStopping(max_t=max_t, reduction_factor=rf, brackets=brackets, seed=seed)
    scores = defaultdict(list)   # (bracket, level) -> rank keys, a brute-force model
    continued = defaultdict(int)
    seen, stopped = set(), set()
    for trial, out in drive(sched, ops):
        rows = out.rungs
        if trial in stopped:
            assert out.decision is Decision.STOP and rows == ()
        for i, row in enumerate(rows):
            assert row.trial_id == trial
            assert (row.bracket, row.level, trial) not in seen
            seen.add((row.bracket, row.level, trial))
            rung = (row.bracket, row.level)
            key_ = -math.inf if row.score != row.score else row.score
            above = sum(1 for s in scores[rung] if s > key_)
            scores[rung].append(key_)
            keeps = math.ceil(len(scores[rung]) / rf)
            expect = continued[rung] < keeps and above < keeps
            assert (row.decision is Decision.CONTINUE) == expect
            continued[rung] += expect
            assert continued[rung] <= math.ceil(len(scores[rung]) / rf)
            if row.decision is Decision.STOP:
                assert i == len(rows) - 1  # nothing after a STOP in the same report
                assert out.decision is Decision.STOP
        if any(r.decision is Decision.STOP for r in rows):
            stopped.add(trial)
        if out.completed:
            stopped.add(trial)
        assert out.decision is Decision.STOP or not out.completed


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(CONFIGS), st.integers(0, 3), report_ops, st.data())
def test_replay_equals_live(config, seed, ops, data):
    max_t, rf, brackets = config
    make = partial(HyperbandStopping, max_t=max_t, reduction_factor=rf, brackets=brackets,
                   seed=seed)
    cut = data.draw(st.integers(0, len(ops)))
    live, times = make(), {}
    head = drive(live, ops[:cut], times)
    rows = [r for _, out in head for r in out.rungs]

    rebuilt = make()
    rebuilt.load_rungs(rows)
    live_tail = drive(live, ops[cut:], dict(times))
    assert key(drive(rebuilt, ops[cut:], dict(times))) == key(live_tail)

    fresh = make()
    assert key(drive(fresh, ops)) == key(head + live_tail)


# --- the tutorial's shape --------------------------------------------------------------


def test_tutorial_like_run_stops_most_trials_early():
    rng = np.random.default_rng(2024)
    sched = HyperbandStopping(max_t=10, grace_period=1, reduction_factor=3)
    last_epoch = {}
    for trial in range(100):
        for e in range(10):
            accuracy = 1 - 1.8 ** -rng.uniform(e, 2 * e)
            out = sched.on_report(trial, 0, e + 1, accuracy)
            if out.decision is Decision.STOP:
                assert out.completed == (e + 1 == 10)
                break
        last_epoch[trial] = e + 1
        sched.on_trial_end(trial)
    early = sum(1 for e in last_epoch.values() if e in (1, 3))
    full = sum(1 for e in last_epoch.values() if e == 10)
    assert set(last_epoch.values()) <= {1, 3, 9, 10}
    assert early >= 60
    assert 1 <= full <= 15


# --- brackets --------------------------------------------------------------------------


def test_bracket_assignment_is_deterministic_and_uses_every_bracket():
    a = HyperbandStopping(max_t=81, brackets=4, seed=7)
    b = HyperbandStopping(max_t=81, brackets=4, seed=7)
    drawn = [a.assign_bracket(n) for n in range(1000)]
    assert drawn == [b.assign_bracket(n) for n in range(1000)]
    assert drawn == [a.assign_bracket(n) for n in range(1000)]
    assert set(drawn) == {0, 1, 2, 3}
    counts = [drawn.count(k) for k in range(4)]
    assert counts == sorted(counts, reverse=True)  # the aggressive bracket is the likeliest
    other = HyperbandStopping(max_t=81, brackets=4, seed=8)
    assert drawn != [other.assign_bracket(n) for n in range(1000)]
    assert HyperbandStopping(max_t=81).assign_bracket(5) == 0


def test_bracket_probabilities_follow_synchronous_hyperband():
    sched = HyperbandStopping(max_t=81, brackets=4)
    # L = 4 levels: weights (L+1) / ((L+1-b) * 3**b) = 1, 5/12, 5/27, 5/54
    weights = [1, 5 / 12, 5 / 27, 5 / 54]
    assert sched.bracket_probabilities() == pytest.approx([w / sum(weights) for w in weights])


def test_trial_in_a_later_bracket_uses_its_rungs():
    sched = HyperbandStopping(max_t=81, brackets=4)
    assert sched.on_report(1, 2, 8, 0.5) is CONTINUE
    out = sched.on_report(1, 2, 9, 0.5)
    assert [(r.bracket, r.level) for r in out.rungs] == [(2, 9)]


def test_load_rungs_updates_a_trial_already_seen():
    sched = HyperbandStopping(max_t=10)
    assert sched.on_report(1, 0, 0.5, 0.2) is CONTINUE
    sched.load_rungs([RungEntry(0, 1, 1, 0.2, Decision.CONTINUE)])
    assert sched.on_report(1, 0, 1, 0.2) is CONTINUE  # rung 1 is not entered again


# --- promotion variant ------------------------------------------------------------------


def test_promotion_pauses_at_each_rung_and_promotes_the_top_fraction():
    from tuned.core.schedulers.hyperband import HyperbandPromotion

    sched = HyperbandPromotion(max_t=9, grace_period=1, reduction_factor=3)
    assert sched.kind == "hyperband_promotion"
    assert sched.on_report(1, 0, 0.5, 0.1) is CONTINUE  # below the first rung
    out = sched.on_report(1, 0, 1, 0.5)
    assert out.decision is Decision.PAUSE and out.rungs == (
        RungEntry(0, 1, 1, 0.5, Decision.PAUSE),)
    assert sched.holds(1) and not sched.can_promote()  # floor(1/3) = 0
    sched.on_report(2, 0, 1, 0.9)
    sched.on_report(3, 0, 1, 0.2)
    assert sched.waiting() and sched.can_promote()  # floor(3/3) = 1: the best, trial 2
    assert not sched.can_promote(busy={2})  # its process has not ended yet
    entry = sched.promote()
    assert entry == RungEntry(0, 1, 2, 0.9, Decision.CONTINUE)
    assert not sched.holds(2) and sched.promote() is None  # only one of three goes on
    out = sched.on_report(2, 0, 3, 0.95)  # the promoted trial pauses at the next rung
    assert out.decision is Decision.PAUSE and out.rungs[0].level == 3
    assert sched.on_report(2, 0, 9, 0.99).completed
    for t, score in ((4, 0.7), (5, 0.6), (6, 0.3)):
        sched.on_report(t, 0, 1, score)
    promoted = [sched.promote().trial_id, sched.promote()]
    assert promoted == [4, None]  # floor(6/3) = 2: trials 2 and 4


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 11), st.floats(0, 1)), min_size=1, max_size=120),
       st.data())
def test_promotion_replay_equals_live_and_never_promotes_twice(ops, data):
    from tuned.core.schedulers.hyperband import HyperbandPromotion

    live = HyperbandPromotion(max_t=27, grace_period=1, reduction_factor=3, brackets=2)
    stored: dict[tuple[int, float, int], RungEntry] = {}
    progress: dict[int, float] = defaultdict(float)
    promoted: set[tuple[int, float, int]] = set()
    for trial, score in ops:
        if live.holds(trial):
            continue
        progress[trial] += data.draw(st.sampled_from([1, 2, 3]))
        out = live.on_report(trial, live.assign_bracket(trial), progress[trial], score)
        for e in out.rungs:
            stored[(e.bracket, e.level, e.trial_id)] = e
        if data.draw(st.booleans()) and (e := live.promote()) is not None:
            key = (e.bracket, e.level, e.trial_id)
            assert key not in promoted and stored[key].decision is Decision.PAUSE
            promoted.add(key)
            stored[key] = e
            n = sum(1 for k in stored if k[:2] == key[:2])
            assert sum(1 for k in promoted if k[:2] == key[:2]) <= math.floor(n / 3)
    replayed = HyperbandPromotion(max_t=27, grace_period=1, reduction_factor=3, brackets=2)
    replayed.load_rungs(stored.values())
    assert sorted(replayed.waiting()) == sorted(live.waiting())
    while (a := live.promote()) is not None:
        assert replayed.promote() == a
    assert replayed.promote() is None
