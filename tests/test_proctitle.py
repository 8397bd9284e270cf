"""Trials, templates and fork servers say what they are in `ps` (their /proc cmdline)."""

from __future__ import annotations

import os
import signal
import textwrap
from pathlib import Path

import pytest
from helpers import Daemon, wait_until, write_spec

import tuned as ag
from tuned.trial.proctitle import set_title


def _cmdline(pid: int | str) -> str:
    """The process's title as `ps` shows it: its NUL-separated cmdline, NULs as spaces."""
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().rstrip(b"\0").replace(b"\0", b" ").decode()


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return int(stat[stat.rfind(b")") + 2:].split()[1])


def _sleeper(tmp_path: Path) -> Path:
    """A module whose trial touches `<tmp_path>/running` and then sleeps a minute."""
    module = tmp_path / "sleeper.py"
    module.write_text(textwrap.dedent(f"""
        import time
        import tuned

        @tuned.args(x=tuned.space.Real(0, 1))
        def train(args, reporter):
            open({str(tmp_path / "running")!r}, "w").close()
            time.sleep(60)
            reporter(accuracy=args.x)
    """))
    return module


def _running_trial(daemon: Daemon, experiment: str, marker: Path) -> dict:
    """The experiment's one trial, once its function runs (it made `marker`)."""
    wait_until(marker.exists, 30, daemon.log, every=0.05)
    (trial,) = daemon.json("trials", experiment)["trials"]
    assert trial["state"] == "RUNNING" and trial["pid"], trial
    return trial


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_daemon_trial_and_its_template_are_titled(daemon, tmp_path, method):
    module = _sleeper(tmp_path)
    name = f"titled-{method}"
    assert daemon.ctl("submit", write_spec(tmp_path, name, f"""
        name = "{name}"
        entry = "{module}:train"
        num_trials = 1
        start_method = "{method}"
    """)).returncode == 0
    trial = _running_trial(daemon, name, tmp_path / "running")
    pid = trial["pid"]
    try:
        assert _cmdline(pid) == f"tuned: {name} trial {trial['trial']} attempt 1"
        assert _cmdline(_parent(pid)) == f"tuned: template {name}"
    finally:  # a daemon's trials outlive it: this one must not sleep on after the test
        os.killpg(pid, signal.SIGKILL)


def test_in_process_trials_and_the_fork_server_are_titled(tmp_path):
    @ag.args(x=ag.space.Real(0, 1))
    def fn(args, reporter):
        reporter(accuracy=args.x, title=_cmdline("self"), server=_cmdline(os.getppid()))

    s = ag.scheduler.FIFOScheduler(fn, num_trials=2, time_attr=None, name="inproc",
                                   resource={"num_cpus": 1, "num_gpus": 0},
                                   checkpoint=str(tmp_path / "t.db"), seed=1)
    s.run()
    s.join_jobs()
    name = s.experiment.name
    assert {n: h[0]["title"] for n, h in s.training_history.items()} == {
        n: f"tuned: {name} trial {n} attempt 1" for n in (0, 1)}
    assert {h[0]["server"] for h in s.training_history.values()} == {"tuned: fork server"}
    assert not _cmdline("self").startswith("tuned:")  # the engine's own title is untouched


@pytest.mark.parametrize("title", [None, "", 7, ["x"]])
def test_no_title_changes_nothing(title):
    before = _cmdline("self")
    assert set_title(title) is False
    assert _cmdline("self") == before
