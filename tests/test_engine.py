"""The engine end to end through the in-process API: real child processes, real SQLite."""

from __future__ import annotations

import math
import os
import signal
import sqlite3
import time
from itertools import pairwise

import numpy as np
import pytest

import tuned as ag
from tuned.core.decisions import Decision
from tuned.core.schedulers.hyperband import HyperbandStopping


def _sched(cls, fn, tmp_path, **kw):
    kw.setdefault("resource", {"num_cpus": 1, "num_gpus": 0})
    kw.setdefault("checkpoint", str(tmp_path / "t.db"))
    kw.setdefault("seed", 1)
    return cls(fn, **kw)


@ag.args(lr=ag.space.Real(1e-3, 1e-2, log=True), wd=ag.space.Real(1e-3, 1e-2), epochs=10)
def tutorial_fn(args, reporter):
    for e in range(args.epochs):
        acc = 1 - np.power(1.8, -np.random.uniform(e, 2 * e))
        reporter(epoch=e + 1, accuracy=acc, lr=args.lr, wd=args.wd)


def test_fifo_runs_every_trial_to_its_end(tmp_path):
    s = _sched(ag.scheduler.FIFOScheduler, tutorial_fn, tmp_path, num_trials=6,
               time_attr="epoch")
    s.run()
    s.join_jobs()
    history = s.training_history
    assert list(history) == list(range(6))
    assert all([r["epoch"] for r in h] == list(range(1, 11)) for h in history.values())
    assert {t.state for t in s.trials()} == {"COMPLETED"}
    best = s.get_best_config()
    assert set(best) == {"lr", "wd"}
    finals = [h[-1]["accuracy"] for h in history.values()]
    assert s.get_best_reward() == max(finals)
    # Forked trials draw different random numbers (each trial is seeded on its own).
    assert len({h[3]["accuracy"] for h in history.values()}) == 6


def test_mode_min_picks_the_lowest_reward(tmp_path):
    @ag.args(x=ag.space.Int(0, 20))
    def fn(args, reporter):
        reporter(loss=(args.x - 7) ** 2)

    s = _sched(ag.scheduler.FIFOScheduler, fn, tmp_path, num_trials=15, reward_attr="loss",
               mode="min", time_attr=None)
    s.run()
    losses = [h[0]["loss"] for h in s.training_history.values()]
    assert s.get_best_reward() == min(losses)
    assert (s.get_best_config()["x"] - 7) ** 2 == min(losses)


def test_hyperband_stops_most_trials_early_and_replays(tmp_path):
    s = _sched(ag.scheduler.HyperbandScheduler, tutorial_fn, tmp_path, num_trials=40,
               grace_period=1, reduction_factor=3, type="stopping")
    s.run()
    epochs = [len(h) for h in s.training_history.values()]
    assert len(epochs) == 40
    assert sum(e in (1, 3) for e in epochs) >= 20
    assert 1 <= epochs.count(10) <= 10
    assert set(epochs) <= {1, 3, 9, 10}
    states = {t.number: t.state for t in s.trials()}
    for t in s.trials():
        assert t.state == ("COMPLETED" if len(s.training_history[t.number]) == 10
                           else "STOPPED")
    assert len(states) == 40
    # Replaying the stored rungs in a fresh scheduler reproduces every stored decision.
    rungs = s.store.rungs(s.experiment.id)
    assert len({(r.bracket, r.level, r.trial_id) for r in rungs}) == len(rungs)
    replay = HyperbandStopping(max_t=10, grace_period=1, reduction_factor=3)
    by_trial = {t.id: t for t in s.trials()}
    for entry in rungs:
        reports = s.store.reports(entry.trial_id)
        report = next(r for r in reports if r.time_value >= entry.level)
        out = replay.on_report(entry.trial_id, by_trial[entry.trial_id].bracket,
                               report.time_value, report.reward)
        assert out.rungs[0] == entry
        assert report.decision == out.decision.value
    # At most ceil(n / rf) of each rung went on.
    for level in (1, 3, 9):
        at = [r for r in rungs if r.level == level]
        went_on = sum(r.decision is Decision.CONTINUE for r in at)
        assert went_on <= math.ceil(len(at) / 3)


def _states_and_errors(s):
    return {t.number: (t.state, t.error) for t in s.trials()}


def test_bad_reports_fail_their_trial_and_the_run_goes_on(tmp_path):
    @ag.args(kind=ag.space.Categorical("ok", "list", "missing", "nan", "none"))
    def fn(args, reporter):
        if args.kind == "list":
            reporter(accuracy=0.5, extra=[1, 2])
        elif args.kind == "missing":
            reporter(acc=0.5)
        elif args.kind == "nan":
            reporter(accuracy=float("nan"))
        elif args.kind == "none":
            reporter(accuracy=None)
        reporter(accuracy=0.7)

    s = _sched(ag.scheduler.FIFOScheduler, fn, tmp_path, num_trials=5, searcher="grid",
               time_attr=None)
    s.run()
    by_kind = {t.config["kind"]: (t.state, t.error or "") for t in s.trials()}
    assert by_kind["ok"] == ("COMPLETED", "")
    assert by_kind["list"][0] == "FAILED" and "'extra'" in by_kind["list"][1]
    assert by_kind["missing"][0] == "FAILED" and "'accuracy'" in by_kind["missing"][1]
    assert by_kind["nan"][0] == "FAILED" and "nan" in by_kind["nan"][1]
    assert by_kind["none"][0] == "FAILED" and "'accuracy'" in by_kind["none"][1]
    assert s.get_best_reward() == 0.7


def test_a_report_sent_twice_in_one_batch_gets_its_decision_twice(tmp_path):
    @ag.args(x=ag.space.Real(0, 1))
    def fn(args, reporter):
        sock = reporter._sock
        line = b'{"seq": 1, "metrics": {"epoch": 1, "accuracy": 0.25}}\n'
        sock.sendall(line + line.replace(b"0.25", b"0.75"))  # one write: one batch
        answers = b""
        while answers.count(b"\n") < 2:
            answers += sock.recv(4096)
        if answers != b'{"seq":1,"decision":"continue"}\n' * 2:
            raise RuntimeError(f"answers: {answers!r}")
        reporter(epoch=1, accuracy=0.5)  # seq 1 a third time, through the reporter
        reporter(epoch=2, accuracy=0.5)

    s = _sched(ag.scheduler.FIFOScheduler, fn, tmp_path, num_trials=1, time_attr="epoch")
    s.run()
    assert _states_and_errors(s) == {0: ("COMPLETED", None)}
    assert s.training_history[0] == [{"epoch": 1, "accuracy": 0.25},
                                     {"epoch": 2, "accuracy": 0.5}]


def test_crashes_and_exits_fail_with_their_reason(tmp_path):
    @ag.args(kind=ag.space.Categorical("raise", "segv", "exit3", "silent", "kill9", "ok"))
    def fn(args, reporter):
        print("hello from", args.kind, flush=True)
        if args.kind == "raise":
            raise ValueError("bad learning rate")
        if args.kind == "segv":
            os.kill(os.getpid(), signal.SIGSEGV)
        if args.kind == "exit3":
            os._exit(3)
        if args.kind == "kill9":
            reporter(accuracy=0.1)
            os.kill(os.getpid(), signal.SIGKILL)
        if args.kind == "silent":
            return
        reporter(accuracy=1.0)

    s = _sched(ag.scheduler.FIFOScheduler, fn, tmp_path, num_trials=6, searcher="grid",
               time_attr=None)
    s.run()
    by_kind = {t.config["kind"]: (t.state, t.error or "", t.number) for t in s.trials()}
    assert by_kind["raise"][:2] == ("FAILED", "ValueError: bad learning rate")
    assert by_kind["segv"][:2] == ("FAILED", "killed by signal SIGSEGV")
    assert by_kind["exit3"][:2] == ("FAILED", "exited with code 3 (see its log)")
    assert by_kind["silent"][:2] == ("FAILED", "ended without a single report")
    assert by_kind["kill9"][:2] == ("FAILED", "killed by signal SIGKILL")
    assert by_kind["ok"][:2] == ("COMPLETED", "")
    log = (tmp_path / "logs" / s.experiment.name / f"trial-{by_kind['raise'][2]}.log")
    text = log.read_text()
    assert "hello from raise" in text and "Traceback" in text and "bad learning rate" in text


def test_failed_trials_are_retried_while_max_retries_allows(tmp_path):
    marker = tmp_path / "marker"

    @ag.args(x=ag.space.Int(0, 3))
    def fn(args, reporter):
        if not marker.exists():
            marker.write_text("failed once")
            raise RuntimeError("transient")
        reporter(accuracy=1.0)

    s = _sched(ag.scheduler.FIFOScheduler, fn, tmp_path, num_trials=1, max_retries=1,
               time_attr=None)
    s.run()
    (trial,) = s.trials()
    assert (trial.state, trial.attempt) == ("COMPLETED", 2)


def test_trials_run_in_their_own_process_groups_in_parallel(tmp_path):
    seen = tmp_path / "seen"
    seen.mkdir()

    @ag.args(x=ag.space.Int(0, 100))
    def fn(args, reporter):
        (seen / str(os.getpid())).touch()
        deadline = time.monotonic() + 3
        while len(os.listdir(seen)) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        reporter(accuracy=1.0, pgid=os.getpgid(0), pid=os.getpid(), sid=os.getsid(0),
                 together=len(os.listdir(seen)))

    s = _sched(ag.scheduler.FIFOScheduler, fn, tmp_path, num_trials=2, time_attr=None,
               max_concurrent=2)
    if s.slots < 2:
        pytest.skip("needs 2 CPUs")  # pragma: no cover
    s.run()
    for (report,) in s.training_history.values():
        assert report["pgid"] == report["pid"] == report["sid"] != os.getpid()
        assert report["together"] == 2


def test_time_out_stops_new_trials(tmp_path):
    @ag.args(x=ag.space.Real(0, 1))
    def fn(args, reporter):
        time.sleep(0.2)
        reporter(accuracy=args.x)

    s = _sched(ag.scheduler.FIFOScheduler, fn, tmp_path, num_trials=None, time_out=1.0,
               time_attr=None, max_concurrent=1)
    start = time.monotonic()
    s.run()
    assert time.monotonic() - start < 3
    assert 2 <= len(s.trials()) <= 6
    # Resumed later, the experiment's time is up already: time_out counts from its first
    # trial, not again from each start.
    again = _sched(ag.scheduler.FIFOScheduler, fn, tmp_path, num_trials=None, time_out=1.0,
                   time_attr=None, max_concurrent=1, resume=True)
    again.run()
    assert len(again.trials()) == len(s.trials())


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="searcher: must be one of"):
        _sched(ag.scheduler.FIFOScheduler, tutorial_fn, tmp_path, num_trials=1,
               searcher="nope").run()
    with pytest.raises(ValueError, match="num_trials"):
        _sched(ag.scheduler.FIFOScheduler, tutorial_fn, tmp_path)
    with pytest.raises(ValueError, match="resource"):
        _sched(ag.scheduler.FIFOScheduler, tutorial_fn, tmp_path, num_trials=1,
               resource={"num_cpu": 1})
    with pytest.raises(ValueError, match="parameter 'lr'"):
        ag.args(lr=ag.space.Real(1, 0.1))
    with pytest.raises(ValueError, match="max_t"):
        @ag.args(x=ag.space.Real(0, 1))
        def no_epochs(args, reporter):
            pass

        _sched(ag.scheduler.HyperbandScheduler, no_epochs, tmp_path, num_trials=1)


def test_results_are_stored_in_sqlite(tmp_path):
    s = _sched(ag.scheduler.FIFOScheduler, tutorial_fn, tmp_path, num_trials=2)
    s.run()
    with sqlite3.connect(tmp_path / "t.db") as c:
        assert c.execute("SELECT COUNT(*) FROM reports").fetchone()[0] == 20
        assert c.execute("SELECT COUNT(*) FROM trials WHERE state='COMPLETED'").fetchone()[0] == 2


def test_training_curves_png(tmp_path):
    s = _sched(ag.scheduler.FIFOScheduler, tutorial_fn, tmp_path, num_trials=2)
    s.run()
    out = tmp_path / "curves.png"
    s.get_training_curves(filename=str(out), use_legend=True)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gpus_are_handed_out_one_trial_at_a_time(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNED_FAKE_GPUS", "GPU-a,GPU-b,GPU-c")

    @ag.args(x=ag.space.Int(0, 100))
    def fn(args, reporter):
        time.sleep(0.05)
        reporter(accuracy=1.0, cuda=os.environ.get("CUDA_VISIBLE_DEVICES", ""),
                 start=time.time(), end=time.time() + 0.05)
        time.sleep(0.05)

    s = _sched(ag.scheduler.FIFOScheduler, fn, tmp_path, num_trials=6, time_attr=None,
               resource={"num_cpus": 1, "num_gpus": 2})
    s.run()
    reports = [h[0] for h in s.training_history.values()]
    assert all(len(r["cuda"].split(",")) == 2 for r in reports)
    assert all(set(r["cuda"].split(",")) <= {"GPU-a", "GPU-b", "GPU-c"} for r in reports)
    # Only one trial can hold 2 of the 3 GPUs at a time: their intervals never overlap.
    spans = sorted((r["start"], r["end"]) for r in reports)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in pairwise(spans))


def test_more_gpus_than_the_machine_has_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNED_FAKE_GPUS", "1")
    with pytest.raises(ValueError, match="num_gpus=2 per trial, but 1 GPU"):
        _sched(ag.scheduler.FIFOScheduler, tutorial_fn, tmp_path, num_trials=1,
               resource={"num_cpus": 1, "num_gpus": 2})


def test_constants_that_json_cannot_hold_reach_the_trials(tmp_path):
    @ag.args(x=ag.space.Int(0, 3), data=np.arange(4), epochs=2)
    def fn(args, reporter):
        reporter(epoch=1, accuracy=float(args.data.sum()) + args.x + args.epochs)

    s = _sched(ag.scheduler.FIFOScheduler, fn, tmp_path, num_trials=2)
    s.run()
    assert [h[0]["accuracy"] - 8 for h in s.training_history.values()] == [
        t.config["x"] for t in s.trials()]
    assert s.experiment.spec["constants"]["data"] == {"repr": "array([0, 1, 2, 3])"}


@ag.args(x=ag.space.Real(0, 1), epochs=8)
def checkpointing_fn(args, reporter):
    """Keeps its progress in checkpoints; each report says where each run started."""
    import json

    state = reporter.load_checkpoint() or {"epoch": 0, "starts": []}
    state["starts"].append(state["epoch"])
    for epoch in range(state["epoch"] + 1, args.epochs + 1):
        reporter(epoch=epoch, accuracy=args.x * epoch, starts=json.dumps(state["starts"]))
        state["epoch"] = epoch
        reporter.save_checkpoint(state)


def test_hyperband_promotion_resumes_promoted_trials_from_their_checkpoints(tmp_path):
    import json

    s = _sched(ag.scheduler.HyperbandScheduler, checkpointing_fn, tmp_path, type="promotion",
               num_trials=16, grace_period=2, reduction_factor=2,
               resource={"num_cpus": 0.5, "num_gpus": 0})
    s.run()
    trials = s.trials()
    assert {t.state for t in trials} <= {"COMPLETED", "STOPPED"}
    assert any(t.state == "COMPLETED" and t.last_seq == 8 for t in trials)
    with sqlite3.connect(tmp_path / "t.db") as c:
        rows = c.execute("SELECT trial_id, seq, metrics FROM reports ORDER BY trial_id, seq")
        by_trial: dict[int, list] = {}
        for trial_id, seq, metrics in rows:
            by_trial.setdefault(trial_id, []).append((seq, json.loads(metrics)))
        rungs = c.execute("SELECT level, decision FROM rungs").fetchall()
    promoted_past_a_rung = 0
    for reports in by_trial.values():
        assert [seq for seq, _ in reports] == list(range(1, len(reports) + 1))
        starts = json.loads(reports[-1][1]["starts"])
        # Every run after the first started from the checkpoint of the rung it paused at.
        assert starts == [0] + [lv for lv in (2, 4) if lv < len(reports)], starts
        promoted_past_a_rung += len(starts) > 1
    assert promoted_past_a_rung >= 4
    for level in (2, 4):
        decisions = [d for lv, d in rungs if lv == level]
        assert 0 < decisions.count("continue") <= len(decisions) // 2
