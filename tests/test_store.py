"""The store's contract, on real SQLite files in temporary directories."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import sys
import time

import pytest

from tuned.core.decisions import Decision, TrialState
from tuned.core.schedulers.base import RungEntry
from tuned.store.database import (
    SCHEMA_VERSION,
    NameTaken,
    NewReport,
    NotFound,
    SchemaTooNew,
    Store,
    StoreCorrupt,
    StoreError,
    StoreLocked,
    TrialProcess,
)


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "t.db")
    yield s
    s.close()


def _trial(store: Store, number: int = 0) -> tuple[int, int]:
    exp = store.experiments()[0].id if store.experiments() else store.create_experiment(
        "e", {"k": 1}).id
    tid = store.add_trial(exp, number, {"x": number}, 0, {"v": 1, "n": number})
    return exp, tid


def test_pragmas_are_wal_and_full(store):
    assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.conn.execute("PRAGMA synchronous").fetchone()[0] == 2
    assert store.schema_version() == SCHEMA_VERSION


def test_experiment_names_are_unique(store):
    store.create_experiment("a", {})
    with pytest.raises(NameTaken, match="'a'"):
        store.create_experiment("a", {})
    assert store.unique_name("a") == "a-2"
    store.create_experiment("a-2", {})
    assert store.unique_name("a") == "a-3"
    assert store.unique_name("b") == "b"
    with pytest.raises(NotFound):
        store.experiment("nope")


def test_suggestion_is_stored_with_searcher_state(store):
    exp, tid = _trial(store)
    assert store.trial(tid).state == "PENDING"
    assert store.searcher_state(exp) == {"v": 1, "n": 0}


def test_searcher_state_parts_written_only_when_changed(store):
    exp = store.create_experiment("e", {}).id
    store.save_searcher_state(exp, {"big": [1, 2, 3], "rng": 1})
    before = store.conn.total_changes
    store.save_searcher_state(exp, {"big": [1, 2, 3], "rng": 2})
    assert store.conn.total_changes - before == 1
    store.save_searcher_state(exp, {"rng": 3})
    assert store.searcher_state(exp) == {"rng": 3}


def test_claim_and_finish_are_compare_and_set(store):
    _, tid = _trial(store)
    assert store.claim_trial(tid, 123)
    assert not store.claim_trial(tid, 456)
    assert store.trial(tid).pid == 123
    assert store.finish_trial(tid, TrialState.COMPLETED)
    assert not store.finish_trial(tid, TrialState.FAILED, "late")
    assert not store.requeue_trial(tid)
    t = store.trial(tid)
    assert (t.state, t.error) == ("COMPLETED", None)


def test_requeue_counts_the_attempt(store):
    _, tid = _trial(store)
    store.claim_trial(tid, 1)
    assert store.requeue_trial(tid)
    t = store.trial(tid)
    assert (t.state, t.attempt, t.pid) == ("PENDING", 2, None)


def test_report_is_stored_exactly_once(store):
    exp, tid = _trial(store)
    store.claim_trial(tid, 1)
    rung = RungEntry(0, 1.0, tid, 0.5, Decision.CONTINUE)
    d = store.record_report(tid, 1, 1.0, 0.5, 0.5, '{"a":0.5}', Decision.CONTINUE, (rung,), exp)
    assert d == "continue"
    # A resend of seq 1 with another decision gets the stored one back and writes nothing.
    d = store.record_report(tid, 1, 1.0, 0.9, 0.9, '{"a":0.9}', Decision.STOP, (rung,), exp)
    assert d == "continue"
    assert [r.metrics for r in store.reports(tid)] == [{"a": 0.5}]
    assert store.rungs(exp) == [rung]
    assert store.trial(tid).last_reward == 0.5


def test_reports_stored_together_update_each_trial_from_its_last(store):
    exp, a = _trial(store, 0)
    _, b = _trial(store, 1)
    rung = RungEntry(0, 1.0, a, 0.5, Decision.CONTINUE)
    store.record_reports(exp, [
        NewReport(a, 1, 1.0, 0.5, 0.5, '{"a":0.5}', Decision.CONTINUE, (rung,)),
        NewReport(b, 1, 1.0, 0.2, -0.2, '{"a":0.2}', Decision.CONTINUE),
        NewReport(a, 2, 2.0, 0.7, 0.7, '{"a":0.7}', Decision.STOP),
    ])
    assert [(r.seq, r.metrics, r.decision) for r in store.reports(a)] == [
        (1, {"a": 0.5}, "continue"), (2, {"a": 0.7}, "stop")]
    assert [(r.seq, r.metrics) for r in store.reports(b)] == [(1, {"a": 0.2})]
    ta, tb = store.trial(a), store.trial(b)
    assert (ta.last_seq, ta.last_time, ta.last_reward, ta.score) == (2, 2.0, 0.7, 0.7)
    assert (tb.last_seq, tb.last_time, tb.last_reward, tb.score) == (1, 1.0, 0.2, -0.2)
    assert store.rungs(exp) == [rung]


def test_reports_stored_together_must_be_new_or_nothing_is_kept(store):
    exp, tid = _trial(store)
    store.record_report(tid, 1, 1.0, 0.5, 0.5, '{"a":0.5}', Decision.CONTINUE)
    with pytest.raises(StoreError, match="not new"):
        store.record_reports(exp, [
            NewReport(tid, 2, 2.0, 0.6, 0.6, '{"a":0.6}', Decision.CONTINUE),
            NewReport(tid, 1, 1.0, 0.9, 0.9, '{"a":0.9}', Decision.STOP),
        ])
    assert [(r.seq, r.metrics) for r in store.reports(tid)] == [(1, {"a": 0.5})]
    assert store.trial(tid).last_seq == 1


def test_best_trial_and_history(store):
    exp = store.create_experiment("e", {}).id
    for n, reward in enumerate([0.3, 0.9, 0.9, 0.1]):
        tid = store.add_trial(exp, n, {"x": n}, 0)
        store.record_report(tid, 1, 1, reward, reward, json.dumps({"acc": reward}),
                            Decision.CONTINUE)
    best = store.best_trial(exp)
    assert (best.number, best.config) == (1, {"x": 1})
    assert store.history(exp) == {n: [{"acc": r}] for n, r in enumerate([0.3, 0.9, 0.9, 0.1])}
    assert store.count_trials(exp) == {"PENDING": 4}


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "t.db"
    Store(path).close()
    c = sqlite3.connect(path)
    c.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    c.close()
    with pytest.raises(SchemaTooNew, match="upgrade tuned"):
        Store(path)


def test_corrupt_file_is_refused_and_left_untouched(tmp_path):
    path = tmp_path / "t.db"
    path.write_bytes(b"this is not a database at all" * 100)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(StoreCorrupt, match="left untouched"):
        Store(path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


def test_locked_database_times_out_with_a_clear_error(tmp_path):
    path = tmp_path / "t.db"
    Store(path).close()
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sqlite3, sys, time\n"
         f"c = sqlite3.connect({str(path)!r}, isolation_level=None)\n"
         "c.execute('BEGIN IMMEDIATE'); print('locked', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        start = time.monotonic()
        with pytest.raises(StoreLocked, match="locked by another process"):
            Store(path, timeout=0.3).create_experiment("e", {})
        assert time.monotonic() - start < 5
        store = Store(path, timeout=0.3, preallocate=False)
        with pytest.raises(StoreLocked, match="locked by another process"):
            store.create_experiment("e", {})
    finally:
        holder.kill()
        holder.wait()


def test_migration_runs_from_an_empty_file(tmp_path):
    path = tmp_path / "t.db"
    sqlite3.connect(path).close()
    s = Store(path)
    tables = {r[0] for r in s.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"experiments", "trials", "reports", "rungs", "searcher_state"} <= tables
    assert s.schema_version() == SCHEMA_VERSION


def test_failed_transaction_leaves_nothing(store):
    exp = store.create_experiment("e", {}).id
    with pytest.raises(RuntimeError):
        with store.transaction():
            store.add_trial(exp, 0, {"x": 0}, 0, {"s": 1})
            raise RuntimeError("boom")
    assert store.trials(exp) == []
    assert store.searcher_state(exp) is None
    # The part cache did not remember the rolled-back write.
    store.save_searcher_state(exp, {"s": 1})
    assert store.searcher_state(exp) == {"s": 1}


def test_a_version_1_database_is_migrated_to_the_current_schema(tmp_path):
    from tuned.store.database import MIGRATIONS

    path = tmp_path / "old.db"
    import sqlite_utils

    conn = sqlite3.connect(path)
    MIGRATIONS[1](sqlite_utils.Database(conn))
    conn.execute("PRAGMA user_version = 1")
    conn.execute("INSERT INTO experiments (name, spec, state, created, updated) "
                 "VALUES ('old', '{}', 'RUNNING', 0, 0)")
    conn.execute("INSERT INTO trials (experiment_id, number, config, state, created) "
                 "VALUES (1, 0, '{\"x\": 1}', 'RUNNING', 0)")
    conn.commit()
    conn.close()
    store = Store(path)
    assert store.schema_version() == SCHEMA_VERSION
    (trial,) = store.trials(store.experiment("old").id)
    assert trial.config == {"x": 1}
    assert store.trial_process(trial.id) == TrialProcess(None, None, [])
    assert store.claim_trial(trial.id, 5, 77) is False  # RUNNING already
    store.requeue_trial(trial.id)
    assert store.claim_trial(trial.id, 5, 77, ["GPU-a", "GPU-b"])
    assert store.trial_process(trial.id) == TrialProcess(5, 77, ["GPU-a", "GPU-b"])


def test_process_start_time_names_a_process():
    import os

    from tuned.executors.local import process_start_time

    mine = process_start_time(os.getpid())
    assert isinstance(mine, int) and mine > 0
    assert process_start_time(os.getpid()) == mine
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert process_start_time(child.pid) is None
