"""`Store.count_trials` (trials by state, read by `status` at every call) against a plain
count, for any mix of states."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from tuned.store import Store

STATES = ["PENDING", "RUNNING", "PAUSED", "COMPLETED", "STOPPED", "FAILED"]


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
