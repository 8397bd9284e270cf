"""Make the frozen databases of tests/fixtures/: one per schema version, each written by the
tuned of a commit that shipped that version.

    .venv/bin/python tests/make_fixtures.py [--out tests/fixtures] [--versions N,...]

For each version, the commit below is checked out in a temporary git worktree and the
experiment in GENERATOR runs there (in-process API, that commit's code only: PYTHONPATH is
the worktree), storing into a fresh file:

- ``fx-fifo``: FIFOScheduler, 3 trials of 4 epochs, one at a time, run to its end;
- ``fx-hb``: HyperbandScheduler (stopping, grace period 1, reduction factor 2), 6 trials of
  4 epochs, one at a time; the 5th trial, after its first acknowledged report, sends SIGINT
  to the engine (as Ctrl-C would), which puts that trial back to PENDING and leaves the
  experiment RUNNING with 4 finished trials, to be resumed.

Rewards depend only on the order of launch (0.30, 0.50, 0.20, 0.40, 0.60 + 0.05 per epoch),
so that every version stores the same decisions. The file is then compacted (VACUUM: the
code of every version preallocates 4 MiB of WAL, which leaves that much free space in the
file) and its WAL checkpointed into it, so that each fixture is a single small .db file,
still in WAL mode. What a raw sqlite3 connection reads from the result (the schema, every
experiment, trial, report, rung and searcher-state part) goes to ``manifest.json``, which
tests/test_storage_faults.py compares with what today's Store reads after migrating a copy.

Version 1 shipped on its own (commits c1d6f5f..64a90d8; from 3daf72e on made through
sqlite-utils, as `MIGRATIONS[1]` still is); the last commit of each older version is used,
for version 4 the commit that was HEAD when the fixtures were made, and for each later
version the commit that introduced it (made with --versions N, the others kept). The top-level
.gitignore ignores *.db; tests/fixtures/.gitignore lets these in.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# schema version -> the last commit that shipped it
# (see `git log --follow -- tuned/store/database.py`).
COMMITS = {
    1: "64a90d8",  # Engine step API for a daemon (the last commit of schema v1)
    2: "4145d9e",  # trials pages and curves of the best N trials (the last of v2)
    3: "a3c2baf",  # async submit, checkpoints, Hyperband promotion (the last of v3)
    4: "2a40fb5",  # clones get their parent's checkpoint (HEAD when the fixtures were made)
    5: "2c56d41",  # trials by state kept by triggers (the commit that introduced v5)
    6: "5106052",  # experiments keep the reason of their state (introduced v6)
    7: "531d0b5",  # trials keep their remote run, its token, host and worker (introduced v7)
}

GENERATOR = r'''
import os, signal, sys
import tuned as ag

path = sys.argv[1]
BASES = [0.30, 0.50, 0.20, 0.40, 0.60, 0.10]
ENGINE = os.getpid()


@ag.args(lr=ag.space.Real(1e-3, 1e-2, log=True), wd=ag.space.Real(1e-3, 1e-2), epochs=4)
def train_fn(args, reporter):
    counter = os.environ["FX_COUNTER"]
    with open(counter, "a") as f:
        f.write("x")
    launch = os.path.getsize(counter)
    base = BASES[(launch - 1) % len(BASES)]
    for epoch in range(1, args.epochs + 1):
        reporter(epoch=epoch, accuracy=round(base + 0.05 * epoch, 4))
        if launch == int(os.environ.get("FX_INTERRUPT_AT", "0")):
            os.kill(ENGINE, signal.SIGINT)
            signal.pause()


common = dict(resource={"num_cpus": 1, "num_gpus": 0}, checkpoint=path, max_concurrent=1,
              reward_attr="accuracy", time_attr="epoch")
os.environ["FX_COUNTER"] = os.path.abspath("launches-fifo")
fifo = ag.scheduler.FIFOScheduler(train_fn, num_trials=3, seed=11, name="fx-fifo", **common)
fifo.run()
os.environ["FX_COUNTER"] = os.path.abspath("launches-hb")
os.environ["FX_INTERRUPT_AT"] = "5"
hb = ag.scheduler.HyperbandScheduler(train_fn, num_trials=6, seed=7, name="fx-hb",
                                     grace_period=1, reduction_factor=2, **common)
try:
    hb.run()
except KeyboardInterrupt:
    print("interrupted as planned")
else:
    sys.exit("fx-hb was meant to be interrupted")
'''


def git(*args: str) -> str:
    """Run git in the repository; its stdout."""
    return subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True,
                          text=True).stdout.strip()


def generate(commit: str, db: Path) -> None:
    """Run GENERATOR with the tuned of `commit` (a temporary worktree), storing into `db`."""
    with tempfile.TemporaryDirectory(prefix="tuned-fx-") as tmp:
        tree = Path(tmp) / "tree"
        work = Path(tmp) / "work"
        work.mkdir()
        git("worktree", "add", "--detach", str(tree), commit)
        try:
            env = {**os.environ, "PYTHONPATH": str(tree)}
            out = subprocess.run([sys.executable, "-c", GENERATOR, str(db)], cwd=work, env=env,
                                 capture_output=True, text=True, timeout=300)
            if out.returncode != 0 or "interrupted as planned" not in out.stdout:
                raise SystemExit(f"{commit}: the generator failed\n{out.stdout}\n{out.stderr}")
        finally:
            git("worktree", "remove", "--force", str(tree))


def compact(db: Path) -> None:
    """VACUUM the file and checkpoint its WAL into it: one small file, still in WAL mode."""
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("VACUUM")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    for suffix in ("-wal", "-shm"):
        assert not os.path.exists(f"{db}{suffix}"), f"{db}{suffix} left over"


def schema(conn: sqlite3.Connection) -> dict[str, Any]:
    """Tables -> their columns (name, type, not null, default, pk), indexes -> their table,
    columns and uniqueness, and (only where there are some, as from version 5 on) triggers
    -> their table and SQL, whitespace folded: what a schema version is made of."""
    out: dict[str, Any] = {"tables": {}, "indexes": {}}
    rows = conn.execute("SELECT type, name, tbl_name FROM sqlite_master "
                        "WHERE name NOT LIKE 'sqlite_%' ORDER BY name").fetchall()
    for kind, name, table in rows:
        if kind == "table":
            out["tables"][name] = [list(r[1:6]) for r in
                                   conn.execute(f"PRAGMA table_xinfo('{name}')")]
        elif kind == "index":
            unique = next(r[2] for r in conn.execute(f"PRAGMA index_list('{table}')")
                          if r[1] == name)
            out["indexes"][name] = [table, [r[2] for r in
                                            conn.execute(f"PRAGMA index_info('{name}')")],
                                    unique]
    triggers = conn.execute("SELECT name, tbl_name, sql FROM sqlite_master "
                            "WHERE type = 'trigger' ORDER BY name").fetchall()
    if triggers:
        out["triggers"] = {name: [table, " ".join(sql.split())]
                           for name, table, sql in triggers}
    return out


def record(db: Path) -> dict[str, Any]:
    """What a raw sqlite3 connection reads from `db`, in the terms of the Store's API."""
    conn = sqlite3.connect(db)
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    experiments = []
    for eid, name, spec, state, created, updated in conn.execute(
            "SELECT id, name, spec, state, created, updated FROM experiments ORDER BY id"):
        trials = []
        for row in conn.execute(
                "SELECT id, number, config, state, bracket, attempt, last_seq, last_time, "
                "last_reward, score, error, created, started, ended FROM trials "
                "WHERE experiment_id = ? ORDER BY number", (eid,)).fetchall():
            tid, *values = row
            keys = ["number", "config", "state", "bracket", "attempt", "last_seq",
                    "last_time", "last_reward", "score", "error", "created", "started",
                    "ended"]
            trial = dict(zip(keys, values, strict=True))
            trial["config"] = json.loads(trial["config"])
            trial["reports"] = [
                [seq, t, r, json.loads(m), d, c] for seq, t, r, m, d, c in conn.execute(
                    "SELECT seq, time_value, reward, metrics, decision, created FROM reports "
                    "WHERE trial_id = ? ORDER BY seq", (tid,))]
            trials.append(trial)
        rungs = [[b, lv, n, s, d] for b, lv, n, s, d in conn.execute(
            "SELECT r.bracket, r.level, t.number, r.score, r.decision FROM rungs r "
            "JOIN trials t ON t.id = r.trial_id WHERE r.experiment_id = ? ORDER BY r.id",
            (eid,))]
        searcher = {part: json.loads(value) for part, value in conn.execute(
            "SELECT part, value FROM searcher_state WHERE experiment_id = ?", (eid,))}
        experiments.append({"name": name, "spec": json.loads(spec), "state": state,
                            "created": created, "updated": updated, "trials": trials,
                            "rungs": rungs, "searcher_state": searcher})
    out = {"schema_version": version, "schema": schema(conn), "experiments": experiments}
    conn.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures")
    parser.add_argument("--versions", default=None, metavar="N,M",
                        help="make only these versions (e.g. a new one), keeping the others' "
                             "files and manifest entries as they are [default: all]")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    wanted = (sorted(COMMITS) if args.versions is None
              else [int(v) for v in args.versions.split(",")])
    manifest: dict[str, Any] = {"sqlite_version": sqlite3.sqlite_version, "versions": {}}
    kept = args.out / "manifest.json"
    if args.versions is not None and kept.exists():
        manifest["versions"] = json.loads(kept.read_text())["versions"]
    with tempfile.TemporaryDirectory(prefix="tuned-fx-out-") as tmp:
        for version in wanted:
            commit = COMMITS[version]
            db = Path(tmp) / f"schema-v{version}.db"
            generate(commit, db)
            compact(db)
            recorded = record(db)
            if recorded["schema_version"] != version:
                raise SystemExit(f"{commit} wrote schema {recorded['schema_version']}, "
                                 f"not {version}")
            full = git("rev-parse", commit)
            manifest["versions"][str(version)] = {
                "file": db.name, "commit": full, "subject": git("log", "-1", "--format=%s",
                                                                full), **recorded}
            shutil.copyfile(db, args.out / db.name)
            print(f"v{version}: {commit} -> {args.out / db.name} ({db.stat().st_size} bytes)")
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True)
                                            + "\n")


if __name__ == "__main__":
    main()
