"""Trials outlive their daemon: a restarted daemon adopts the live ones (docs/architecture.md,
invariant 3), with real daemons, real trials (each with a child process of its own), fake
GPUs, SIGKILL and SIGTERM."""

from __future__ import annotations

import os
import signal
import textwrap
from itertools import pairwise
from pathlib import Path

import pytest
from helpers import Daemon, wait_until, write_spec

EPOCHS = 25


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is as good as gone
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def _write_trial_module(tmp_path: Path) -> tuple[Path, Path]:
    """A training function that starts a helper process of its own and reports its pid and
    GPU at every epoch; each helper's pid goes to a file under `marks`."""
    marks = tmp_path / "marks"
    marks.mkdir()
    module = tmp_path / "adoptee.py"
    module.write_text(textwrap.dedent(f"""
        import os, subprocess, sys, time
        import tuned

        @tuned.args(x=tuned.space.Real(0, 1), epochs={EPOCHS})
        def train(args, reporter):
            helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
            with open(os.path.join({str(marks)!r}, str(helper.pid)), "w"):
                pass
            gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "")
            for e in range(args.epochs):
                time.sleep(0.08)
                reporter(epoch=e + 1, accuracy=args.x, gpu=gpu, pid=os.getpid())
            helper.kill()
            helper.wait()
    """))
    return module, marks


def _running(d: Daemon) -> dict[int, tuple[int, int]]:
    """trial id -> (pid, attempt) of the trials stored RUNNING with at least 2 reports."""
    with d.db() as c:
        rows = c.execute("SELECT id, pid, attempt FROM trials "
                         "WHERE state = 'RUNNING' AND last_seq >= 2").fetchall()
    return {tid: (pid, attempt) for tid, pid, attempt in rows}


def _wait_running(d: Daemon, n: int) -> dict[int, tuple[int, int]]:
    return wait_until(lambda: (running := _running(d)) and len(running) >= n and running,
                      60, f"{n} trials' getting going", every=0.05)


def _check_gpus_never_shared(c) -> None:
    """Per GPU, the spans (first to last report) of different trials never overlap."""
    spans: dict[str, list[tuple[float, float, int]]] = {}
    rows = c.execute("SELECT trial_id, MIN(created), MAX(created), "
                     "json_extract(metrics, '$.gpu') FROM reports GROUP BY trial_id")
    for trial_id, first, last, gpu in rows:
        assert gpu, f"trial {trial_id} had no GPU"
        spans.setdefault(gpu, []).append((first, last, trial_id))
    for gpu, items in spans.items():
        items.sort()
        for (_, end, a), (start, _, b) in pairwise(items):
            assert start > end, f"trials {a} and {b} both held {gpu}"


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_live_trials_are_adopted_by_a_restarted_daemon(tmp_path, sig):
    module, marks = _write_trial_module(tmp_path)
    d = Daemon(tmp_path)
    env = {"TUNED_FAKE_GPUS": "4"}
    d.start(env=env)
    try:
        # Room for 6 trials but GPUs for 4: were adopted trials' GPUs not held again,
        # new trials would be handed the same ones.
        assert d.ctl("submit", write_spec(tmp_path, "a", f"""
            name = "a"
            entry = "{module}:train"
            num_trials = 8
            max_concurrent = 6
            seed = 5
            [resources]
            num_cpus = 0.1
            num_gpus = 1
        """)).returncode == 0
        before = _wait_running(d, 4)
        d.proc.send_signal(sig)
        d.proc.wait(timeout=30)
        assert all(_alive(pid) for pid, _ in before.values()), "the trials died with the daemon"
        d.start(env=env)
        assert d.wait_state("a", ("COMPLETED",))["trials"] == {"COMPLETED": 8}
        with d.db() as c:
            for tid, (pid, attempt) in before.items():
                row = c.execute("SELECT attempt FROM trials WHERE id = ?", (tid,)).fetchone()
                assert row[0] == attempt, f"trial {tid} ran again instead of being adopted"
                seqs = c.execute("SELECT seq, json_extract(metrics, '$.pid') FROM reports "
                                 "WHERE trial_id = ? ORDER BY seq", (tid,)).fetchall()
                assert [s for s, _ in seqs] == list(range(1, EPOCHS + 1))
                assert {p for _, p in seqs} == {pid}, "another process reported for it"
            _check_gpus_never_shared(c)
            assert c.execute("SELECT COUNT(*) FROM trials WHERE state = 'RUNNING'"
                             ).fetchone()[0] == 0
        assert all(not _alive(pid) for pid, _ in before.values())
        helpers = [int(p.name) for p in marks.iterdir()]
        assert len(helpers) >= 8 and not any(_alive(pid) for pid in helpers)
    finally:
        d.close()


def test_stop_trials_stops_them_and_they_run_again(tmp_path):
    module, marks = _write_trial_module(tmp_path)
    d = Daemon(tmp_path)
    d.start(args=("--stop-trials",))
    try:
        assert d.ctl("submit", write_spec(tmp_path, "s", f"""
            name = "s"
            entry = "{module}:train"
            num_trials = 3
            max_concurrent = 3
            seed = 5
        """)).returncode == 0
        before = _wait_running(d, 2)
        d.proc.send_signal(signal.SIGTERM)
        d.proc.wait(timeout=30)
        assert not any(_alive(pid) for pid, _ in before.values())
        assert not any(_alive(int(p.name)) for p in marks.iterdir())
        with d.db() as c:
            for tid, (_, attempt) in before.items():
                state, now = c.execute("SELECT state, attempt FROM trials WHERE id = ?",
                                       (tid,)).fetchone()
                assert (state, now) == ("PENDING", attempt + 1)
        d.start(args=("--stop-trials",))
        assert d.wait_state("s", ("COMPLETED",))["trials"] == {"COMPLETED": 3}
    finally:
        d.close()


def test_an_adopted_trial_that_dies_while_no_daemon_runs_runs_again(tmp_path):
    module, _ = _write_trial_module(tmp_path)
    d = Daemon(tmp_path)
    d.start()
    try:
        assert d.ctl("submit", write_spec(tmp_path, "x", f"""
            name = "x"
            entry = "{module}:train"
            num_trials = 2
            max_concurrent = 2
            seed = 5
        """)).returncode == 0
        before = _wait_running(d, 2)
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait()
        victim, (pid, attempt) = sorted(before.items())[0]
        os.killpg(pid, signal.SIGKILL)
        d.start()
        assert d.wait_state("x", ("COMPLETED",))["trials"] == {"COMPLETED": 2}
        with d.db() as c:
            assert c.execute("SELECT attempt FROM trials WHERE id = ?",
                             (victim,)).fetchone()[0] == attempt + 1
            counts = c.execute("SELECT COUNT(*), COUNT(DISTINCT seq) FROM reports "
                               "WHERE trial_id = ?", (victim,)).fetchone()
            assert counts == (EPOCHS, EPOCHS)
    finally:
        d.close()
