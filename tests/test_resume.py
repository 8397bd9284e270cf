"""Resume after SIGKILL: a killed run, rerun with resume=True, finishes without repeating
finished trials; with one slot it ends exactly as a run never killed."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "tutorial_run.py"


def _start(db: Path, kind: str, trials: int, slots: int, resume: bool,
           pause: float, failpoints: str = "") -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), str(db), kind, str(trials), str(slots),
         "1" if resume else "0", str(pause)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "TUNED_FAILPOINTS": failpoints})


def _finished(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=5) as c:
            return c.execute("SELECT COUNT(*) FROM trials WHERE state IN "
                             "('COMPLETED','STOPPED','FAILED')").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def _kill_when(proc: subprocess.Popen, db: Path, finished_at_least: int) -> None:
    deadline = time.monotonic() + 60
    while _finished(db) < finished_at_least:
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _snapshot(db: Path) -> dict:
    with sqlite3.connect(db) as c:
        trials = c.execute("SELECT id, number, config, state FROM trials ORDER BY number")
        out = {}
        for tid, number, config, state in trials.fetchall():
            reports = c.execute("SELECT seq, metrics, decision FROM reports WHERE trial_id = ? "
                                "ORDER BY seq", (tid,)).fetchall()
            out[number] = (config, state, reports)
        return out


def _run_to_end(db: Path, kind: str, trials: int, slots: int, resume: bool) -> str:
    proc = _start(db, kind, trials, slots, resume, 0.0)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return out


def _no_trial_processes_left(db: Path) -> None:
    with sqlite3.connect(db) as c:
        pids = [r[0] for r in c.execute("SELECT pid FROM trials WHERE pid IS NOT NULL")]
    deadline = time.monotonic() + 5
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.02)
        else:
            pytest.fail(f"trial process {pid} outlived the killed engine")


def test_hyperband_killed_midway_resumes_without_repeating_finished_trials(tmp_path):
    db = tmp_path / "hb.db"
    proc = _start(db, "hyperband", 100, 2, False, 0.002)
    _kill_when(proc, db, 30)
    _no_trial_processes_left(db)
    before = _snapshot(db)
    finished_before = {n: v for n, v in before.items()
                       if v[1] in ("COMPLETED", "STOPPED", "FAILED")}
    assert 30 <= len(finished_before) < 100

    out = _run_to_end(db, "hyperband", 100, 2, True)
    assert out.startswith("best")
    after = _snapshot(db)
    assert sorted(after) == list(range(100))
    for number, value in finished_before.items():
        assert after[number] == value, f"finished trial {number} changed on resume"
    assert {v[1] for v in after.values()} <= {"COMPLETED", "STOPPED"}
    with sqlite3.connect(db) as c:
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert c.execute("SELECT COUNT(*) FROM experiments").fetchone()[0] == 1
        rungs = c.execute("SELECT COUNT(*), COUNT(DISTINCT bracket || ':' || level || ':' || "
                          "trial_id) FROM rungs").fetchone()
        assert rungs[0] == rungs[1]


@pytest.mark.parametrize("kind", ["fifo", "hyperband"])
def test_one_slot_run_killed_three_times_equals_a_run_never_killed(tmp_path, kind):
    trials = 30
    reference = tmp_path / "reference.db"
    _run_to_end(reference, kind, trials, 1, False)

    db = tmp_path / "killed.db"
    rng = random.Random(3)
    for i in range(3):
        proc = _start(db, kind, trials, 1, i > 0, 0.001)
        _kill_when(proc, db, _finished(db) + rng.randint(1, 6))
    out = _run_to_end(db, kind, trials, 1, True)
    assert _snapshot(db) == _snapshot(reference)
    assert out == _run_to_end(tmp_path / "again.db", kind, trials, 1, False)


def _interrupted_cleanly_then_resumed(db: Path, trials: int) -> None:
    """After a Ctrl-C: no trial RUNNING, no trial process left; a resume finishes them all."""
    with sqlite3.connect(db) as c:
        assert c.execute("SELECT COUNT(*) FROM trials WHERE state = 'RUNNING'").fetchone()[0] == 0
    _no_trial_processes_left(db)
    _run_to_end(db, "hyperband", trials, 2, True)
    states = {v[1] for v in _snapshot(db).values()}
    assert states <= {"COMPLETED", "STOPPED"} and len(_snapshot(db)) == trials


def test_ctrl_c_leaves_no_trial_running_and_resume_finishes_cleanly(tmp_path):
    db = tmp_path / "int.db"
    proc = _start(db, "hyperband", 60, 2, False, 0.02)
    deadline = time.monotonic() + 60
    while _finished(db) < 10:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode != 0 and "KeyboardInterrupt" in err
    _interrupted_cleanly_then_resumed(db, 60)


@pytest.mark.parametrize("nth", [3, 8])
def test_ctrl_c_just_after_a_fork_was_asked_for_leaves_no_trial_running(tmp_path, nth):
    """SIGINT between asking the template for a child and recording the request: remembered,
    raised at the engine's next step, and the request stays recorded (the child the template
    forks for it is the one expected), so the run stops as for any Ctrl-C."""
    db = tmp_path / "int.db"
    proc = _start(db, "hyperband", 30, 2, False, 0.0, f"fork_asked:{nth}:INT")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "KeyboardInterrupt" in err, err
    assert "IndexError" not in err, err
    _interrupted_cleanly_then_resumed(db, 30)
