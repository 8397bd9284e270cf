"""The store: SQLite, the state of record for experiments, trials, reports, rungs and searchers.

Contract
--------
- One SQLite file in WAL mode with ``synchronous=FULL``: when a method returns, what it wrote
  is durable. Both pragmas are read back after being set; `StoreError` when they differ.
  A store opened with ``durable=False`` (simulations only) runs with ``synchronous=OFF``:
  nothing it writes is durable.
- The schema version is ``PRAGMA user_version``. Opening a file of an older version runs each
  migration step in its own transaction together with the version bump, so a step killed
  halfway leaves the old version or the new one, never a mix. A newer version than this code
  knows raises `SchemaTooNew`; a file that is not a database (or is damaged), or a SQLite
  database of another program (tables but no schema version), raises `StoreCorrupt`, and
  the file is never written to.
- A suggestion is stored in the same transaction as the searcher state that produced it
  (`add_trial`); a report is stored with its decision and its rung entries in one
  transaction (`record_report`), and reports are unique per ``(trial_id, seq)``: storing a
  sequence number that is already there stores nothing and returns the stored decision.
  `record_reports` stores a batch of reports known to be new (an engine step's) the same
  way, and refuses the whole batch (`StoreError`) if one is not new.
- Finished trials (COMPLETED, STOPPED, FAILED) are immutable: `finish_trial` and
  `claim_trial` are compare-and-set operations that return False when the trial is not in
  the state they expect.
- `count_trials` (trials by state) is read from counts that triggers on `trials` keep in
  the transaction of every insert and state change (schema v5): constant time, and exact
  after any commit or rollback, whatever statement changed a trial.
- A database locked by another process is waited for up to ``timeout`` seconds, then
  `StoreLocked`.
- A write that fails for want of space (disk or quota full, the file size limit reached) or
  with an I/O error raises `StoreWriteError` naming the cause; the transaction is rolled back
  and what was committed before is intact. The store can be used again once space returns.

Scores are rewards made "higher is better" (negated when the experiment's mode is 'min').
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from tuned.core.decisions import FINISHED_STATES, Decision, TrialState
from tuned.core.lifecycle import NOT_FAILURES, check_transition
from tuned.core.schedulers.base import RungEntry

if TYPE_CHECKING:
    import sqlite_utils

SCHEMA_VERSION = 7
# Bytes of WAL written once when a store is opened; about the WAL's size between automatic
# checkpoints (1000 pages).
WAL_PREALLOCATE = 4 << 20
# A failed write with less free space than this on the file system is put down to it.
_DISK_FULL_BELOW = 1 << 20


class StoreError(RuntimeError):
    """The store cannot be used as it is."""


class StoreCorrupt(StoreError):
    """The file is not a tuned database, or it is damaged."""


class StoreLocked(StoreError):
    """Another process held the database longer than the timeout."""


class StoreWriteError(StoreError):
    """A write failed: the disk (or a quota) is full, the file size limit was reached, or an
    I/O error. The transaction was rolled back, unless only the checkpoint that follows a
    commit failed (the commit then stands); what was committed before is intact."""


class StoreMissing(StoreError):
    """A store opened to be read does not exist."""


class SchemaTooNew(StoreError):
    """The database was written by a newer tuned."""


class NameTaken(StoreError):
    """An experiment of that name exists already."""


class NotFound(StoreError, KeyError):
    """No experiment or trial of that name or id."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "not found"


@dataclass(frozen=True)
class Experiment:
    id: int
    name: str
    spec: dict[str, Any]
    state: str
    searcher_state: dict[str, Any] | None
    created: float
    updated: float
    reason: str | None = None  # why it ended STOPPED or FAILED


@dataclass(frozen=True)
class Trial:
    id: int
    experiment_id: int
    number: int
    config: dict[str, Any]
    state: str
    bracket: int
    attempt: int
    pid: int | None
    last_seq: int
    last_time: float | None
    last_reward: float | None
    score: float | None
    error: str | None
    created: float
    started: float | None
    ended: float | None
    parent: int | None = None
    host: str | None = None  # where its last run ran: a Dask worker's host (None: here)
    worker: str | None = None  # that Dask worker's address


@dataclass(frozen=True)
class TrialProcess:
    """The process a running trial was launched in: pid, its start time (clock ticks since
    boot; with the pid it names one process for good) and the GPUs it holds. A remote run
    (a Dask task) has its `run` id and `token_hash`, and `host`/`worker` once it said hello
    (its pid and start time are then the remote host's)."""

    pid: int | None
    start: int | None
    gpus: list[str]
    run: str | None = None
    token_hash: str | None = None
    host: str | None = None
    worker: str | None = None


class NewReport(NamedTuple):
    """A report to store (`Store.record_reports`): its decision and the rung entries it made."""

    trial_id: int
    seq: int
    time_value: float | None
    reward: float | None
    score: float | None
    metrics_json: str
    decision: Decision
    rungs: tuple[RungEntry, ...] = ()


@dataclass(frozen=True)
class Report:
    trial_id: int
    seq: int
    time_value: float | None
    reward: float | None
    metrics: dict[str, Any]
    decision: str
    created: float


def _write_failed(exc: sqlite3.Error) -> bool:
    """Whether SQLite failed to write: SQLITE_FULL (no space) or an SQLITE_IOERR (EFBIG past
    the file size limit, EDQUOT, EIO). Python before 3.11 gives only the message."""
    name = getattr(exc, "sqlite_errorname", None)
    if name is not None:
        return name == "SQLITE_FULL" or name.startswith("SQLITE_IOERR")
    text = str(exc)
    return "disk is full" in text or "disk I/O error" in text


def _sqlite_utils() -> Any:
    """The sqlite_utils module, which the migration steps are written with; imported only
    when a step runs (a store of the current version never loads it).

    sqlite_utils imports pandas whenever pandas is installed (for one column type tuned
    never stores): about a second and 90 MB of RSS that a daemon would carry for good. Its
    import here keeps pandas out (for sqlite_utils, pandas is then missing) unless the
    process had imported pandas already."""
    if "sqlite_utils" in sys.modules:
        return sys.modules["sqlite_utils"]
    hide = "pandas" not in sys.modules
    if hide:
        sys.modules["pandas"] = None  # type: ignore[assignment]  # import pandas: ImportError
    try:
        import sqlite_utils
    finally:
        if hide:
            del sys.modules["pandas"]
    return sqlite_utils


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


def _v1(db: sqlite_utils.Database) -> None:
    """The first schema: experiments, trials, reports, rungs, searcher state."""
    db["experiments"].create(
        {"id": int, "name": str, "spec": str, "state": str, "created": float,
         "updated": float},
        pk="id", not_null={"name", "spec", "state", "created", "updated"})
    db["experiments"].create_index(["name"], unique=True)
    db["searcher_state"].create(
        {"experiment_id": int, "part": str, "value": str},
        pk=("experiment_id", "part"), not_null={"value"},
        foreign_keys=[("experiment_id", "experiments", "id")])
    db["trials"].create(
        {"id": int, "experiment_id": int, "number": int, "config": str, "state": str,
         "bracket": int, "attempt": int, "pid": int, "last_seq": int, "last_time": float,
         "last_reward": float, "score": float, "error": str, "created": float,
         "started": float, "ended": float},
        pk="id", not_null={"experiment_id", "number", "config", "state", "bracket",
                           "attempt", "last_seq", "created"},
        defaults={"bracket": 0, "attempt": 1, "last_seq": 0},
        foreign_keys=[("experiment_id", "experiments", "id")])
    db["trials"].create_index(["experiment_id", "number"], unique=True)
    db["trials"].create_index(["experiment_id", "state"], index_name="trials_by_state")
    db["trials"].create_index(["experiment_id", "score"], index_name="trials_by_score")
    # sqlite-utils cannot say WITHOUT ROWID: reports are clustered by (trial_id, seq).
    db.execute("""
        CREATE TABLE reports (
            trial_id INTEGER NOT NULL REFERENCES trials(id),
            seq INTEGER NOT NULL,
            time_value REAL,
            reward REAL,
            metrics TEXT NOT NULL,
            decision TEXT NOT NULL,
            created REAL NOT NULL,
            PRIMARY KEY (trial_id, seq)
        ) WITHOUT ROWID""")
    db["rungs"].create(
        {"id": int, "experiment_id": int, "bracket": int, "level": float, "trial_id": int,
         "score": float, "decision": str},
        pk="id", not_null={"experiment_id", "bracket", "level", "trial_id", "score",
                           "decision"},
        foreign_keys=[("experiment_id", "experiments", "id"), ("trial_id", "trials", "id")])
    db["rungs"].create_index(["experiment_id", "bracket", "level", "trial_id"], unique=True)


def _v2(db: sqlite_utils.Database) -> None:
    """Trials remember their process's start time (clock ticks since boot, from
    /proc/PID/stat), so that a restarted daemon never mistakes a reused pid for a trial."""
    db["trials"].add_column("pid_start", int)


def _v3(db: sqlite_utils.Database) -> None:
    """Running trials remember the GPUs they were given (a JSON list of UUIDs), so that a
    restarted daemon that adopts them holds the same GPUs for them."""
    db["trials"].add_column("gpus", str)


def _v4(db: sqlite_utils.Database) -> None:
    """A trial may descend from another (population based training: it starts from the
    parent's checkpoint with a changed config): `parent` is the parent's trial number."""
    db["trials"].add_column("parent", int)


def _v5(db: sqlite_utils.Database) -> None:
    """Trials by state, kept per experiment in `trial_counts` by triggers on `trials`: every
    statement that adds a trial or changes its state updates the counts in its own
    transaction, so `count_trials` (read by every status) is a lookup of a few rows instead
    of a scan of the experiment's trials. The counts of the trials already stored are
    taken once, here."""
    db.execute("""
        CREATE TABLE trial_counts (
            experiment_id INTEGER NOT NULL REFERENCES experiments(id),
            state TEXT NOT NULL,
            n INTEGER NOT NULL,
            PRIMARY KEY (experiment_id, state)
        ) WITHOUT ROWID""")
    for sql in _COUNT_TRIGGERS:
        db.execute(sql)
    db.execute("INSERT INTO trial_counts (experiment_id, state, n) "
               "SELECT experiment_id, state, COUNT(*) FROM trials GROUP BY experiment_id, state")


def _v6(db: sqlite_utils.Database) -> None:
    """An experiment keeps the reason of its state (why it FAILED or was STOPPED), shown by
    `status`."""
    db["experiments"].add_column("reason", str)


def _v7(db: sqlite_utils.Database) -> None:
    """A trial may run on another machine (a Dask worker): its current `run` (an id of the
    launch, which fences any other copy of it), the SHA-256 of that run's secret
    (`run_token`), and the `host` and `worker` it runs on once it said hello."""
    for column in ("run", "run_token", "host", "worker"):
        db["trials"].add_column(column, str)


# One more trial in (experiment, state); one fewer. Zero counts stay (count_trials skips them).
_COUNT_UP = ("INSERT INTO trial_counts (experiment_id, state, n) VALUES ({row}.experiment_id, "
             "{row}.state, 1) ON CONFLICT (experiment_id, state) DO UPDATE SET n = n + 1;")
_COUNT_DOWN = ("UPDATE trial_counts SET n = n - 1 "
               "WHERE experiment_id = {row}.experiment_id AND state = {row}.state;")
_COUNT_TRIGGERS = (
    f"CREATE TRIGGER trial_counts_insert AFTER INSERT ON trials BEGIN "
    f"{_COUNT_UP.format(row='NEW')} END",
    f"CREATE TRIGGER trial_counts_update AFTER UPDATE OF experiment_id, state ON trials "
    f"WHEN OLD.state IS NOT NEW.state OR OLD.experiment_id IS NOT NEW.experiment_id BEGIN "
    f"{_COUNT_DOWN.format(row='OLD')} {_COUNT_UP.format(row='NEW')} END",
    f"CREATE TRIGGER trial_counts_delete AFTER DELETE ON trials BEGIN "
    f"{_COUNT_DOWN.format(row='OLD')} END",
)


# Step n turns a database of version n - 1 into version n. Append; never edit a shipped step.
MIGRATIONS: dict[int, Callable[[sqlite_utils.Database], None]] = {
    1: _v1, 2: _v2, 3: _v3, 4: _v4, 5: _v5, 6: _v6, 7: _v7}


class Store:
    """A tuned database. See the module docstring for the contract."""

    def __init__(self, path: str | os.PathLike, timeout: float = 10.0,
                 clock: Callable[[], float] = time.time, preallocate: bool = True,
                 durable: bool = True, readonly: bool = False):
        self.path = os.fspath(path)
        self.clock = clock
        self.durable = durable
        self._depth = 0
        self._joined = _JoinedTransaction(self)
        self._sync_level = 2 if durable else 0
        # Per experiment, a copy of each searcher-state part as last written.
        self._written_parts: dict[int, dict[str, Any]] = {}
        self._after_commit: list[Callable[[], None]] = []
        if readonly:
            self._open_readonly(timeout)
            return
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, exist_ok=True)
        try:
            self.conn = sqlite3.connect(self.path, timeout=timeout, isolation_level=None,
                                        check_same_thread=False)
            self._refuse_unusable(writes=preallocate)
            self._configure()
            self._migrate()
            if preallocate:
                self._try_preallocate_wal()
        except sqlite3.DatabaseError as exc:
            self._close_quietly()
            raise self._translate(exc) from exc

    # -- opening -------------------------------------------------------------------------

    def _open_readonly(self, timeout: float) -> None:
        """Open an existing store to read it, creating nothing (no folder, no database; a
        WAL store's -wal and -shm files come and go with its readers, as for any reader).
        StoreMissing when there is no file, StoreCorrupt / SchemaTooNew as for a writer,
        StoreError for a store of an older schema (reading does not migrate it)."""
        from urllib.parse import quote

        if not os.path.isfile(self.path):
            raise StoreMissing(f"no store at {self.path}")
        uri = f"file:{quote(os.path.abspath(self.path))}?mode=ro"
        try:
            self.conn = sqlite3.connect(uri, uri=True, timeout=timeout, isolation_level=None,
                                        check_same_thread=False)
            self._refuse_unusable(writes=False)
            version = self.schema_version()
        except sqlite3.DatabaseError as exc:
            self._close_quietly()
            raise self._translate(exc) from exc
        if version != SCHEMA_VERSION:
            self._close_quietly()
            if version > SCHEMA_VERSION:
                raise SchemaTooNew(f"{self.path}: schema version {version} is newer than this "
                                   f"tuned understands ({SCHEMA_VERSION}); upgrade tuned")
            raise StoreError(f"{self.path}: a store of schema version {version}, this tuned "
                             f"reads version {SCHEMA_VERSION}: the daemon (tuned serve) or the "
                             "in-process API upgrades it when it opens it")

    def _translate(self, exc: sqlite3.DatabaseError) -> StoreError:
        text = str(exc)
        if "locked" in text or "busy" in text:
            return StoreLocked(f"{self.path}: the database is locked by another process ({text})")
        if _write_failed(exc):
            return StoreWriteError(f"{self.path}: cannot write to the database: "
                                   f"{self._write_failure_cause(exc)} ({text}); the write was "
                                   "rolled back, what was stored before is intact")
        return StoreCorrupt(f"{self.path}: not a usable tuned database ({text}); "
                            "it was left untouched")

    def _write_failure_cause(self, exc: sqlite3.Error) -> str:
        """The likely cause of a failed write: the file size limit (RLIMIT_FSIZE: SQLite
        sees EFBIG as an I/O error), a full file system, or else any of those or EIO."""
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        full = getattr(exc, "sqlite_errorname", None) == "SQLITE_FULL"
        if not full and limit != resource.RLIM_INFINITY:
            return f"the file size limit was reached (RLIMIT_FSIZE is {limit} bytes)"
        try:
            fs = os.statvfs(os.path.dirname(os.path.abspath(self.path)))
        except OSError:
            fs = None
        if fs is not None and fs.f_bavail * fs.f_frsize < _DISK_FULL_BELOW:
            return f"the disk is full ({fs.f_bavail * fs.f_frsize} bytes free)"
        return "the disk or a quota is full, or an I/O error"

    def _refuse_unusable(self, writes: bool) -> None:
        """StoreCorrupt, before anything is written to it, for a SQLite database another
        program made (tables but no schema version) and for a damaged one (``PRAGMA
        quick_check``, some ms per MB, run when this open writes: `writes` or a
        migration). Reading the version already refuses a file that is not a database."""
        version = self.schema_version()
        tables = [r[0] for r in self.conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' "
            "ORDER BY name")]
        if version == 0 and tables:
            raise StoreCorrupt(f"{self.path}: a SQLite database but not a tuned one (tables "
                               f"{', '.join(tables)} and no schema version); it was left "
                               "untouched")
        if tables and (writes or version < SCHEMA_VERSION):
            problems = [" ".join(r[0].split()) for r in
                        self.conn.execute("PRAGMA quick_check(3)")]
            if problems != ["ok"]:
                raise StoreCorrupt(f"{self.path}: the database is damaged "
                                   f"({'; '.join(problems)}); it was left untouched")

    def _configure(self) -> None:
        self.conn.execute("PRAGMA foreign_keys = ON")
        mode = self.conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        want = "FULL" if self.durable else "OFF"
        self.conn.execute(f"PRAGMA synchronous = {want}")
        sync = self.conn.execute("PRAGMA synchronous").fetchone()[0]
        if str(mode).lower() != "wal" or sync != self._sync_level:
            raise StoreError(f"{self.path}: needs journal_mode=wal and synchronous={want}, "
                             f"got journal_mode={mode} synchronous={sync}")

    def _migrate(self) -> None:
        version = self.schema_version()
        if version > SCHEMA_VERSION:
            raise SchemaTooNew(f"{self.path}: schema version {version} is newer than this "
                               f"tuned understands ({SCHEMA_VERSION}); upgrade tuned")
        if version == SCHEMA_VERSION:
            return
        db = _sqlite_utils().Database(self.conn)
        for step in range(version + 1, SCHEMA_VERSION + 1):
            with self.transaction():
                MIGRATIONS[step](db)
                self.conn.execute(f"PRAGMA user_version = {step}")

    def _set_synchronous(self, level: int) -> None:
        if self.durable and level != self._sync_level:
            self.conn.execute(f"PRAGMA synchronous = {level}")
            self._sync_level = level

    def _try_preallocate_wal(self) -> None:
        """`_preallocate_wal`, best effort: a disk too full for it must not keep a daemon
        from starting (its commits append to the WAL then, a little slower)."""
        try:
            self._preallocate_wal()
        except (StoreWriteError, sqlite3.OperationalError) as exc:
            logging.getLogger("tuned.store").warning(
                "WAL not preallocated (%s); going on without", exc)
            self._set_synchronous(2)

    def _preallocate_wal(self) -> None:
        """Grow the WAL file to its working size once, so that later commits overwrite it
        instead of appending: on ext4 an fdatasync that changes the file's size also commits
        the file system's journal (about 0.4 ms here against 0.26 ms without)."""
        wal = self.path + "-wal"
        if os.path.exists(wal) and os.path.getsize(wal) >= WAL_PREALLOCATE:
            return
        blob = b"\0" * 3000  # smaller than a page, so each row sits on a page of its own
        with self.transaction(durable=False) as c:
            c.execute("CREATE TABLE IF NOT EXISTS _wal_preallocation (b BLOB)")
            c.executemany("INSERT INTO _wal_preallocation VALUES (?)",
                          [(blob,)] * (WAL_PREALLOCATE // 4096))
        with self.transaction(durable=False) as c:
            c.execute("DROP TABLE _wal_preallocation")
        self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        self._set_synchronous(2)

    def schema_version(self) -> int:
        return self.conn.execute("PRAGMA user_version").fetchone()[0]

    def close(self) -> None:
        self._close_quietly()

    def _close_quietly(self) -> None:
        conn = getattr(self, "conn", None)
        if conn is not None:
            try:
                conn.close()
            except sqlite3.Error:
                pass

    def transaction(self, durable: bool = True) -> AbstractContextManager[sqlite3.Connection]:
        """One write transaction: everything in it is committed or nothing is.

        Transactions nest: an inner one joins the outer one, so a caller can group several
        store operations (e.g. all the events of one engine step) into one commit. Joining
        costs a counter (the engine's step stores each report in one).

        `durable` (of the outermost transaction) chooses ``synchronous=FULL``: the commit
        reaches the disk before it returns. ``durable=False`` commits with ``NORMAL``: atomic
        and safe against the death of this process, and made durable by the next durable
        commit; for writes nobody has been told about yet.
        """
        return self._joined if self._depth else self._outermost(durable)

    @contextmanager
    def _outermost(self, durable: bool) -> Iterator[sqlite3.Connection]:
        try:
            self._set_synchronous(2 if durable else 1)
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise self._translate(exc) from exc
        self._depth = 1
        try:
            yield self.conn
        except BaseException as exc:
            self._depth = 0
            self._after_commit.clear()
            self._rollback()
            if isinstance(exc, sqlite3.OperationalError) and _write_failed(exc):
                raise self._translate(exc) from exc
            raise
        self._depth = 0
        try:
            self.conn.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            self._after_commit.clear()
            self._rollback()
            raise self._translate(exc) from exc
        callbacks, self._after_commit = self._after_commit, []
        for callback in callbacks:
            callback()

    def _rollback(self) -> None:
        """Roll back the open transaction, if SQLite has not done so already (it does after
        some I/O errors); a rollback that fails leaves the error being raised to speak."""
        if self.conn.in_transaction:
            try:
                self.conn.execute("ROLLBACK")
            except sqlite3.OperationalError:
                pass

    # -- experiments ---------------------------------------------------------------------

    def create_experiment(self, name: str, spec: dict[str, Any],
                          state: str = "RUNNING") -> Experiment:
        """Create an experiment; NameTaken when the name is used."""
        now = self.clock()
        try:
            with self.transaction() as c:
                cur = c.execute(
                    "INSERT INTO experiments (name, spec, state, created, updated) "
                    "VALUES (?, ?, ?, ?, ?)", (name, _dumps(spec), state, now, now))
        except sqlite3.IntegrityError:
            raise NameTaken(f"an experiment named {name!r} exists already") from None
        return self.experiment(cur.lastrowid)

    def unique_name(self, base: str) -> str:
        """`base`, or `base-2`, `base-3`, ... : the first name no experiment has."""
        taken = {r[0] for r in self.conn.execute(
            "SELECT name FROM experiments WHERE name = ? OR name LIKE ?", (base, base + "-%"))}
        if base not in taken:
            return base
        n = 2
        while f"{base}-{n}" in taken:
            n += 1
        return f"{base}-{n}"

    def experiment(self, key: int | str, with_searcher_state: bool = False) -> Experiment:
        """The experiment with this id (int) or name (str); NotFound otherwise. Its searcher
        state (which can be large) is read only when asked for."""
        column = "id" if isinstance(key, int) else "name"
        row = self.conn.execute(
            f"SELECT id, name, spec, state, created, updated, reason "
            f"FROM experiments WHERE {column} = ?", (key,)).fetchone()
        if row is None:
            raise NotFound(f"no experiment {key!r}")
        state = self.searcher_state(row[0]) if with_searcher_state else None
        return Experiment(row[0], row[1], json.loads(row[2]), row[3], state, row[4], row[5],
                          row[6])

    def searcher_state(self, experiment_id: int) -> dict[str, Any] | None:
        """The experiment's stored searcher state, or None before its first suggestion."""
        rows = self.conn.execute(
            "SELECT part, value FROM searcher_state WHERE experiment_id = ?", (experiment_id,))
        state = {part: json.loads(value) for part, value in rows}
        return state or None

    def save_searcher_state(self, experiment_id: int, state: dict[str, Any]) -> None:
        """Store a searcher's state dict, writing only the top-level parts that changed since
        this store last wrote them (a large model is written when it learns, not per trial).
        A part is compared with its JSON round trip: a state of JSON-native values (lists,
        not tuples) is written only where it changed; any other is written every time."""
        written = self._written_parts.setdefault(experiment_id, {})
        changed = []
        for part, value in state.items():
            if part in written and written[part] == value:
                continue
            text = _dumps(value)
            changed.append((experiment_id, part, text, json.loads(text)))  # a deep copy
        stale = set(written) - set(state)
        if not changed and not stale:
            return
        with self.transaction() as c:
            c.executemany("INSERT INTO searcher_state (experiment_id, part, value) "
                          "VALUES (?, ?, ?) ON CONFLICT (experiment_id, part) "
                          "DO UPDATE SET value = excluded.value",
                          [row[:3] for row in changed])
            c.executemany("DELETE FROM searcher_state WHERE experiment_id = ? AND part = ?",
                          [(experiment_id, p) for p in stale])
            # Remember what was written only once the outermost transaction commits.
            self._after_commit.append(lambda: _remember(written, changed, stale))

    def experiments(self) -> list[Experiment]:
        ids = [r[0] for r in self.conn.execute("SELECT id FROM experiments ORDER BY id")]
        return [self.experiment(i) for i in ids]

    def update_spec(self, experiment_id: int, spec: dict[str, Any]) -> Experiment:
        """Replace the experiment's stored spec (e.g. a larger budget on resume)."""
        with self.transaction() as c:
            c.execute("UPDATE experiments SET spec = ?, updated = ? WHERE id = ?",
                      (_dumps(spec), self.clock(), experiment_id))
        return self.experiment(experiment_id)

    def set_experiment_state(self, experiment_id: int, state: str,
                             reason: str | None = None) -> None:
        """Move the experiment to `state` with `reason` (None clears it), if the lifecycle's
        table allows it from its current state (`tuned.core.lifecycle.TRANSITIONS`; staying in
        a state is allowed). Raises BadTransition (nothing written) when it does not,
        NotFound for an unknown id."""
        with self.transaction() as c:
            row = c.execute("SELECT state FROM experiments WHERE id = ?",
                            (experiment_id,)).fetchone()
            if row is None:
                raise NotFound(f"no experiment {experiment_id!r}")
            check_transition(row[0], state)
            c.execute("UPDATE experiments SET state = ?, reason = ?, updated = ? WHERE id = ?",
                      (state, reason, self.clock(), experiment_id))

    def delete_experiment(self, experiment_id: int) -> None:
        """Remove the experiment and everything stored of it (trials, reports, rungs, counts,
        searcher state) in one transaction; its name is free again. The caller checks that
        nothing of it runs. NotFound for an unknown id."""
        with self.transaction() as c:
            if c.execute("SELECT 1 FROM experiments WHERE id = ?",
                         (experiment_id,)).fetchone() is None:
                raise NotFound(f"no experiment {experiment_id!r}")
            trials = "SELECT id FROM trials WHERE experiment_id = ?"
            c.execute(f"DELETE FROM reports WHERE trial_id IN ({trials})", (experiment_id,))
            for table in ("rungs", "trials", "trial_counts", "searcher_state"):
                c.execute(f"DELETE FROM {table} WHERE experiment_id = ?", (experiment_id,))
            c.execute("DELETE FROM experiments WHERE id = ?", (experiment_id,))
            # A new experiment may get this id: it must not inherit what was written here.
            self._after_commit.append(lambda: self._written_parts.pop(experiment_id, None))

    # -- trials --------------------------------------------------------------------------

    def add_trial(self, experiment_id: int, number: int, config: dict[str, Any],
                  bracket: int, searcher_state: dict[str, Any] | None = None,
                  parent: int | None = None) -> int:
        """Store a new PENDING trial and (when given) the searcher state that suggested it,
        atomically. Callers grouping several steps in one transaction may save the state once
        at its end instead (`save_searcher_state`). `parent`: the number of the trial it
        descends from."""
        now = self.clock()
        with self.transaction() as c:
            cur = c.execute(
                "INSERT INTO trials (experiment_id, number, config, state, bracket, created, "
                "parent) VALUES (?, ?, ?, 'PENDING', ?, ?, ?)",
                (experiment_id, number, _dumps(config), bracket, now, parent))
            if searcher_state is not None:
                self.save_searcher_state(experiment_id, searcher_state)
        return cur.lastrowid

    def claim_trial(self, trial_id: int, pid: int, pid_start: int | None = None,
                    gpus: list[str] | None = None, run: str | None = None,
                    token_hash: str | None = None) -> bool:
        """PENDING -> RUNNING with the process that runs it (pid and its start time) and the
        GPUs it was given, or with a remote `run` (its id and `token_hash`; its process is
        stored by `place_trial`); False if it was not PENDING."""
        with self.transaction() as c:
            cur = c.execute(
                "UPDATE trials SET state = 'RUNNING', pid = ?, pid_start = ?, gpus = ?, "
                "started = ?, run = ?, run_token = ?, host = NULL, worker = NULL "
                "WHERE id = ? AND state = 'PENDING'",
                (pid, pid_start, _dumps(gpus or []), self.clock(), run, token_hash, trial_id))
        return cur.rowcount == 1

    def place_trial(self, trial_id: int, run: str, host: str, worker: str, pid: int,
                    pid_start: int | None, gpus: list[str]) -> str | None:
        """Store where remote run `run` of a RUNNING trial runs, once, when it says hello:
        ``"placed"`` the first time; ``"same"`` when that very process (host, pid, start)
        was placed already (it reconnects); None when `run` is not the trial's current run
        or another process took it first (a second copy of the run: refuse it)."""
        with self.transaction() as c:
            cur = c.execute(
                "UPDATE trials SET host = ?, worker = ?, pid = ?, pid_start = ?, gpus = ? "
                "WHERE id = ? AND run = ? AND state = 'RUNNING' AND host IS NULL",
                (host, worker, pid, pid_start, _dumps(gpus), trial_id, run))
            if cur.rowcount == 1:
                return "placed"
            same = c.execute(
                "SELECT 1 FROM trials WHERE id = ? AND run = ? AND state = 'RUNNING' "
                "AND host = ? AND pid = ? AND pid_start IS ?",
                (trial_id, run, host, pid, pid_start)).fetchone()
        return "same" if same else None

    def trial_process(self, trial_id: int) -> TrialProcess:
        """The process stored for a running trial (all None/empty when it has none)."""
        row = self.conn.execute(
            "SELECT pid, pid_start, gpus, run, run_token, host, worker FROM trials "
            "WHERE id = ?", (trial_id,)).fetchone()
        if row is None:
            return TrialProcess(None, None, [])
        return TrialProcess(row[0], row[1], json.loads(row[2]) if row[2] else [], *row[3:])

    def requeue_trial(self, trial_id: int) -> bool:
        """RUNNING -> PENDING for another attempt (counted); False if it was not RUNNING."""
        with self.transaction() as c:
            cur = c.execute(
                "UPDATE trials SET state = 'PENDING', pid = NULL, run = NULL, "
                "attempt = attempt + 1 "
                "WHERE id = ? AND state = 'RUNNING'", (trial_id,))
        return cur.rowcount == 1

    def pause_trial(self, trial_id: int) -> bool:
        """RUNNING or PENDING -> PAUSED (it waits for a resume or a promotion); False if it
        was in neither state."""
        with self.transaction() as c:
            cur = c.execute("UPDATE trials SET state = 'PAUSED', pid = NULL, run = NULL "
                            "WHERE id = ? AND state IN ('RUNNING', 'PENDING')", (trial_id,))
        return cur.rowcount == 1

    def unpause_trial(self, trial_id: int) -> bool:
        """PAUSED or RUNNING -> PENDING without counting an attempt; False otherwise."""
        with self.transaction() as c:
            cur = c.execute("UPDATE trials SET state = 'PENDING', pid = NULL, run = NULL "
                            "WHERE id = ? AND state IN ('PAUSED', 'RUNNING')", (trial_id,))
        return cur.rowcount == 1

    def finish_trial(self, trial_id: int, state: TrialState, error: str | None = None,
                     experiment_id: int | None = None,
                     searcher_state: dict[str, Any] | None = None) -> bool:
        """End an unfinished trial in a finished `state`, with the searcher state that learnt
        from it, atomically. False (and nothing written) if the trial had finished already."""
        if not state.finished:
            raise ValueError(f"{state} is not a finished state")
        now = self.clock()
        with self.transaction() as c:
            cur = c.execute(
                f"UPDATE trials SET state = ?, error = ?, ended = ?, pid = NULL, run = NULL "
                f"WHERE id = ? AND state NOT IN {FINISHED_STATES}",
                (state.value, error, now, trial_id))
            if cur.rowcount == 1 and searcher_state is not None:
                self.save_searcher_state(experiment_id, searcher_state)
        return cur.rowcount == 1

    def trial(self, trial_id: int) -> Trial:
        row = self.conn.execute(f"SELECT {_TRIAL_COLUMNS} FROM trials WHERE id = ?",
                                (trial_id,)).fetchone()
        if row is None:
            raise NotFound(f"no trial {trial_id}")
        return _trial(row)

    def trials(self, experiment_id: int, states: tuple[str, ...] | None = None,
               limit: int | None = None, offset: int = 0) -> list[Trial]:
        """The experiment's trials by number, optionally only those in `states`, optionally
        a page of them: `limit` trials (None: all) from position `offset`. A negative
        `offset` counts from the end, as a Python index does: the page is the trials at
        positions [count + offset, count + offset + limit) that exist, e.g. ``offset=-50``
        the last 50. Either way the cost grows with the page and its distance from the end
        it is counted from, not with the number of trials."""
        sql = f"SELECT {_TRIAL_COLUMNS} FROM trials WHERE experiment_id = ?"
        params: list[Any] = [experiment_id]
        if states:
            sql += f" AND state IN ({','.join('?' * len(states))})"
            params += list(states)
        if offset >= 0:
            sql += " ORDER BY number LIMIT ? OFFSET ?"
            params += [-1 if limit is None else limit, offset]
            return [_trial(r) for r in self.conn.execute(sql, params)]
        # From the end: the same page read backwards, then turned round.
        back = -offset
        take = back if limit is None else min(back, limit)
        sql += " ORDER BY number DESC LIMIT ? OFFSET ?"
        params += [take, back - take]
        return [_trial(r) for r in reversed(self.conn.execute(sql, params).fetchall())]

    def start_after(self, trial_id: int, seq: int) -> None:
        """A trial that starts from another's checkpoint covering `seq` reports: its own
        reports are numbered from seq + 1 (only for a trial with no report yet)."""
        with self.transaction() as c:
            c.execute("UPDATE trials SET last_seq = ? WHERE id = ? AND last_seq = 0",
                      (seq, trial_id))

    def update_rung(self, experiment_id: int, entry: RungEntry) -> None:
        """Store `entry`'s decision in place of the one its (bracket, level, trial) had (a
        promotion); KeyError when there is no such entry."""
        with self.transaction() as c:
            cur = c.execute(
                "UPDATE rungs SET decision = ? WHERE experiment_id = ? AND bracket = ? "
                "AND level = ? AND trial_id = ?",
                (Decision(entry.decision).value, experiment_id, entry.bracket, entry.level,
                 entry.trial_id))
        if cur.rowcount != 1:
            raise KeyError(f"no rung entry for trial {entry.trial_id} at {entry.level}")

    def best_finished(self, experiment_id: int, n: int) -> list[Trial]:
        """The `n` finished trials with the highest scores, best first (ties: earliest)."""
        rows = self.conn.execute(
            f"SELECT {_TRIAL_COLUMNS} FROM trials WHERE experiment_id = ? AND score IS NOT NULL "
            f"AND state IN {FINISHED_STATES} ORDER BY score DESC, number ASC LIMIT ?",
            (experiment_id, n))
        return [_trial(r) for r in rows]

    def seconds_since_first_trial(self, experiment_id: int) -> float:
        """Store-clock seconds since the experiment's first trial was created (0 before
        one): what its `time_out` counts, through restarts."""
        first = self.first_trial_created(experiment_id)
        return 0.0 if first is None else max(0.0, self.clock() - first)

    def first_trial_created(self, experiment_id: int) -> float | None:
        """When the experiment's first trial was created (store clock), or None."""
        row = self.conn.execute("SELECT MIN(created) FROM trials WHERE experiment_id = ?",
                                (experiment_id,)).fetchone()
        return row[0]

    def count_trials(self, experiment_id: int) -> dict[str, int]:
        """Trials by state, e.g. {'COMPLETED': 12, 'RUNNING': 2}, states in sorted order and
        only those with trials. Constant time in the number of trials: read from the counts
        the triggers of `trials` keep (schema v5)."""
        return dict(self.conn.execute(
            "SELECT state, n FROM trial_counts WHERE experiment_id = ? AND n > 0 "
            "ORDER BY state", (experiment_id,)).fetchall())

    def count_failures(self, experiment_id: int) -> int:
        """How many of the experiment's trials failed for a reason of their own (FAILED, not
        ended by the user: `tuned.core.lifecycle.NOT_FAILURES`)."""
        return self.conn.execute(f"SELECT COUNT(*) FROM trials WHERE {_OWN_FAILURE}",
                                 (experiment_id, *NOT_FAILURES)).fetchone()[0]

    def last_errors(self, experiment_id: int, n: int = 3) -> list[tuple[int, str]]:
        """(number, error) of the last `n` trials that failed for a reason of their own,
        the most recently ended first."""
        return [tuple(r) for r in self.conn.execute(
            f"SELECT number, error FROM trials WHERE {_OWN_FAILURE} "
            f"ORDER BY ended DESC, number DESC LIMIT ?", (experiment_id, *NOT_FAILURES, n))]

    def reward_timeline(self, experiment_id: int) -> list[tuple[int, float, float]]:
        """(number, reward, when) of every trial that has reported, by number: its last
        reported reward (the one `best_trial` ranks it by) and when that report was stored
        (store clock). One index lookup per trial, no scan of the reports."""
        return [tuple(r) for r in self.conn.execute(
            "SELECT t.number, t.last_reward, r.created FROM trials t "
            "JOIN reports r ON r.trial_id = t.id AND r.seq = t.last_seq "
            "WHERE t.experiment_id = ? AND t.score IS NOT NULL ORDER BY t.number",
            (experiment_id,))]

    def best_trial(self, experiment_id: int) -> Trial | None:
        """The trial with the highest score (its last report's reward, signed by mode);
        ties go to the earliest trial. None when no trial has reported."""
        row = self.conn.execute(
            f"SELECT {_TRIAL_COLUMNS} FROM trials WHERE experiment_id = ? AND score IS NOT NULL "
            f"ORDER BY score DESC, number ASC LIMIT 1", (experiment_id,)).fetchone()
        return _trial(row) if row else None

    # -- reports -------------------------------------------------------------------------

    def stored_decision(self, trial_id: int, seq: int) -> str | None:
        row = self.conn.execute("SELECT decision FROM reports WHERE trial_id = ? AND seq = ?",
                                (trial_id, seq)).fetchone()
        return row[0] if row else None

    def stored_report(self, trial_id: int, seq: int) -> tuple[str, float | None] | None:
        """(decision, time value) of a stored report, or None."""
        row = self.conn.execute("SELECT decision, time_value FROM reports "
                                "WHERE trial_id = ? AND seq = ?", (trial_id, seq)).fetchone()
        return (row[0], row[1]) if row else None

    def record_report(self, trial_id: int, seq: int, time_value: float | None,
                      reward: float | None, score: float | None, metrics_json: str,
                      decision: Decision, rungs: tuple[RungEntry, ...] = (),
                      experiment_id: int | None = None) -> str:
        """Store a report with its decision and rung entries in one transaction.

        Returns the decision now stored for `(trial_id, seq)`: the given one, or the one stored
        before when this sequence number was seen already (nothing is written then).
        """
        now = self.clock()
        with self.transaction() as c:
            try:
                c.execute(_INSERT_REPORT, (trial_id, seq, time_value, reward, metrics_json,
                                           decision.value, now))
            except sqlite3.IntegrityError:
                row = c.execute("SELECT decision FROM reports WHERE trial_id = ? AND seq = ?",
                                (trial_id, seq)).fetchone()
                if row is None:
                    raise
                return row[0]
            c.execute(_UPDATE_LAST_REPORT, (seq, time_value, reward, score, trial_id, seq))
            if rungs:
                c.executemany(_INSERT_RUNG, _rung_rows(experiment_id, rungs))
        return decision.value

    def record_reports(self, experiment_id: int, reports: Sequence[NewReport]) -> None:
        """Store new reports of `experiment_id`'s trials, each with its decision and rung
        entries, in one transaction: one statement inserts them all, and each trial's row is
        updated once, from its last report (the highest `seq`). For reports the caller knows
        to be new (the engine stores a trial's report `seq` only after `seq - 1`, and looks
        up a resent one with `stored_report`): one already stored (or of no trial) raises
        `StoreError` and the transaction is rolled back.
        """
        now = self.clock()
        last: dict[int, NewReport] = {}
        for r in reports:
            if r.trial_id not in last or r.seq > last[r.trial_id].seq:
                last[r.trial_id] = r
        with self.transaction() as c:
            try:
                c.executemany(_INSERT_REPORT, [(r.trial_id, r.seq, r.time_value, r.reward,
                                                r.metrics_json, r.decision.value, now)
                                               for r in reports])
            except sqlite3.IntegrityError as exc:
                raise StoreError(f"{self.path}: cannot store reports that are not new "
                                 f"({exc})") from exc
            c.executemany(_UPDATE_LAST_REPORT,
                          [(r.seq, r.time_value, r.reward, r.score, r.trial_id, r.seq)
                           for r in last.values()])
            rungs = [e for r in reports for e in r.rungs]
            if rungs:
                c.executemany(_INSERT_RUNG, _rung_rows(experiment_id, rungs))

    def reports(self, trial_id: int) -> list[Report]:
        rows = self.conn.execute(
            "SELECT trial_id, seq, time_value, reward, metrics, decision, created "
            "FROM reports WHERE trial_id = ? ORDER BY seq", (trial_id,))
        return [Report(r[0], r[1], r[2], r[3], json.loads(r[4]), r[5], r[6]) for r in rows]

    def history(self, experiment_id: int,
                top: int | None = None) -> dict[int, list[dict[str, Any]]]:
        """Trial number -> its reported metrics, in order, for every trial of the experiment
        (trials without reports map to an empty list); with `top`, only the `top` trials of
        highest score (ties: the earliest), which is read without scanning the others."""
        if top is None:
            numbers = self.conn.execute(
                "SELECT number FROM trials WHERE experiment_id = ? ORDER BY number",
                (experiment_id,))
        else:
            numbers = self.conn.execute(
                f"SELECT number FROM ({_TOP_TRIALS}) ORDER BY number", (experiment_id, top))
        out: dict[int, list[dict[str, Any]]] = {r[0]: [] for r in numbers}
        where, params = _chosen_trials(experiment_id, top)
        rows = self.conn.execute(
            "SELECT t.number, r.metrics FROM reports r JOIN trials t ON t.id = r.trial_id "
            f"WHERE {where} ORDER BY t.number, r.seq", params)
        for number, metrics in rows:
            out[number].append(json.loads(metrics))
        return out

    def reward_curves(self, experiment_id: int,
                      top: int | None = None) -> dict[int, list[list[float]]]:
        """Trial number -> [times, rewards] from the stored columns (no JSON to parse): the
        reward against `time_attr` (or the report's sequence number). With `top`, only the
        `top` trials of highest score (ties: the earliest)."""
        out: dict[int, list[list[float]]] = {}
        where, params = _chosen_trials(experiment_id, top)
        rows = self.conn.execute(
            "SELECT t.number, r.time_value, r.reward FROM reports r "
            f"JOIN trials t ON t.id = r.trial_id WHERE {where} "
            "ORDER BY t.number, r.seq", params)
        for number, time_value, reward in rows:
            xs, ys = out.setdefault(number, [[], []])
            xs.append(time_value)
            ys.append(reward)
        return out

    def rungs(self, experiment_id: int) -> list[RungEntry]:
        """The experiment's rung entries in the order they were stored."""
        rows = self.conn.execute(
            "SELECT bracket, level, trial_id, score, decision FROM rungs "
            "WHERE experiment_id = ? ORDER BY id", (experiment_id,))
        return [RungEntry(b, lv, t, s, Decision(d)) for b, lv, t, s, d in rows]


# The experiment's trials that failed for a reason of their own (parameters: the experiment's
# id, then NOT_FAILURES).
_OWN_FAILURE = ("experiment_id = ? AND state = 'FAILED' AND (error IS NULL OR error NOT IN "
                f"({','.join('?' * len(NOT_FAILURES))}))")

_INSERT_REPORT = ("INSERT INTO reports (trial_id, seq, time_value, reward, metrics, decision, "
                  "created) VALUES (?, ?, ?, ?, ?, ?, ?)")
# A trial's last report; never an older one over a newer.
_UPDATE_LAST_REPORT = ("UPDATE trials SET last_seq = ?, last_time = ?, last_reward = ?, "
                       "score = ? WHERE id = ? AND last_seq < ?")
_INSERT_RUNG = ("INSERT INTO rungs (experiment_id, bracket, level, trial_id, score, decision) "
                "VALUES (?, ?, ?, ?, ?, ?)")


def _rung_rows(experiment_id: int | None, rungs: Sequence[RungEntry]) -> list[tuple]:
    return [(experiment_id, r.bracket, r.level, r.trial_id, r.score, r.decision.value)
            for r in rungs]


def _remember(written: dict[str, Any], changed: list[tuple[int, str, str, Any]],
              stale: set[str]) -> None:
    written.update({part: value for _, part, _, value in changed})
    for part in stale:
        written.pop(part, None)


# The `top` trials of highest score (ties: the earliest), by the index trials_by_score.
_TOP_TRIALS = ("SELECT id, number FROM trials WHERE experiment_id = ? AND score IS NOT NULL "
               "ORDER BY score DESC, number LIMIT ?")


def _chosen_trials(experiment_id: int, top: int | None) -> tuple[str, tuple[int, ...]]:
    """A WHERE clause on trials `t` (and its parameters): the experiment's trials, or only
    its `top` best."""
    if top is None:
        return "t.experiment_id = ?", (experiment_id,)
    return f"t.id IN (SELECT id FROM ({_TOP_TRIALS}))", (experiment_id, top)


_TRIAL_COLUMNS = ("id, experiment_id, number, config, state, bracket, attempt, pid, last_seq, "
                  "last_time, last_reward, score, error, created, started, ended, parent, "
                  "host, worker")


def _trial(row: tuple) -> Trial:
    values = list(row)
    values[3] = json.loads(values[3])
    return Trial(*values)


class _JoinedTransaction:
    """An inner `Store.transaction`: it joins the open one (no BEGIN, no COMMIT of its own)."""

    def __init__(self, store: Store):
        self._store = store

    def __enter__(self) -> sqlite3.Connection:
        self._store._depth += 1
        return self._store.conn

    def __exit__(self, *exc: object) -> None:
        self._store._depth -= 1
