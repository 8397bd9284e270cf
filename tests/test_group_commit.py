"""Group commit: the reports of trials that report at about the same time share one durable
commit, no trial hears its decision before the commit holding its report, and the reports
are handled in the order they came (so they get the decisions one-by-one handling would
give). Real child processes, real SQLite (WAL, synchronous=FULL)."""

from __future__ import annotations

import sqlite3

import tuned as ag
from tuned.core.decisions import Decision
from tuned.core.schedulers.base import Outcome
from tuned.core.schedulers.hyperband import HyperbandStopping
from tuned.engine.engine import HOLD_MAX, Engine
from tuned.engine.resources import ResourcePool
from tuned.executors.local import LocalExecutor
from tuned.executors.template import ForkServerExecutor
from tuned.protocol.channel import Message
from tuned.trial.worker import make_runner


def _is_report(event) -> bool:
    return isinstance(event, Message) and bool(event.body) and "seq" in event.body


@ag.args(x=ag.space.Real(0.0, 1.0), n=150)
def busy_reporter(args, reporter):
    for e in range(1, args.n + 1):
        reporter(epoch=e, accuracy=args.x)


@ag.args(x=ag.space.Real(0.0, 1.0), epochs=10)
def halving_fn(args, reporter):
    for e in range(1, args.epochs + 1):
        reporter(epoch=e, accuracy=args.x * e / 10)


def test_reports_of_two_trials_share_durable_commits(tmp_path, monkeypatch):
    """Two trials reporting in a loop: one by one, each report would get a commit of its
    own (the other's report comes while it is being committed); held for a moment, most
    commits carry a report of each."""
    batches: list[int] = []
    step = Engine.step

    def counting_step(self, events):
        batches.append(sum(1 for e in events if _is_report(e)))
        step(self, events)

    monkeypatch.setattr(Engine, "step", counting_step)
    s = ag.scheduler.FIFOScheduler(busy_reporter, resource={"num_cpus": 1}, num_trials=2,
                                   max_concurrent=2, checkpoint=str(tmp_path / "t.db"),
                                   seed=0)
    s.run()
    reports, commits = sum(batches), sum(1 for b in batches if b)
    assert reports == 300
    assert [len(h) for h in s.training_history.values()] == [150, 150]
    assert commits <= 0.8 * reports, (commits, reports)


def test_no_trial_hears_a_decision_before_its_report_is_committed(tmp_path, monkeypatch):
    """Every answer is sent only once another connection (which sees committed data only)
    finds the report stored with that decision."""
    db = str(tmp_path / "t.db")
    checked: list[tuple[int, int]] = []
    early: list[tuple[int, int, str]] = []
    send = LocalExecutor.send

    def checking_send(self, trial_id, body):
        if "decision" in body:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as other:
                row = other.execute("SELECT decision FROM reports WHERE trial_id = ? "
                                    "AND seq = ?", (trial_id, body["seq"])).fetchone()
            if row is None or row[0] != body["decision"]:
                early.append((trial_id, body["seq"], body["decision"]))
            checked.append((trial_id, body["seq"]))
        return send(self, trial_id, body)

    monkeypatch.setattr(LocalExecutor, "send", checking_send)
    s = ag.scheduler.HyperbandScheduler(halving_fn, resource={"num_cpus": 1}, num_trials=30,
                                        max_concurrent=2, checkpoint=db, seed=0,
                                        grace_period=1, reduction_factor=3)
    s.run()
    assert early == []
    assert len(checked) == sum(len(h) for h in s.training_history.values()) > 30


def test_held_reports_are_handled_in_arrival_order_with_one_by_one_decisions(tmp_path,
                                                                             monkeypatch):
    """The engine handles reports in the order they arrived, and a fresh scheduler fed
    them one by one in that order makes the same decisions, which are the stored ones."""
    arrivals: list[tuple[int, int]] = []
    handled: list[tuple[int, int, float, float, str]] = []
    arrived, report = Engine.arrived, Engine._report

    def noting_arrived(self, events):
        arrivals.extend((e.trial_id, e.body["seq"]) for e in events if _is_report(e))
        arrived(self, events)

    def noting_report(self, live, body):
        on_report = self.scheduler.on_report

        def spy(trial_id, bracket, time_value, score):
            outcome = on_report(trial_id, bracket, time_value, score)
            handled.append((trial_id, body["seq"], time_value, score,
                            outcome.decision.value))
            return outcome

        self.scheduler.on_report = spy
        try:
            return report(self, live, body)
        finally:
            del self.scheduler.on_report

    monkeypatch.setattr(Engine, "arrived", noting_arrived)
    monkeypatch.setattr(Engine, "_report", noting_report)
    s = ag.scheduler.HyperbandScheduler(halving_fn, resource={"num_cpus": 1}, num_trials=40,
                                        max_concurrent=2, checkpoint=str(tmp_path / "t.db"),
                                        seed=3, grace_period=1, reduction_factor=3)
    s.run()
    assert [(t, q) for t, q, *_ in handled] == arrivals
    fresh = HyperbandStopping(max_t=10, grace_period=1, reduction_factor=3, seed=3)
    one_by_one = [fresh.on_report(t, 0, time_value, score).decision.value
                  for t, _, time_value, score, _ in handled]
    assert one_by_one == [d for *_, d in handled]
    stored = {(r.trial_id, r.seq): r.decision
              for t in s.trials() for r in s.store.reports(t.id)}
    assert {(t, q): d for t, q, _, _, d in handled} == stored


def test_a_batch_is_held_only_for_trials_answered_within_the_hold(tmp_path):
    """hold_for: no wait without a report, nor for a trial answered longer ago than the
    hold, one told to stop, or one that spoke since; at most HOLD_MAX otherwise."""
    s = ag.scheduler.FIFOScheduler(halving_fn, resource={"num_cpus": 1}, num_trials=2,
                                   max_concurrent=2, checkpoint=str(tmp_path / "t.db"),
                                   seed=0)
    executor = ForkServerExecutor(make_runner(halving_fn, {}), spares=2)
    engine = Engine(s.store, s.experiment, s.spec, executor, ResourcePool(2),
                    str(tmp_path / "logs"), 2)
    engine._commit_seconds = 1.0  # a slow disk: the hold is HOLD_MAX
    try:
        engine.start()
        engine.step([])  # launches both trials
        a, b = engine.live
        report = Message(a, {"seq": 1, "metrics": {"accuracy": 0.5, "epoch": 1}})
        done = Message(a, {"op": "done"})
        assert engine.hold_for([report]) is None  # nothing arrived yet: nothing held
        engine.live[b].answered = __import__("time").monotonic()
        engine.arrived([done])
        assert engine.hold_for([done]) is None  # no report in the batch
        engine.arrived([report])
        wait = engine.hold_for([done, report])
        assert wait is not None and 0 < wait <= HOLD_MAX
        engine.live[b].stop = Outcome(Decision.STOP)  # told to stop: it exits, not reports
        assert engine.hold_for([done, report]) is None
        engine.live[b].stop = None
        engine.live[b].answered -= 2 * HOLD_MAX  # answered long ago: not waited for
        assert engine.hold_for([done, report]) is None
        engine.live[b].answered += 2 * HOLD_MAX
        engine.arrived([Message(b, {"op": "done"})])  # b spoke: nobody left to wait for
        assert engine.hold_for([done, report]) is None
    finally:
        engine.executor.shutdown(grace=0.1)
        engine.executor.close()
