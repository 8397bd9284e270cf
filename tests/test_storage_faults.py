"""Storage faults on real SQLite files and real processes: databases of every schema version
tuned shipped, migrations killed halfway, a disk that fills under the engine and under the
daemon, a database locked by another process, and corrupt files."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from helpers import Daemon, write_spec
from make_fixtures import schema

import tuned as ag
from tuned.store.database import (
    SCHEMA_VERSION,
    Store,
    StoreCorrupt,
    StoreLocked,
)

FIXTURES = Path(__file__).parent / "fixtures"
MANIFEST: dict[str, Any] = json.loads((FIXTURES / "manifest.json").read_text())
# Every schema version with a frozen fixture (tests/make_fixtures.py makes one per version).
VERSIONS = sorted(int(v) for v in MANIFEST["versions"])
# A file size limit below anything SQLite writes at the end of its WAL: every commit fails.
FULL = 4096

# -- helpers ---------------------------------------------------------------------------------


def _fixture(version: int, dest: Path) -> Path:
    """A copy of the frozen database of schema `version` at `dest` (the original is never
    opened)."""
    shutil.copyfile(FIXTURES / f"schema-v{version}.db", dest)
    return dest


def _recorded(version: int) -> dict[str, Any]:
    """What tests/make_fixtures.py read from the fixture of `version` when it made it."""
    return MANIFEST["versions"][str(version)]


def _digest(path: Path) -> str:
    """The SHA-256 of the file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _raw(path: Path) -> tuple[int, dict[str, Any], str]:
    """(user_version, schema, integrity_check) through a plain sqlite3 connection."""
    conn = sqlite3.connect(path)
    try:
        return (conn.execute("PRAGMA user_version").fetchone()[0], schema(conn),
                conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()


def _schema_of(version: int) -> dict[str, Any]:
    """The schema of `version` as that version's own code made it (0: nothing)."""
    return {"tables": {}, "indexes": {}} if version == 0 else _recorded(version)["schema"]


def _current_schema(tmp_path: Path) -> dict[str, Any]:
    """The schema a fresh store of today's code has."""
    path = tmp_path / "fresh.db"
    Store(path, preallocate=False).close()
    return _raw(path)[1]


def _assert_matches_recording(store: Store, version: int) -> None:
    """Every experiment, trial, report, rung and searcher-state part recorded from the
    fixture of `version` reads back the same through `store`."""
    for rec in _recorded(version)["experiments"]:
        exp = store.experiment(rec["name"], with_searcher_state=True)
        assert (exp.spec, exp.state, exp.created, exp.updated) == \
            (rec["spec"], rec["state"], rec["created"], rec["updated"])
        assert exp.searcher_state == rec["searcher_state"]
        trials = store.trials(exp.id)
        assert len(trials) == len(rec["trials"])
        for trial, want in zip(trials, rec["trials"], strict=True):
            got = {k: getattr(trial, k) for k in want if k != "reports"}
            assert got == {k: v for k, v in want.items() if k != "reports"}
            assert trial.parent is None
            reports = [[r.seq, r.time_value, r.reward, r.metrics, r.decision, r.created]
                       for r in store.reports(trial.id)]
            assert reports == want["reports"], f"trial {trial.number}"
        number = {t.id: t.number for t in trials}
        rungs = [[r.bracket, r.level, number[r.trial_id], r.score, r.decision.value]
                 for r in store.rungs(exp.id)]
        assert rungs == rec["rungs"]


@ag.args(lr=ag.space.Real(1e-3, 1e-2, log=True), wd=ag.space.Real(1e-3, 1e-2), epochs=4)
def fixture_train_fn(args, reporter):
    """The fixtures' space and epochs; rewards that rise with the epoch."""
    for epoch in range(1, args.epochs + 1):
        reporter(epoch=epoch, accuracy=round(0.5 + 0.1 * epoch + args.wd, 6))


# -- 1. databases of every schema version ----------------------------------------------------


def test_every_schema_version_has_a_frozen_fixture():
    assert VERSIONS == list(range(1, SCHEMA_VERSION + 1))
    assert all((FIXTURES / f"schema-v{v}.db").exists() for v in VERSIONS)

# Hand-checked values of the recording (the same for every version: launch-ordered rewards).
FIRST_CONFIG = {"lr": 0.003162277660168382, "wd": 0.0055000000000000005}
FIFO_TRIALS = [("COMPLETED", 1, 4, 0.5), ("COMPLETED", 1, 4, 0.7), ("COMPLETED", 1, 4, 0.4)]
HB_TRIALS = [("COMPLETED", 1, 4, 0.5), ("STOPPED", 1, 1, 0.55), ("STOPPED", 1, 1, 0.25),
             ("STOPPED", 1, 2, 0.5), ("PENDING", 2, 1, 0.65)]
HB_RUNGS = [(0, 1.0, 0, 0.35, "continue"), (0, 2.0, 0, 0.4, "continue"),
            (0, 1.0, 1, 0.55, "stop"), (0, 1.0, 2, 0.25, "stop"), (0, 1.0, 3, 0.45, "continue"),
            (0, 2.0, 3, 0.5, "stop"), (0, 1.0, 4, 0.65, "continue")]


@pytest.mark.parametrize("version", VERSIONS)
def test_a_database_of_every_schema_version_is_migrated_and_reads_back(tmp_path, version):
    original = FIXTURES / f"schema-v{version}.db"
    digest = _digest(original)
    path = _fixture(version, tmp_path / "old.db")
    assert _raw(path) == (version, _schema_of(version), "ok")

    store = Store(path)
    try:
        assert store.schema_version() == SCHEMA_VERSION
        _assert_matches_recording(store, version)
        fifo, hb = store.experiment("fx-fifo"), store.experiment("fx-hb")
        assert (fifo.state, hb.state) == ("COMPLETED", "RUNNING")
        assert [(t.state, t.attempt, t.last_seq, t.last_reward)
                for t in store.trials(fifo.id)] == FIFO_TRIALS
        assert [(t.state, t.attempt, t.last_seq, t.last_reward)
                for t in store.trials(hb.id)] == HB_TRIALS
        assert store.trials(fifo.id)[0].config == store.trials(hb.id)[0].config == FIRST_CONFIG
        number = {t.id: t.number for t in store.trials(hb.id)}
        assert [(r.bracket, r.level, number[r.trial_id], r.score, r.decision.value)
                for r in store.rungs(hb.id)] == HB_RUNGS
        assert store.best_trial(fifo.id).number == 1
        # The counts kept since version 5 were taken from the trials by the migration.
        for exp in (fifo, hb):
            assert store.count_trials(exp.id) == dict(
                sorted(Counter(t.state for t in store.trials(exp.id)).items()))
        assert store.searcher_state(hb.id)["kind"] == "random"
        # The columns of later versions read as "never set".
        pending = store.trials(hb.id, ("PENDING",))[0]
        proc = store.trial_process(pending.id)
        assert (proc.pid, proc.gpus, pending.parent) == (None, [], None)
        assert (proc.start is None) == (version == 1)
    finally:
        store.close()
    assert _raw(path)[1:] == (_current_schema(tmp_path), "ok")
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    assert _digest(original) == digest


@pytest.mark.parametrize("version", VERSIONS)
def test_an_experiment_of_every_schema_version_resumes_and_finishes(tmp_path, version):
    path = _fixture(version, tmp_path / "old.db")
    scheduler = ag.scheduler.HyperbandScheduler(
        fixture_train_fn, resource={"num_cpus": 1, "num_gpus": 0}, num_trials=6,
        checkpoint=str(path), resume=True, name="fx-hb", seed=7, grace_period=1,
        reduction_factor=2, max_concurrent=1, reward_attr="accuracy", time_attr="epoch")
    assert scheduler.experiment.name == "fx-hb"
    scheduler.run()
    store = scheduler.store
    hb = store.experiment("fx-hb")
    assert [e.name for e in store.experiments()] == ["fx-fifo", "fx-hb"]
    assert hb.state == "COMPLETED"
    trials = store.trials(hb.id)
    assert [t.number for t in trials] == list(range(6))
    assert {t.state for t in trials} <= {"COMPLETED", "STOPPED"}
    recorded = _recorded(version)["experiments"][1]["trials"]
    for trial, want in zip(trials[:4], recorded[:4], strict=True):
        assert (trial.state, trial.config) == (want["state"], want["config"])
        assert [r.reward for r in store.reports(trial.id)] == [r[2] for r in want["reports"]]
    # The interrupted trial ran again: its stored first report stands, the rest follow it.
    resumed = store.reports(trials[4].id)
    assert trials[4].attempt >= 2
    assert [r.seq for r in resumed] == list(range(1, len(resumed) + 1))
    assert (resumed[0].reward, resumed[0].decision) == (0.65, "continue")
    assert len(store.reports(trials[5].id)) >= 1
    store.close()
    assert _raw(path)[2] == "ok"


# -- 2. a migration killed halfway -----------------------------------------------------------

# Runs `Store(path)` with migration step STEP wrapped: every SQL statement from the start of
# the step on is traced, and the process SIGKILLs itself just before the statement named by
# KILL: "PREFIX#K" is the K-th statement of the step starting with PREFIX ("CREATE#4": after
# three CREATEs), "PRAGMA user_version#1" the version bump, "COMMIT#1" the commit of the
# step's transaction, "after COMMIT" the first statement once it has committed.
KILLER = r"""
import os, signal, sys
import tuned.store.database as store

path, step, kill = sys.argv[1], int(sys.argv[2]), sys.argv[3]
real = store.MIGRATIONS[step]
counts, committed = {}, []


def trace(sql):
    if committed and kill == "after COMMIT":
        os.kill(os.getpid(), signal.SIGKILL)
    if "#" in kill:
        prefix, k = kill.rsplit("#", 1)
        if sql.upper().startswith(prefix.upper()):
            counts[prefix] = counts.get(prefix, 0) + 1
            if counts[prefix] == int(k):
                os.kill(os.getpid(), signal.SIGKILL)
    if sql == "COMMIT":
        committed.append(sql)


def killed_halfway(db):
    db.conn.set_trace_callback(trace)
    real(db)


store.MIGRATIONS[step] = killed_halfway
store.Store(path)
sys.exit("the kill point was never reached")
"""

KILL_CASES = [
    # (fixture version or 0 for an empty file, step wrapped, kill point, version expected)
    (0, 1, "CREATE#4", 0),                  # step 1 with 3 of its CREATEs done
    (1, 2, "PRAGMA user_version#1", 1),     # step 2's ALTER done, not its version bump
    (2, 3, "COMMIT#1", 2),                  # step 3 and its bump done, not committed
    (1, 3, "PRAGMA user_version#1", 2),     # step 2 committed, step 3 halfway
    (3, 4, "after COMMIT", 4),              # step 4 committed, killed right after
    (4, 5, "CREATE#2", 4),                  # step 5: its table and a first trigger made
    (4, 5, "INSERT#1", 4),                  # step 5: triggers made, counts not taken yet
    (3, 5, "after COMMIT", 5),              # steps 4 and 5 committed, killed right after
]


@pytest.mark.parametrize("start, step, kill, expected", KILL_CASES)
def test_a_migration_killed_halfway_leaves_the_old_or_the_new_version(tmp_path, start, step,
                                                                      kill, expected):
    path = tmp_path / "m.db"
    if start:
        _fixture(start, path)
    else:
        sqlite3.connect(path).close()
    child = subprocess.run([sys.executable, "-c", KILLER, str(path), str(step), kill],
                           capture_output=True, text=True, timeout=60)
    assert child.returncode == -signal.SIGKILL, child.stderr

    version, found, integrity = _raw(path)
    assert version in (step - 1, step) and version == expected
    assert found == _schema_of(version), "a mix of two schema versions"
    assert integrity == "ok"
    store = Store(path)
    try:
        assert store.schema_version() == SCHEMA_VERSION
        if start:
            _assert_matches_recording(store, start)
    finally:
        store.close()
    assert _raw(path)[1:] == (_current_schema(tmp_path), "ok")


# -- 3. the disk fills while tuned writes ----------------------------------------------------


def _acknowledged(acks: Path) -> list[tuple[float, float, int]]:
    """(lr, wd, epoch) of every report a trial saw answered, from its acknowledgement file."""
    if not acks.exists():
        return []
    return [tuple(json.loads(line)) for line in acks.read_text().splitlines()]


def _stored(path: Path) -> set[tuple[float, float, int]]:
    """(lr, wd, epoch) of every stored report."""
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT t.config, json_extract(r.metrics, '$.epoch') "
                            "FROM reports r JOIN trials t ON t.id = r.trial_id").fetchall()
    return {(json.loads(c)["lr"], json.loads(c)["wd"], e) for c, e in rows}


def _assert_acknowledged_reports_kept(path: Path, acks: Path) -> None:
    """Every report a trial saw answered is stored."""
    acked = _acknowledged(acks)
    assert acked, "no report was acknowledged"
    missing = set(acked) - _stored(path)
    assert not missing, f"acknowledged reports lost: {sorted(missing)}"


def _assert_each_trial_reported_once_per_epoch(path: Path, epochs: int) -> None:
    """An intact database whose trials all COMPLETED with one report per epoch."""
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = conn.execute("SELECT t.number, t.state, COUNT(*), "
                            "COUNT(DISTINCT json_extract(r.metrics, '$.epoch')) FROM trials t "
                            "JOIN reports r ON r.trial_id = t.id GROUP BY t.id").fetchall()
    assert rows and all(n == distinct == epochs and state == "COMPLETED"
                        for _, state, n, distinct in rows), rows


# The training function of the disk-full runs: a trial notes each report once it is answered
# (ACKS); once FILL_AFTER reports are answered, the trial that answered last sets the file
# size limit of the process that stores them (the engine or the daemon: STORE_PID, evaluated
# where the module is imported; 0: never) to FULL, as a disk that fills up would.
DISK_TRAIN = """
import json, os, resource, time
import tuned

ACKS, STORE_PID, FILL_AFTER = {acks!r}, {store_pid}, {fill_after}


@tuned.args(lr=tuned.space.Real(1e-3, 1e-2, log=True), wd=tuned.space.Real(1e-3, 1e-2),
            epochs={epochs})
def train(args, reporter):
    for epoch in range(1, args.epochs + 1):
        time.sleep({pause})
        reporter(epoch=epoch, accuracy=round(args.lr * 10 + epoch / 10, 6))
        with open(ACKS, "a") as f:
            f.write(json.dumps([args.lr, args.wd, epoch]) + "\\n")
        with open(ACKS) as f:
            answered = len(f.readlines())
        if STORE_PID and answered >= FILL_AFTER:
            try:
                os.close(os.open(ACKS + ".full", os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                continue
            resource.prlimit(STORE_PID, resource.RLIMIT_FSIZE, ({full}, resource.RLIM_INFINITY))
"""

ENGINE_RUN = """
import os, sys
sys.path.insert(0, {here!r})
import tuned as ag
from disk_train import train

scheduler = ag.scheduler.FIFOScheduler(
    train, resource={{"num_cpus": 1, "num_gpus": 0}}, num_trials=4, checkpoint={db!r},
    resume={resume}, seed=3, name="full", max_concurrent=2, reward_attr="accuracy",
    time_attr="epoch")
scheduler.run()
print("finished", scheduler.get_best_reward())
"""


def _write_disk_train(where: Path, acks: Path, store_pid: int | str, fill_after: int,
                      epochs: int, pause: float) -> None:
    """Write DISK_TRAIN as `where`/disk_train.py."""
    (where / "disk_train.py").write_text(DISK_TRAIN.format(
        acks=str(acks), store_pid=store_pid, fill_after=fill_after, epochs=epochs,
        pause=pause, full=FULL))


def _engine_run(where: Path, db: Path, resume: bool) -> subprocess.CompletedProcess:
    """Run ENGINE_RUN (the in-process API) in a child process, to its end."""
    code = ENGINE_RUN.format(here=str(where), db=str(db), resume=resume)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=where)


def test_a_full_disk_stops_the_engine_with_a_clear_error_and_a_resume_finishes(tmp_path):
    db, acks = tmp_path / "full.db", tmp_path / "acks"
    # The engine imports the module and forks the trials: its pid is os.getpid() there.
    _write_disk_train(tmp_path, acks, "os.getpid()", fill_after=7, epochs=5, pause=0.0)
    run = _engine_run(tmp_path, db, resume=False)
    assert run.returncode != 0 and "finished" not in run.stdout
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("tuned.store.database.StoreWriteError: "), run.stderr
    assert str(db) in last and "file size limit was reached" in last, last
    assert "StoreCorrupt" not in run.stderr
    assert 7 <= len(_acknowledged(acks)) < 20
    assert _raw(db)[2] == "ok"
    _assert_acknowledged_reports_kept(db, acks)

    # Space is back: the same run with resume=True finishes every trial.
    _write_disk_train(tmp_path, acks, 0, fill_after=0, epochs=5, pause=0.0)
    run = _engine_run(tmp_path, db, resume=True)
    assert run.returncode == 0 and "finished" in run.stdout, run.stderr
    _assert_each_trial_reported_once_per_epoch(db, epochs=5)
    _assert_acknowledged_reports_kept(db, acks)


STORE_FILLS = """
import resource, sys
from tuned.store.database import Store, StoreWriteError

store = Store(sys.argv[1])
exp = store.create_experiment("e", {})
store.add_trial(exp.id, 0, {"x": 0}, 0)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
try:
    store.add_trial(exp.id, 1, {"x": 1}, 0, {"v": 1})
except StoreWriteError as exc:
    print("refused:", exc)
assert [t.number for t in store.trials(exp.id)] == [0] and store.searcher_state(exp.id) is None
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
store.add_trial(exp.id, 1, {"x": 1}, 0, {"v": 1})
print("then:", [t.number for t in store.trials(exp.id)], store.searcher_state(exp.id))
"""


def test_a_store_refuses_writes_while_full_and_takes_them_again_after(tmp_path):
    path = tmp_path / "s.db"
    out = subprocess.run([sys.executable, "-c", STORE_FILLS, str(path)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    refused, then = out.stdout.splitlines()
    assert refused.startswith(f"refused: {path}: cannot write to the database: the file size "
                              "limit was reached (RLIMIT_FSIZE is 4096 bytes)"), refused
    assert then == "then: [0, 1] {'v': 1}"
    assert _raw(path)[2] == "ok"


class PipedDaemon(Daemon):
    """The test daemon with its output on a pipe that a thread reads, not in a file: a file the
    daemon writes itself would meet the file size limit it is given. `prelude`: Python run in
    the daemon's process before `tuned serve`."""

    def start(self, wait: bool = True, env: dict[str, str] | None = None,
              args: tuple[str, ...] = (), prelude: str = "") -> subprocess.Popen:
        code = (f"{prelude}\nimport sys; from tuned.cli import tuned_main; "
                "sys.argv[0] = 'tuned'; tuned_main()")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, "serve", "--state-dir", str(self.state),
             "--socket", self.sock, *args], stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})})
        self._output: list[str] = []
        self._reader = threading.Thread(target=self._output.extend, args=(self.proc.stdout,),
                                        daemon=True)
        self._reader.start()
        if wait:
            deadline = time.monotonic() + 20
            while self.ctl("status").returncode != 0:
                assert self.proc.poll() is None, self.log()
                assert time.monotonic() < deadline, "the daemon did not come up"
                time.sleep(0.05)
        return self.proc

    def finish(self, timeout: float = 30) -> tuple[int, str]:
        """Wait for the daemon to exit on its own: its exit status and output."""
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return code, self.log()

    def log(self) -> str:
        """Everything the daemon wrote so far."""
        return "".join(getattr(self, "_output", []))


def test_a_full_disk_stops_the_daemon_with_a_clear_error_and_a_restart_goes_on(tmp_path):
    d = PipedDaemon(tmp_path)
    d.start()
    acks = tmp_path / "acks"
    try:
        _write_disk_train(tmp_path, acks, d.proc.pid, fill_after=4, epochs=6, pause=0.03)
        assert d.ctl("submit", write_spec(tmp_path, "full", f"""
            name = "full"
            entry = "{tmp_path / 'disk_train.py'}:train"
            num_trials = 2
            max_concurrent = 2
            seed = 3
        """)).returncode == 0
        # A trial fills the disk (lowers the daemon's file size limit) after 4 answered
        # reports; the daemon's next commit fails, and it exits.
        code, output = d.finish()
        assert code == 1, output
        assert "Traceback" not in output, output
        error = [line for line in output.splitlines() if line.startswith("error: ")]
        assert len(error) == 1, output
        assert str(d.state / "tuned.db") in error[0]
        assert "cannot write to the database: the file size limit was reached" in error[0]
        db = d.state / "tuned.db"
        assert _raw(db)[2] == "ok"
        _assert_acknowledged_reports_kept(db, acks)
        with sqlite3.connect(db) as conn:
            waiting = conn.execute("SELECT id, pid, attempt FROM trials "
                                   "WHERE state = 'RUNNING'").fetchall()
        assert len(waiting) == 2, waiting
        # Space is back: the daemon restarted (as systemd would), adopts the trials that
        # waited for it and finishes the experiment.
        d.start()
        assert d.wait_state("full", ("COMPLETED",), timeout=60)["trials"] == {"COMPLETED": 2}
    finally:
        d.close()
    _assert_each_trial_reported_once_per_epoch(db, epochs=6)
    with sqlite3.connect(db) as conn:
        for tid, _, attempt in waiting:
            row = conn.execute("SELECT attempt FROM trials WHERE id = ?", (tid,)).fetchone()
            assert row[0] == attempt, f"trial {tid} ran again instead of being adopted"
    _assert_acknowledged_reports_kept(db, acks)


# -- 4. a locked database and corrupt files --------------------------------------------------

HOLDER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("COMMIT")
time.sleep(60)
"""


def _hold(path: Path, seconds: float) -> subprocess.Popen:
    """Another process holding `path` with BEGIN EXCLUSIVE for `seconds`, once it printed
    'locked'."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), str(seconds)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def _end(proc: subprocess.Popen) -> None:
    """Kill and reap a helper process."""
    proc.kill()
    proc.wait()


def test_a_locked_database_is_waited_for_then_refused_untouched(tmp_path):
    path = _fixture(2, tmp_path / "locked.db")
    digest = _digest(path)
    holder = _hold(path, 30)
    try:
        start = time.monotonic()
        with pytest.raises(StoreLocked, match="locked by another process") as err:
            Store(path, timeout=0.5)
        waited = time.monotonic() - start
        assert 0.5 <= waited < 5, waited
        assert str(path) in str(err.value)
        assert _digest(path) == digest
        assert _raw(path)[0] == 2, "the migration began under the lock"
    finally:
        _end(holder)
    # A lock let go of within the timeout is waited for (StoreLocked otherwise).
    holder = _hold(path, 1.0)
    try:
        start = time.monotonic()
        store = Store(path, timeout=10)
        assert time.monotonic() - start >= 0.1
        assert store.schema_version() == SCHEMA_VERSION
        _assert_matches_recording(store, 2)
        store.close()
    finally:
        _end(holder)


def test_the_daemon_on_a_locked_database_exits_with_the_reason_and_leaves_it(tmp_path):
    d = PipedDaemon(tmp_path)
    d.state.mkdir(mode=0o700)
    db = _fixture(3, d.state / "tuned.db")
    digest = _digest(db)
    holder = _hold(db, 60)
    try:
        start = time.monotonic()
        # The daemon's lock timeout (10 s) made 1 s, to keep the test short.
        d.start(wait=False, prelude="import functools, tuned.store.database as s; "
                "s.Store.__init__ = functools.partialmethod(s.Store.__init__, timeout=1.0)")
        code, output = d.finish()
        assert time.monotonic() - start >= 1
    finally:
        _end(holder)
    assert code == 1 and "Traceback" not in output, output
    assert f"error: {db}: the database is locked by another process" in output
    assert _digest(db) == digest
    assert _raw(db)[0] == 3


def _wal_frames(path: Path) -> int:
    """Bytes in the WAL beside `path` (SQLite leaves an empty one after reading a file whose
    header says WAL)."""
    wal = Path(f"{path}-wal")
    return wal.stat().st_size if wal.exists() else 0


def _corrupt_files(tmp_path: Path) -> dict[str, bytes]:
    """Files that are not usable tuned databases, by what they are."""
    real = (FIXTURES / "schema-v4.db").read_bytes()
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
        conn.execute("INSERT INTO notes (text) VALUES ('not tuned')")
    conn.close()
    return {
        "random bytes": random.Random(5).randbytes(64 << 10),
        "truncated database": real[:len(real) // 2],
        "database header only": real[:100],
        "truncated mid-page": real[:len(real) - 5000],
        "text file": b"name = 'spec'\nentry = 'x.py:f'\n" * 50,
        "header then garbage": real[:4096] + random.Random(6).randbytes(4 * 4096),
        "damaged pages, size intact": real[:4096] + random.Random(7).randbytes(len(real) - 4096),
        "another program's database": foreign.read_bytes(),
    }


def test_a_corrupt_file_is_refused_by_the_store_and_left_untouched(tmp_path):
    for kind, data in _corrupt_files(tmp_path).items():
        path = tmp_path / f"{kind}.db"
        path.write_bytes(data)
        with pytest.raises(StoreCorrupt, match="untouched") as err:
            Store(path)
        assert str(path) in str(err.value), kind
        assert path.read_bytes() == data, f"{kind}: the file was changed"
        assert _wal_frames(path) == 0, f"{kind}: a WAL was written"


DAEMON_CORRUPT_CASES = ("random bytes", "truncated database", "damaged pages, size intact",
                        "another program's database")


def test_the_daemon_refuses_to_start_on_a_corrupt_database_and_leaves_it(tmp_path):
    daemons: dict[str, tuple[PipedDaemon, bytes]] = {}
    files = _corrupt_files(tmp_path)
    for i, kind in enumerate(DAEMON_CORRUPT_CASES):
        data = files[kind]
        d = PipedDaemon(tmp_path / f"d{i}")
        d.state.mkdir(parents=True, mode=0o700)
        (d.state / "tuned.db").write_bytes(data)
        d.start(wait=False)
        daemons[kind] = (d, data)
    for kind, (d, data) in daemons.items():
        code, output = d.finish()
        db = d.state / "tuned.db"
        assert code == 1 and "Traceback" not in output, f"{kind}: {output}"
        assert f"error: {db}: " in output and "it was left untouched" in output, \
            f"{kind}: {output}"
        assert db.read_bytes() == data, f"{kind}: the daemon changed the file"
        assert _wal_frames(db) == 0, f"{kind}: a WAL was written"
        assert not os.path.exists(d.sock), f"{kind}: the daemon bound its socket"
