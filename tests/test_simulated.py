"""The simulated executor and `tuned.simulate`: the real engine, searchers, schedulers and
store on a virtual clock, with step functions for trials and no process anywhere."""

from __future__ import annotations

import math
import os
import subprocess
import threading
import time

import numpy as np
import pytest

from tuned.core.space import Real, Space
from tuned.engine.engine import Engine
from tuned.engine.executor import RunRef, TrialOrder
from tuned.engine.resources import ResourcePool
from tuned.executors.local import process_start_time
from tuned.executors.simulated import (
    FAKE_PID_BASE,
    SimulatedExecutor,
    SimulationStalled,
    function_steps,
)
from tuned.experiment.spec import ExperimentSpec
from tuned.protocol.channel import Exited, Message
from tuned.simulate import simulate
from tuned.store.database import Store

EPOCHS = 9


def spec_of(**overrides) -> ExperimentSpec:
    data = {"name": "sim", "space": Space({"x": Real(0.0, 1.0)}), "num_trials": 30,
            "seed": 3, "reward_attr": "accuracy", "time_attr": "epoch"}
    data.update(overrides)
    return ExperimentSpec.from_dict(data)


def hyperband(**overrides) -> ExperimentSpec:
    return spec_of(scheduler="hyperband_stopping",
                   scheduler_options={"max_t": EPOCHS, "grace_period": 1,
                                      "reduction_factor": 3}, **overrides)


def seconds_of(config: dict) -> float:
    return 1.0 + config["x"]


def curve(config, seed, start):
    """Noisy saturating curves; each epoch takes 1 + x virtual seconds."""
    for e in range(start + 1, EPOCHS + 1):
        noise = float(np.random.default_rng([seed, e]).normal(0, 0.01))
        yield seconds_of(config), {"epoch": e,
                                   "accuracy": config["x"] * (1 - math.exp(-e / 3)) + noise}


def flat(config, seed, start):
    """Every trial does EPOCHS steps of one virtual second."""
    for e in range(start + 1, EPOCHS + 1):
        yield 1.0, {"epoch": e, "accuracy": config["x"]}


def fingerprint(result):
    trials = [(t.number, t.config, t.state, t.started, t.ended, t.error, t.last_seq)
              for t in result.trials]
    reports = {n: [(r.seq, r.time_value, r.reward, r.decision, r.created) for r in rs]
               for n, rs in result.reports.items()}
    return trials, reports, result.timeline, result.makespan


# -- determinism and virtual time --------------------------------------------------------


def test_same_seed_gives_identical_trials_reports_decisions_and_times():
    a = simulate(hyperband(), curve, workers=4, seed=11)
    b = simulate(hyperband(), curve, workers=4, seed=11)
    assert fingerprint(a) == fingerprint(b)
    c = simulate(hyperband(), curve, workers=4, seed=12)
    assert fingerprint(c)[0] != fingerprint(a)[0]


def test_workers_divide_the_virtual_makespan():
    total = 30 * EPOCHS * 1.0
    for workers in (1, 2, 3, 5):
        result = simulate(spec_of(), flat, workers=workers)
        assert result.makespan == pytest.approx(math.ceil(30 / workers) * EPOCHS)
        assert result.n_reports == 30 * EPOCHS
    # Uneven steps: between the ideal total / N and that plus one trial.
    result = simulate(spec_of(), curve, workers=4)
    work = sum(seconds_of(t.config) * EPOCHS for t in result.trials)
    assert work / 4 <= result.makespan <= work / 4 + 2 * EPOCHS
    assert result.makespan < total  # far from sequential
    assert result.wall_seconds < result.makespan  # accelerated


def test_never_more_trials_at_once_than_workers():
    result = simulate(spec_of(), curve, workers=3)
    spans = [(t.started, t.ended) for t in result.trials]
    for moment in sorted({s for s, _ in spans}):
        assert sum(s <= moment < e for s, e in spans) <= 3


def test_store_times_are_virtual():
    result = simulate(spec_of(num_trials=4), flat, workers=2)
    for t in result.trials:
        reports = result.reports[t.number]
        assert [r.created for r in reports] == [t.started + e for e in range(1, EPOCHS + 1)]
        assert t.ended == reports[-1].created
    assert max(t.ended for t in result.trials) == result.makespan == 2 * EPOCHS


def test_hyperband_stops_trials_and_time_follows():
    result = simulate(hyperband(), curve, workers=4)
    states = {t.state for t in result.trials}
    assert states == {"STOPPED", "COMPLETED"}
    stopped = [t for t in result.trials if t.state == "STOPPED"]
    assert len(stopped) > len(result.trials) / 2
    assert {t.last_seq for t in stopped} <= {1, 3}
    for t in result.trials:
        reports = result.reports[t.number]
        assert [r.seq for r in reports] == list(range(1, t.last_seq + 1))
        assert reports[-1].decision == "stop"
        assert t.ended - t.started == pytest.approx(seconds_of(t.config) * t.last_seq)
    fifo = simulate(spec_of(), curve, workers=4)
    assert result.n_reports < fifo.n_reports / 2
    assert result.makespan < fifo.makespan / 2


def test_time_out_counts_virtual_seconds():
    result = simulate(spec_of(num_trials=None, time_out=50.0), flat, workers=2)
    started = [t.started for t in result.trials]
    assert max(started) < 50.0
    assert len(result.trials) == 2 * math.ceil(50 / EPOCHS)
    assert result.wall_seconds < 5.0


def test_max_reports_stops_new_trials_and_lets_running_ones_end():
    result = simulate(spec_of(num_trials=100), flat, workers=4, max_reports=40)
    assert 40 <= result.n_reports < 40 + 4 * EPOCHS
    assert {t.state for t in result.trials} == {"COMPLETED"}


def test_thousands_of_reports_per_second():
    cpu = time.process_time()  # CPU time: the machine's other work does not count
    result = simulate(spec_of(num_trials=300), flat, workers=8)
    cpu = time.process_time() - cpu
    assert result.n_reports == 300 * EPOCHS
    assert result.n_reports / cpu > 1000


# -- failures ----------------------------------------------------------------------------


def failing(config, seed, start):
    for e in range(start + 1, EPOCHS + 1):
        if config["x"] > 0.5 and e == 3:
            raise ValueError(f"diverged at epoch {e}")
        yield 1.0, {"epoch": e, "accuracy": config["x"]}


def test_failing_step_functions_end_failed_with_their_reason():
    result = simulate(spec_of(), failing, workers=4)
    failed = [t for t in result.trials if t.state == "FAILED"]
    assert failed and all(t.config["x"] > 0.5 for t in failed)
    assert {t.error for t in failed} == {"ValueError: diverged at epoch 3"}
    assert {t.last_seq for t in failed} == {2}
    assert {t.state for t in result.trials if t.config["x"] <= 0.5} == {"COMPLETED"}
    assert all(t.ended - t.started == 2.0 for t in failed)


@pytest.mark.parametrize("steps, error", [
    (lambda c, s, st: iter([(1.0, {"epoch": 1})]), "has no reward metric 'accuracy'"),
    (lambda c, s, st: iter([(1.0, {"epoch": 1, "accuracy": float("nan")})]),
     "reward 'accuracy' is nan"),
    (lambda c, s, st: iter([(-1.0, {"accuracy": 1.0})]), "ValueError: a step's seconds"),
    (lambda c, s, st: iter([{"accuracy": 1.0}]), "TypeError: a step function must yield"),
    (lambda c, s, st: iter([(1.0, {"accuracy": 1.0, "model": object()})]),
     "ReportRejected: metric 'model'"),
    (lambda c, s, st: iter([]), "ended without a single report"),
])
def test_bad_steps_fail_the_trial(steps, error):
    result = simulate(spec_of(num_trials=2), steps, workers=2)
    assert {t.state for t in result.trials} == {"FAILED"}
    assert all(error in t.error for t in result.trials), [t.error for t in result.trials]


def test_retries_run_the_trial_again():
    attempts = []

    def flaky(config, seed, start):
        attempts.append(start)
        for e in range(start + 1, 3):
            yield 1.0, {"epoch": e, "accuracy": 0.5}
            if len(attempts) == 1:
                raise RuntimeError("flaky")

    result = simulate(spec_of(num_trials=1, max_retries=1), flaky, workers=1)
    trial = result.trials[0]
    assert (trial.state, trial.attempt, trial.last_seq) == ("COMPLETED", 2, 2)
    # The first attempt's report was answered "continue", so it was checkpointed.
    assert attempts == [0, 1]


# -- no real processes -------------------------------------------------------------------


def test_nothing_touches_real_processes(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a simulation touched a real process")

    for name in ("fork", "kill", "killpg", "waitpid", "pidfd_open", "posix_spawn"):
        if hasattr(os, name):
            monkeypatch.setattr(os, name, forbidden)
    monkeypatch.setattr(subprocess, "Popen", forbidden)
    pids = []
    result = simulate(hyperband(), failing, workers=4,
                      on_event=lambda e: pids.append(e["pid"]) if e["event"] == "start"
                      else None)
    assert len(pids) == len(result.trials)
    assert all(pid >= FAKE_PID_BASE for pid in pids)


def test_fake_pids_name_no_process():
    assert process_start_time(FAKE_PID_BASE) is None
    executor = SimulatedExecutor(flat)
    pid = executor.launch(TrialOrder(1, 1, 1, {"x": 0.1}, 0, log_path="/nonexistent/log")).pid
    assert pid >= FAKE_PID_BASE and executor.pids() == [pid] and executor.pid_of(1) == pid
    assert not executor.adopt(1, RunRef(pid, 123)) and not executor.alive(RunRef(pid, 123))
    with pytest.raises(KeyError):
        executor.attach(1, None)


# -- the executor on its own -------------------------------------------------------------


def order(trial_id, x=0.2, resume_seq=None):
    return TrialOrder(trial_id, trial_id, 1, {"x": x}, 0, resume_seq=resume_seq)


def test_poll_moves_the_clock_to_the_next_event_and_honours_timeouts():
    executor = SimulatedExecutor(flat, launch_seconds=0.5)
    executor.launch(order(1))
    assert executor.next_deadline() == 1.5
    assert executor.poll(1.0) == [] and executor.clock() == 1.0
    events = executor.poll(None)
    assert executor.clock() == 1.5
    assert events == [Message(1, {"seq": 1, "metrics": {"epoch": 1, "accuracy": 0.2}})]
    # Waiting for its answer: nothing will ever come without one.
    with pytest.raises(SimulationStalled):
        executor.poll(None)
    assert executor.poll(2.0) == [] and executor.clock() == 3.5
    executor.send(1, {"seq": 1, "decision": "continue"})
    assert executor.poll(None)[0].body["seq"] == 2 and executor.clock() == 4.5


def test_ties_come_in_one_batch_in_launch_order():
    executor = SimulatedExecutor(flat)
    for trial_id in (5, 2, 9):
        executor.launch(order(trial_id))
    assert [e.trial_id for e in executor.poll(None)] == [5, 2, 9]


def test_answers_end_trials():
    executor = SimulatedExecutor(flat)
    for trial_id in (1, 2, 3):
        executor.launch(order(trial_id))
    executor.poll(None)
    executor.send(1, {"seq": 1, "decision": "stop"})
    executor.send(2, {"seq": 1, "decision": "pause"})
    executor.send(3, {"seq": 1, "error": "bad metric"})
    assert executor.poll(None) == [
        Exited(1, 0), Exited(2, 0),
        Message(3, {"op": "error", "message": "ReportRejected: bad metric"}), Exited(3, 1)]
    assert executor.running == 0 and executor.clock() == 1.0


def test_a_finished_iterator_says_done():
    executor = SimulatedExecutor(lambda c, s, st: iter([(2.0, {"accuracy": 1.0})]))
    executor.launch(order(1))
    executor.poll(None)
    executor.send(1, {"seq": 1, "decision": "continue"})
    assert executor.poll(None) == [Message(1, {"op": "done"}), Exited(1, 0)]


def test_stop_and_kill_end_at_the_current_virtual_time():
    executor = SimulatedExecutor(flat)
    executor.launch(order(1))
    executor.launch(order(2))
    executor.poll(0.4)
    executor.stop(1, grace=30.0)
    executor.kill(2)
    executor.kill(2)
    assert executor.poll(None) == [Exited(1, -15), Exited(2, -9)]
    assert executor.clock() == 0.4
    assert executor.poll(None) == []


def test_shutdown_returns_the_exits():
    executor = SimulatedExecutor(flat)
    executor.launch(order(1))
    executor.launch(order(2))
    assert executor.shutdown() == [Exited(1, -15), Exited(2, -15)]
    assert executor.poll(None) == [] and executor.running == 0


def test_resume_from_the_payload_or_the_virtual_checkpoint():
    executor = SimulatedExecutor(flat, checkpoint_every=2)
    executor.launch(order(1, resume_seq=4))
    assert executor.poll(None)[0].body["seq"] == 5
    executor.kill(1)
    executor.poll(None)
    executor.launch(order(7))
    for seq in (1, 2, 3):
        assert executor.poll(None)[0].body["seq"] == seq
        executor.send(7, {"seq": seq, "decision": "continue" if seq < 3 else "pause"})
    # It keeps checkpoints (one after report 2) but none is due after report 3: it computes
    # its next step, then ends without reporting it.
    now = executor.clock()
    assert executor.poll(None) == [Exited(7, 0)]
    assert executor.clock() == now + 1.0
    executor.launch(order(7))
    assert executor.poll(None)[0].body == {"seq": 3, "metrics": {"epoch": 3, "accuracy": 0.2}}
    with pytest.raises(ValueError, match="resume_seq"):
        executor.launch(order(8, resume_seq=-1))


def test_a_trial_without_checkpoints_ends_at_once_and_starts_over():
    for every in (5, None):
        executor = SimulatedExecutor(flat, checkpoint_every=every)
        executor.launch(order(1))
        executor.poll(None)
        executor.send(1, {"seq": 1, "decision": "pause"})
        assert executor.poll(None) == [Exited(1, 0)] and executor.clock() == 1.0
        executor.launch(order(1))
        assert executor.poll(None)[0].body["seq"] == 1


@pytest.mark.parametrize("every", [1, None])
def test_pause_and_resume_through_the_engine(tmp_path, every):
    executor = SimulatedExecutor(curve, checkpoint_every=every)
    store = Store(tmp_path / "s.db", clock=executor.clock, preallocate=False, durable=False)
    spec = spec_of(num_trials=6)
    experiment = store.create_experiment("p", spec.to_dict())
    engine = Engine(store, experiment, spec, executor, ResourcePool(3), str(tmp_path / "logs"),
                    3, clock=executor.clock)
    engine.start()
    engine.step([])
    while executor.clock() < 5.0:
        engine.step(executor.poll(None))
    engine.pause()
    while engine.live:
        engine.step(executor.poll(None))
    paused = store.trials(experiment.id, ("PAUSED",))
    assert len(paused) == 3 and all(0 < t.last_seq < EPOCHS for t in paused)
    redone = sum(t.last_seq for t in paused)
    engine.resume()
    engine.step([])
    while engine.live:
        engine.step(executor.poll(None))
    engine.close()
    trials = store.trials(experiment.id)
    assert {t.state for t in trials} == {"COMPLETED"}
    for t in trials:
        reports = store.reports(t.id)
        assert [r.time_value for r in reports] == list(range(1, EPOCHS + 1))
    # With checkpoints, each paused trial saved the one of its paused report and resumed
    # after it; without, it started over and resent its stored reports.
    assert executor.reports == 6 * EPOCHS + (0 if every else redone)
    assert executor.launches == 6 + 3
    store.close()


def test_a_non_durable_store_runs_with_synchronous_off(tmp_path):
    fast = Store(tmp_path / "a.db", durable=False, preallocate=False)
    with fast.transaction(durable=True):
        pass
    assert fast.conn.execute("PRAGMA synchronous").fetchone()[0] == 0
    safe = Store(tmp_path / "b.db", preallocate=False)
    assert safe.conn.execute("PRAGMA synchronous").fetchone()[0] == 2
    fast.close()
    safe.close()


# -- ordinary training functions ---------------------------------------------------------


def train_fn(args, reporter):
    rng = np.random.default_rng(args.seed)
    for e in range(1, args.epochs + 1):
        reporter(epoch=e, accuracy=args.x * (1 - math.exp(-e / 3)) + rng.normal(0, 0.01))


def test_function_steps_run_ordinary_training_functions():
    threads = threading.active_count()
    steps = function_steps(train_fn, seconds=lambda m: 2.0, constants={"epochs": EPOCHS})
    a = simulate(hyperband(), steps, workers=4)
    b = simulate(hyperband(), steps, workers=4)
    assert fingerprint(a) == fingerprint(b)
    assert {t.state for t in a.trials} == {"STOPPED", "COMPLETED"}
    assert all(t.ended - t.started == 2.0 * t.last_seq for t in a.trials)
    deadline = time.monotonic() + 5
    while threading.active_count() > threads and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() == threads


def test_function_steps_report_errors_and_resume_silently():
    def broken(args, reporter):
        reporter(accuracy=1.0)
        raise KeyError("lr")

    result = simulate(spec_of(num_trials=1), function_steps(broken), workers=1)
    assert result.trials[0].error == "KeyError: 'lr'"
    steps = function_steps(train_fn, constants={"epochs": 4})
    resumed = list(steps({"x": 0.5}, 1, 2))
    assert [m["epoch"] for _, m in resumed] == [3, 4]


def test_engine_run_drives_the_simulated_executor(tmp_path):
    executor = SimulatedExecutor(curve)
    store = Store(tmp_path / "r.db", clock=executor.clock, preallocate=False, durable=False)
    spec = hyperband(num_trials=12)
    experiment = store.create_experiment("r", spec.to_dict())
    Engine(store, experiment, spec, executor, ResourcePool(4), str(tmp_path / "logs"), 4,
           clock=executor.clock).run()
    assert store.experiment(experiment.id).state == "COMPLETED"
    assert store.count_trials(experiment.id).keys() <= {"STOPPED", "COMPLETED"}
    assert executor.running == 0 and executor.clock() > 0
    store.close()


def test_a_reserved_trial_killed_before_its_start_never_runs():
    executor = SimulatedExecutor(flat)
    pid = executor.reserve(1).pid
    assert executor.pid_of(1) == pid and executor.next_deadline() is None
    executor.kill(1)
    executor.start(order(1))
    assert executor.poll(None) == [Exited(1, -9)]
    assert executor.launches == 0 and executor.reports == 0


def test_clone_checkpoint_copies_the_virtual_checkpoint():
    executor = SimulatedExecutor(flat)
    assert executor.clone_checkpoint(1, "/a", 2, "/b") is None
    executor.launch(order(1))
    for seq in (1, 2):
        executor.poll(None)
        executor.send(1, {"seq": seq, "decision": "continue" if seq < 2 else "stop"})
    assert executor.clone_checkpoint(1, "/a", 2, "/b") == 2
    executor.poll(None)
    executor.launch(order(2, x=0.7))
    assert executor.poll(None)[0].body == {"seq": 3, "metrics": {"epoch": 3, "accuracy": 0.7}}


def test_pbt_clones_continue_from_their_parents_checkpoints():
    spec = spec_of(num_trials=16, scheduler="pbt",
                   scheduler_options={"max_t": EPOCHS, "perturbation_interval": 3})
    result = simulate(spec, curve, workers=4)
    clones = [t for t in result.trials if t.parent is not None]
    assert clones
    for t in clones:
        reports = result.reports[t.number]
        assert reports and reports[0].seq > 1
        assert [r.time_value for r in reports] == list(range(reports[0].seq, t.last_seq + 1))
    assert fingerprint(result) == fingerprint(simulate(spec, curve, workers=4))


@pytest.mark.parametrize("scheduler", ["hyperband_stopping", "hyperband_promotion"])
def test_bayesopt_under_hyperband_learns_from_every_report(tmp_path, scheduler):
    """The engine hands the scheduler's max_t to a multi-fidelity searcher: its stored log
    holds the intermediate reports ("r"), not only the final results."""
    path = tmp_path / "bo.db"
    spec = hyperband(searcher="bayesopt", num_trials=14,
                     searcher_options={"num_init": 4, "candidates": 50})
    spec = spec_of(**{**spec.to_dict(), "scheduler": scheduler})
    result = simulate(spec, curve, workers=2, store_path=path)
    assert len(result.trials) == 14
    store = Store(str(path))
    try:
        state = store.searcher_state(result.experiment_id)
    finally:
        store.close()
    log = [entry for key in sorted(state) if key.startswith("log.") for entry in state[key]]
    reports = [e for e in log if e[0] == "r"]
    assert len(reports) >= result.n_reports - len(result.trials)
    assert {e[2] for e in reports} > {1.0}  # times beyond the first rung were heard


def test_a_searcher_option_max_t_wins_over_the_schedulers(tmp_path):
    from tuned.core.searchers import make_searcher

    searcher = make_searcher("bayesopt", Space({"x": Real(0.0, 1.0)}), seed=0,
                             resource_max=9, max_t=27)
    assert searcher.max_t == 27 and searcher.multi
    assert make_searcher("bayesopt", Space({"x": Real(0.0, 1.0)}), seed=0).multi is False
    assert make_searcher("random", Space({"x": Real(0.0, 1.0)}), seed=0, resource_max=9)
