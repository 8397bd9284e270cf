"""What `status`, `trials` and `curves` read from the store stays independent of the number
of trials: `Store.count_trials` (trials by state, kept by triggers since schema v5) against
a plain count for any mix of states and transitions, committed or rolled back; pages of
trials counted from either end; the curves of the best trials. Real SQLite files."""

from __future__ import annotations

import sqlite3
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tuned.core.decisions import Decision, TrialState
from tuned.store.database import Store

STATES = ["PENDING", "RUNNING", "PAUSED", "COMPLETED", "STOPPED", "FAILED"]


def _plain_counts(store: Store, experiment_id: int) -> dict[str, int]:
    """Trials by state by scanning the trials table: what count_trials must equal."""
    return dict(store.conn.execute(
        "SELECT state, COUNT(*) FROM trials WHERE experiment_id = ? GROUP BY state "
        "ORDER BY state", (experiment_id,)).fetchall())


def _tables_read(store: Store, fn) -> set[str]:
    """The tables SQLite reads while `fn()` runs (through an authorizer)."""
    seen: set[str] = set()

    def authorize(action, table, column, db, trigger):
        if action == sqlite3.SQLITE_READ and table:
            seen.add(table)
        return sqlite3.SQLITE_OK

    store.conn.set_authorizer(authorize)
    try:
        fn()
    finally:
        store.conn.set_authorizer(None)
    return seen


@settings(max_examples=25, deadline=None)
@given(st.lists(st.sampled_from(STATES), max_size=40), st.lists(st.sampled_from(STATES),
                                                                 max_size=10))
def test_count_trials_counts_each_state_of_its_experiment(tmp_path_factory, mine, others):
    store = Store(tmp_path_factory.mktemp("db") / "t.db", preallocate=False)
    try:
        exp, other = (store.create_experiment(n, {}).id for n in ("a", "b"))
        for exp_id, states in ((exp, mine), (other, others)):
            for number, state in enumerate(states):
                tid = store.add_trial(exp_id, number, {"x": number}, 0)
                store.conn.execute("UPDATE trials SET state = ? WHERE id = ?", (state, tid))
        counts = store.count_trials(exp)
        assert counts == dict(Counter(mine))
        assert list(counts) == sorted(counts)
        assert store.count_trials(other + 1) == {}
    finally:
        store.close()


# Store operations a trial goes through, by name: (method, arguments after the trial id).
OPS = {
    "claim": ("claim_trial", (7,)),
    "requeue": ("requeue_trial", ()),
    "pause": ("pause_trial", ()),
    "unpause": ("unpause_trial", ()),
    "complete": ("finish_trial", (TrialState.COMPLETED,)),
    "fail": ("finish_trial", (TrialState.FAILED, "boom")),
}
STEP = st.tuples(st.sampled_from(["add", *OPS]), st.integers(0, 30), st.booleans(),
                 st.booleans())


@settings(max_examples=40, deadline=None)
@given(st.lists(STEP, max_size=60))
def test_counts_follow_every_transition_committed_or_rolled_back(tmp_path_factory, steps):
    """Any sequence of adds and transitions over two experiments, each step committed or
    rolled back (an exception inside its transaction): the kept counts equal a scan."""
    store = Store(tmp_path_factory.mktemp("db") / "t.db", preallocate=False)
    try:
        exps = [store.create_experiment(n, {}).id for n in ("a", "b")]
        trials: list[int] = []
        for op, pick, second, rollback in steps:
            try:
                with store.transaction():
                    if op == "add" or not trials:
                        exp = exps[second]
                        number = store.conn.execute(
                            "SELECT COUNT(*) FROM trials WHERE experiment_id = ?",
                            (exp,)).fetchone()[0]
                        trials.append(store.add_trial(exp, number, {}, 0))
                    else:
                        method, args = OPS[op]
                        getattr(store, method)(trials[pick % len(trials)], *args)
                    if rollback:
                        raise RuntimeError("rolled back")
            except RuntimeError:
                trials = [t for t in trials if _exists(store, t)]
            for exp in exps:
                assert store.count_trials(exp) == _plain_counts(store, exp)
    finally:
        store.close()


def _exists(store: Store, trial_id: int) -> bool:
    return store.conn.execute("SELECT 1 FROM trials WHERE id = ?",
                              (trial_id,)).fetchone() is not None


def test_count_trials_does_not_read_the_trials(tmp_path):
    store = Store(tmp_path / "t.db", preallocate=False)
    try:
        exp = store.create_experiment("a", {}).id
        for number in range(5):
            store.add_trial(exp, number, {}, 0)
        tables = _tables_read(store, lambda: store.count_trials(exp))
        assert tables == {"trial_counts"}
    finally:
        store.close()


def _filled(tmp_path, n: int, scores: list[float | None] | None = None) -> tuple[Store, int]:
    """A store with one experiment of `n` trials; trial i reports scores[i] (None: none)."""
    store = Store(tmp_path / "t.db", preallocate=False)
    exp = store.create_experiment("a", {}).id
    with store.transaction():
        for number in range(n):
            tid = store.add_trial(exp, number, {"x": number}, 0)
            score = scores[number] if scores else None
            if score is not None:
                for seq in (1, 2):
                    store.record_report(tid, seq, float(seq), score * seq, score * seq,
                                        f'{{"acc":{score * seq},"t":{seq}}}',
                                        Decision.CONTINUE)
    return store, exp


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 12), st.one_of(st.none(), st.integers(0, 15)), st.integers(-20, 15))
def test_a_page_of_trials_is_a_window_counted_from_either_end(tmp_path_factory, n, limit,
                                                              offset):
    store, exp = _filled(tmp_path_factory.mktemp("db"), n)
    try:
        start = offset if offset >= 0 else n + offset
        stop = n if limit is None else start + limit
        want = [i for i in range(n) if start <= i < stop]
        assert [t.number for t in store.trials(exp, limit=limit, offset=offset)] == want
    finally:
        store.close()


def test_the_last_page_is_read_from_the_end(tmp_path):
    """The last 3 of 2,000 trials: SQLite steps over a few rows, not the 2,000."""
    store, exp = _filled(tmp_path, 2000)
    try:
        store.conn.set_progress_handler(None, 0)
        steps = []
        store.conn.set_progress_handler(lambda: steps.append(1), 100)
        page = store.trials(exp, limit=3, offset=-3)
        store.conn.set_progress_handler(None, 0)
        assert [t.number for t in page] == [1997, 1998, 1999]
        assert len(steps) < 20
    finally:
        store.close()


@pytest.mark.parametrize("top", [0, 1, 3, 10])
def test_curves_and_history_of_the_best_trials(tmp_path, top):
    scores = [0.3, None, 0.9, 0.5, 0.9, 0.1, None]
    store, exp = _filled(tmp_path, len(scores), scores)
    try:
        ranked = sorted((n for n, s in enumerate(scores) if s is not None),
                        key=lambda n: (-scores[n], n))
        chosen = sorted(ranked[:top])
        curves = store.reward_curves(exp, top)
        assert list(curves) == chosen
        assert all(curves[n] == [[1.0, 2.0], [scores[n], scores[n] * 2]] for n in chosen)
        history = store.history(exp, top)
        assert list(history) == chosen
        assert all([m["acc"] for m in history[n]] == [scores[n], scores[n] * 2]
                   for n in chosen)
        everything = store.history(exp)
        assert list(everything) == list(range(len(scores))) and everything[1] == []
    finally:
        store.close()
