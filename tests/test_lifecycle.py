"""An experiment's life through a real daemon and in-process: true final states (STOPPED,
FAILED, COMPLETED) that survive a restart, admission and fair sharing of the CPUs,
resume with a larger budget, delete, export, and the CLI's promises to scripts."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import textwrap
import time
from pathlib import Path

import pytest
from helpers import Daemon, toy_spec, wait_until, write_spec

import tuned
from tuned.core.lifecycle import (
    TRANSITIONS,
    BadTransition,
    ExperimentFailed,
    ExperimentState,
    check_transition,
)
from tuned.store.database import Store


def _module(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(body))
    return path


def _epochs(tmp_path: Path, epochs: int, seconds: float) -> Path:
    """A module whose `train` reports `epochs` epochs, `seconds` apart."""
    return _module(tmp_path, f"epochs{epochs}", f"""
        import time
        import tuned

        @tuned.args(x=tuned.space.Real(0, 1), epochs={epochs})
        def train(args, reporter):
            for e in range(args.epochs):
                time.sleep({seconds})
                reporter(epoch=e + 1, accuracy=args.x * (e + 1))
    """)


def _slow(tmp_path: Path) -> Path:
    return _epochs(tmp_path, 400, 0.05)


def _raising(tmp_path: Path) -> Path:
    return _module(tmp_path, "raising", """
        import tuned

        @tuned.args(x=tuned.space.Real(0, 1))
        def train(args, reporter):
            raise ValueError(f"bad data for x={args.x:.2f}")
    """)


def _trial_states(daemon: Daemon, name: str) -> list[tuple[str, str | None]]:
    return [(t["state"], t["error"]) for t in daemon.json("trials", name, "--all")["trials"]]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


# -- the table ------------------------------------------------------------------------------


def test_the_transition_table_refuses_what_it_does_not_list():
    check_transition("RUNNING", "STOPPED")
    check_transition("STOPPED", "RUNNING")  # resume
    check_transition("FAILED", "FAILED")  # staying is allowed
    with pytest.raises(BadTransition, match="cannot go from COMPLETED to STOPPED"):
        check_transition("COMPLETED", "STOPPED")
    with pytest.raises(BadTransition, match="cannot go from FAILED to RUNNING"):
        check_transition("FAILED", "RUNNING")
    with pytest.raises(BadTransition, match="unknown experiment state"):
        check_transition("RUNNING", "DONE")
    assert TRANSITIONS[ExperimentState.DELETING] == frozenset()  # nothing comes back


def test_the_store_keeps_to_the_table(tmp_path):
    store = Store(tmp_path / "t.db", preallocate=False)
    exp = store.create_experiment("e", {})
    store.set_experiment_state(exp.id, "COMPLETED")
    with pytest.raises(BadTransition):
        store.set_experiment_state(exp.id, "PAUSED")
    assert store.experiment(exp.id).state == "COMPLETED"
    store.set_experiment_state(exp.id, "RUNNING")
    store.set_experiment_state(exp.id, "FAILED", "it broke")
    assert (store.experiment(exp.id).state, store.experiment(exp.id).reason) == \
        ("FAILED", "it broke")


# -- final states through the daemon --------------------------------------------------------


def test_stop_ends_stopped_and_stays_stopped_across_restarts(daemon, tmp_path):
    slow = _slow(tmp_path)
    assert daemon.ctl("submit", write_spec(tmp_path, "s", f"""
        name = "s"
        entry = "{slow}:train"
        num_trials = 6
        max_concurrent = 2
    """)).returncode == 0
    wait_until(lambda: len([t for t in daemon.json("trials", "s")["trials"]
                            if t["reports"]]) >= 2, 20, "two trials' reports", every=0.05)
    pids = [t["pid"] for t in daemon.json("trials", "s")["trials"] if t["state"] == "RUNNING"]
    assert daemon.json("stop", "s")["state"] == "STOPPED"
    # Killed while its trials may still be stopping: the restart finishes the stop.
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait(timeout=10)
    daemon.start()
    status = daemon.json("status", "s")["experiments"][0]
    assert status["state"] == "STOPPED" and status["reason"] == "stopped by the user"
    assert set(status["trials"]) == {"FAILED"}  # the two running; no other was started
    assert set(_trial_states(daemon, "s")) == {("FAILED", "stopped by the user")}
    wait_until(lambda: not any(_alive(p) for p in pids), 10, "the stopped trials' end",
               every=0.05)
    daemon.stop()
    daemon.start()
    assert daemon.json("status", "s")["experiments"][0]["state"] == "STOPPED"


def test_a_stopped_experiment_resumed_with_more_trials_finishes_with_that_count(daemon,
                                                                                 tmp_path):
    short = _epochs(tmp_path, 4, 0.1)
    assert daemon.ctl("submit", write_spec(tmp_path, "r", f"""
        name = "r"
        entry = "{short}:train"
        num_trials = 6
        max_concurrent = 1
    """)).returncode == 0
    wait_until(lambda: daemon.trials_in("r", "COMPLETED") >= 2, 30, "2 completed trials",
               every=0.05)
    assert daemon.json("stop", "r")["state"] == "STOPPED"
    stopped = daemon.wait_state("r", ("STOPPED",))
    made = sum(stopped["trials"].values())
    before = daemon.json("trials", "r", "--all")["trials"]
    assert daemon.json("resume", "r", "--num-trials", str(made + 3))["state"] == "RUNNING"
    done = daemon.wait_state("r", ("COMPLETED",))
    assert sum(done["trials"].values()) == made + 3 and done["num_trials"] == made + 3
    after = daemon.json("trials", "r", "--all")["trials"]
    assert after[:made] == before  # nothing reran: the first trials are as they were
    assert [t["state"] for t in after[made:]] == ["COMPLETED"] * 3


def test_every_trial_failing_ends_failed_with_the_errors(daemon, tmp_path):
    raising = _raising(tmp_path)
    assert daemon.ctl("submit", write_spec(tmp_path, "bad", f"""
        name = "bad"
        entry = "{raising}:train"
        num_trials = 4
    """)).returncode == 0
    ended = daemon.wait_state("bad", ("COMPLETED", "FAILED"))
    assert ended["state"] == "FAILED" and ended["trials"] == {"FAILED": 4}
    assert ended["reason"].startswith("4 trial(s) failed and none succeeded; last errors: ")
    assert "ValueError: bad data for x=" in ended["reason"]
    assert "WARNING tuned.engine: experiment bad FAILED: 4 trial(s) failed" in daemon.log()
    daemon.stop()
    daemon.start()
    assert daemon.json("status", "bad")["experiments"][0]["state"] == "FAILED"
    out = daemon.ctl("resume", "bad")
    assert out.returncode == 1 and "FAILED: it cannot be resumed" in out.stderr


def test_max_failures_before_any_success_fails_the_experiment_early(daemon, tmp_path):
    raising = _raising(tmp_path)
    assert daemon.ctl("submit", write_spec(tmp_path, "early", f"""
        name = "early"
        entry = "{raising}:train"
        num_trials = 50
        max_concurrent = 1
        max_failures = 3
    """)).returncode == 0
    ended = daemon.wait_state("early", ("COMPLETED", "FAILED"))
    assert ended["state"] == "FAILED" and ended["trials"] == {"FAILED": 3}
    assert ended["reason"].startswith("3 trial(s) failed before any succeeded "
                                      "(max_failures = 3); last errors: trial 2: ValueError")


def test_a_budget_spent_with_some_success_is_completed_and_can_be_extended(daemon, tmp_path):
    assert daemon.ctl("submit", toy_spec(tmp_path, "toy", trials=3)).returncode == 0
    assert daemon.wait_state("toy", ("COMPLETED", "FAILED"))["state"] == "COMPLETED"
    out = daemon.ctl("--json", "resume", "toy")
    assert out.returncode == 1
    error = json.loads(out.stdout)["error"]
    assert error["code"] == "conflict" and "--num-trials N" in error["message"]
    out = daemon.ctl("resume", "toy", "--num-trials", "2")
    assert out.returncode == 1 and "below the 3 trial(s)" in out.stderr
    assert daemon.json("resume", "toy", "--num-trials", "6")["num_trials"] == 6
    done = daemon.wait_state("toy", ("COMPLETED",))
    assert done["trials"] == {"COMPLETED": 6} and done["num_trials"] == 6
    rows = daemon.json("trials", "toy", "--all")["trials"]
    assert [t["attempt"] for t in rows] == [1] * 6
    assert len({json.dumps(t["config"], sort_keys=True) for t in rows}) == 6  # RNG went on


def test_delete_frees_the_name_and_removes_logs_and_checkpoints(daemon, tmp_path):
    slow = _slow(tmp_path)
    path = write_spec(tmp_path, "d", f"""
        name = "d"
        entry = "{slow}:train"
        num_trials = 1
    """)
    assert daemon.ctl("submit", path).returncode == 0
    out = daemon.ctl("delete", "d")
    assert out.returncode == 1 and "stop it first" in out.stderr
    assert daemon.json("stop", "d")["state"] == "STOPPED"
    deadline = time.monotonic() + 15
    while daemon.ctl("delete", "d").returncode != 0:  # refused while its trial stops
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert daemon.ctl("status", "d").returncode == 4
    assert not (daemon.state / "logs" / "d").exists()
    assert not (daemon.state / "checkpoints" / "d").exists()
    with daemon.db() as c:
        assert c.execute("SELECT COUNT(*) FROM trials").fetchone()[0] == 0
        assert c.execute("SELECT COUNT(*) FROM trial_counts WHERE n > 0").fetchone()[0] == 0
    assert daemon.ctl("submit", path).returncode == 0  # the name is free again
    assert daemon.json("status", "d")["experiments"][0]["trials"] in ({"RUNNING": 1},
                                                                     {"PENDING": 1})


def test_a_delete_cut_short_is_finished_by_the_next_daemon(daemon, tmp_path):
    assert daemon.ctl("submit", toy_spec(tmp_path, "gone", trials=2)).returncode == 0
    daemon.wait_state("gone", ("COMPLETED",))
    daemon.stop()
    with daemon.db() as c:  # as if killed between marking it and removing its rows
        c.execute("UPDATE experiments SET state = 'DELETING' WHERE name = 'gone'")
    (daemon.state / "trash" / "logs-x").mkdir(parents=True)
    daemon.start()
    assert daemon.ctl("status", "gone").returncode == 4
    assert not (daemon.state / "logs" / "gone").exists()
    assert not (daemon.state / "trash").exists()


def test_export_csv_has_the_space_as_columns_and_a_row_per_trial(daemon, tmp_path):
    assert daemon.ctl("submit", toy_spec(tmp_path, "ex", trials=5)).returncode == 0
    daemon.wait_state("ex", ("COMPLETED",))
    out = daemon.ctl("export", "ex", "--format", "csv")
    assert out.returncode == 0, out.stderr
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    assert list(rows[0])[-2:] == ["lr", "wd"] and len(rows) == 5
    assert [r["trial"] for r in rows] == ["0", "1", "2", "3", "4"]
    assert {r["state"] for r in rows} == {"COMPLETED"}
    reports = daemon.ctl("export", "ex", "--reports", "--format", "jsonl")
    lines = [json.loads(line) for line in reports.stdout.splitlines()]
    assert len(lines) == 5 * 10 and {"accuracy", "epoch"} <= set(lines[0])


# -- admission and sharing --------------------------------------------------------------------


def test_a_spec_larger_than_the_machine_is_refused_at_submit(daemon, tmp_path):
    cpus = daemon.json("status")["cpus"]
    out = daemon.ctl("submit", toy_spec(tmp_path, "huge", extra=f"num_cpus = {cpus + 1}"))
    assert out.returncode == 1
    assert f"num_cpus: {cpus + 1:g} per trial, but this machine has {cpus:g} CPU" in out.stderr
    out = daemon.ctl("submit", toy_spec(tmp_path, "gpu", extra="num_gpus = 1"))
    assert out.returncode == 1 and "num_gpus: 1 per trial, but this machine has 0 GPUs" \
        in out.stderr
    assert daemon.json("status")["experiments"] == []


def test_a_larger_trial_is_not_starved_by_later_smaller_ones(tmp_path):
    """One CPU: 'small' runs half-CPU trials back to back (its first two slow, so that 'big'
    surely waits); 'big' (a whole CPU) is submitted while they run. With the longest waiter
    holding what frees up, big starts once those two end, not after all of small's trials
    (each of which would otherwise take the half CPU freed before the other half frees)."""
    d = Daemon(tmp_path)
    d.start(cpus=1)
    try:
        paced = _module(tmp_path, "paced", """
            import time
            import tuned

            @tuned.args(x=tuned.space.Real(0, 1), epochs=4)
            def train(args, reporter):
                pause = 0.4 if reporter.trial_number < 2 else 0.05
                for e in range(args.epochs):
                    time.sleep(pause)
                    reporter(epoch=e + 1, accuracy=args.x)
        """)
        for name, cpus, trials in (("small", 0.5, 20), ("big", 1, 1)):
            assert d.ctl("submit", write_spec(tmp_path, name, f"""
                name = "{name}"
                entry = "{paced}:train"
                num_trials = {trials}
                num_cpus = {cpus}
            """)).returncode == 0
            deadline = time.monotonic() + 20
            while name == "small" and \
                    d.json("status", "small")["experiments"][0]["trials"].get("RUNNING") != 2:
                assert time.monotonic() < deadline
                time.sleep(0.02)
        waiting = d.json("status", "big")["experiments"][0]["waiting"]
        assert waiting is not None and waiting.startswith("waiting: needs 1 CPU, "), waiting
        d.wait_state("big", ("COMPLETED",))
        d.wait_state("small", ("COMPLETED",))
        with d.db() as c:
            rows = c.execute("SELECT e.name, t.started FROM trials t JOIN experiments e "
                             "ON e.id = t.experiment_id").fetchall()
        big_start = next(s for n, s in rows if n == "big")
        later = [s for n, s in rows if n == "small" and s > big_start]
        assert len(later) >= 15, "big waited for most of small's trials"
    finally:
        d.close()


# -- the command line, for scripts ----------------------------------------------------------


def test_json_anywhere_errors_as_json_and_not_found_codes(daemon, tmp_path):
    assert daemon.ctl("submit", toy_spec(tmp_path, "j", trials=2)).returncode == 0
    daemon.wait_state("j", ("COMPLETED",))
    after = daemon.ctl("status", "j", "--json")
    assert after.returncode == 0
    assert json.loads(after.stdout)["experiments"][0]["experiment"] == "j"
    out = daemon.ctl("--json", "best", "nosuch")
    assert out.returncode == 4
    assert json.loads(out.stdout) == {"error": {"code": "not_found",
                                                "message": "no experiment 'nosuch'"}}
    out = daemon.ctl("curves", "j", "--metric", "nosuch")
    assert out.returncode == 4 and "no metric 'nosuch'" in out.stderr
    assert "accuracy" in out.stderr  # it says which metrics there are
    out = daemon.ctl("curves", "j", "--best-so-far")
    assert out.returncode == 0 and "best accuracy (max) against trials" in out.stdout
    for args in (("status",), ("trials", "j"), ("best", "j"), ("curves", "j")):
        text = daemon.ctl(*args).stdout
        assert text and max(len(line) for line in text.splitlines()) <= 100, args
    assert daemon.ctl("best", "j").stdout.startswith(
        f"trial {daemon.json('best', 'j')['trial']}: accuracy (max) ")


def test_a_refused_serve_writes_nothing(daemon, tmp_path):
    other = tmp_path / "other-state"
    second = Daemon(tmp_path)
    second.state, second.sock = other, daemon.sock  # the first one's socket
    proc = second.start(wait=False)
    assert proc.wait(timeout=20) == 1
    assert "a daemon already listens at" in second.log()
    assert not other.exists()


# -- in-process ---------------------------------------------------------------------------------


def test_in_process_every_trial_failing_raises_and_resume_starts_afresh(tmp_path):
    @tuned.args(x=tuned.space.Real(0, 1))
    def train(args, reporter):
        raise RuntimeError("no GPU memory")

    db = str(tmp_path / "t.db")
    scheduler = tuned.scheduler.FIFOScheduler(train, num_trials=3, checkpoint=db,
                                              name="oops", resource={"num_cpus": 1})
    with pytest.raises(ExperimentFailed, match=r"3 trial.s. failed and none succeeded; last "
                                               r"errors: trial \d: RuntimeError: no GPU memory"):
        scheduler.run()
    assert scheduler.store.experiment("oops").state == "FAILED"
    again = tuned.scheduler.FIFOScheduler(train, num_trials=3, checkpoint=db, name="oops",
                                          resume=True, max_failures=1)
    assert again.experiment.name == "oops-2"
    with pytest.raises(ExperimentFailed, match=r"max_failures = 1"):
        again.run()
    errors = sorted(t.error for t in again.trials())
    # One failure ends it; a trial running beside it (2 slots) is stopped, not counted.
    assert errors[0] == "RuntimeError: no GPU memory"
    assert errors[1:] in ([], ["stopped: the experiment failed"],
                          ["RuntimeError: no GPU memory"])


def test_in_process_a_trial_larger_than_the_machine_is_refused(tmp_path):
    @tuned.args(x=tuned.space.Real(0, 1))
    def train(args, reporter):
        reporter(accuracy=args.x)

    cpus = len(os.sched_getaffinity(0))
    with pytest.raises(ValueError, match=rf"^resource: num_cpus={cpus + 1} per trial, but "
                                         rf"this machine has {cpus} CPU"):
        tuned.scheduler.FIFOScheduler(train, num_trials=1, resource={"num_cpus": cpus + 1},
                                      checkpoint=str(tmp_path / "t.db"))
    assert not (tmp_path / "t.db").exists()  # refused before anything was stored


def test_in_process_trials_frame_and_best_so_far(tmp_path):
    import pandas  # the test extra installs it

    @tuned.args(x=tuned.space.Real(0, 1), epochs=2)
    def train(args, reporter):
        for e in range(args.epochs):
            reporter(epoch=e + 1, accuracy=args.x)

    scheduler = tuned.scheduler.FIFOScheduler(train, num_trials=4,
                                              checkpoint=str(tmp_path / "t.db"))
    scheduler.run()
    frame = scheduler.trials_frame()
    assert isinstance(frame, pandas.DataFrame) and len(frame) == 4
    assert list(frame.columns)[-1] == "x" and set(frame["state"]) == {"COMPLETED"}
    assert frame["reward"].max() == scheduler.get_best_reward()
    progress = scheduler.get_best_so_far()
    assert progress["by_trial"][1][-1] == scheduler.get_best_reward()
    assert "best accuracy (max) against trials" in scheduler.plot_best_so_far()
