"""One conformance suite for the engine's `Executor` protocol (`tuned.engine.executor`), run
against every executor: a local one forking from this process, the daemon's template
executor (a template process that imported the entry), the in-process API's fork server,
and the simulated one. Each runs the same training function (`TRAIN`: `epochs` reports of
``x * epoch``, each waiting for its answer) and must give the same events for the same
answers: the contract as the engine relies on it.

What differs by nature is said by the fixture's `real` flag: a simulated trial is no
process, so nothing of it is ever alive after the fact, and it cannot be adopted.
"""

from __future__ import annotations

import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tuned.engine.executor import Executor, RunRef, TrialOrder
from tuned.executors.local import LocalExecutor
from tuned.executors.simulated import SimulatedExecutor
from tuned.executors.template import ForkServerExecutor, TemplateExecutor
from tuned.protocol.channel import Exited, Message
from tuned.trial.worker import make_runner

TRAIN = textwrap.dedent("""
    import tuned

    @tuned.args(x=tuned.space.Real(0, 1), epochs=3)
    def train(args, reporter):
        for epoch in range(1, args.epochs + 1):
            reporter(epoch=epoch, accuracy=args.x * epoch)
""")


def _train(args: Any, reporter: Any) -> None:
    for epoch in range(1, args.epochs + 1):
        reporter(epoch=epoch, accuracy=args.x * epoch)


def _steps(config: dict[str, Any], seed: int, start: int) -> Iterator[tuple[float, dict]]:
    for epoch in range(start + 1, config.get("epochs", 3) + 1):
        yield 0.01, {"epoch": epoch, "accuracy": config["x"] * epoch}


@dataclass
class Subject:
    """An executor under test, and what it is: `real` processes or a simulation."""

    executor: Any
    real: bool
    logs: Path


def _local(tmp_path: Path) -> Subject:
    return Subject(LocalExecutor(make_runner(_train, {"epochs": 3})), True, tmp_path)


def _fork_server(tmp_path: Path) -> Subject:
    return Subject(ForkServerExecutor(make_runner(_train, {"epochs": 3})), True, tmp_path)


def _template(tmp_path: Path) -> Subject:
    (tmp_path / "train_mod.py").write_text(TRAIN)
    executor = TemplateExecutor("train_mod.py:train", str(tmp_path), {},
                                str(tmp_path / "template.log"), spares=1)
    return Subject(executor, True, tmp_path)


def _simulated(tmp_path: Path) -> Subject:
    return Subject(SimulatedExecutor(_steps, checkpoint_every=None), False, tmp_path)


MAKERS: dict[str, Callable[[Path], Subject]] = {
    "local": _local, "template": _template, "fork_server": _fork_server,
    "simulated": _simulated}


@pytest.fixture(params=list(MAKERS))
def subject(request, tmp_path) -> Iterator[Subject]:
    made = MAKERS[request.param](tmp_path)
    try:
        yield made
    finally:
        made.executor.shutdown(grace=0.5)
        made.executor.close()


def _order(subject: Subject, trial_id: int, x: float = 0.5) -> TrialOrder:
    return TrialOrder(trial_id, trial_id, 1, {"x": x}, seed=trial_id,
                      log_path=str(subject.logs / f"trial-{trial_id}.log"),
                      checkpoint_dir=str(subject.logs / f"ckpt-{trial_id}"))


def _drive(executor: Any, decide: Callable[[int, int], str | None],
           until: set[int], timeout: float = 30.0) -> tuple[dict[int, list], dict[int, Any]]:
    """Poll until every trial of `until` has exited, answering each report with `decide(trial,
    seq)` (None: no answer). The bodies each trial sent, and each one's exit code."""
    sent: dict[int, list] = {t: [] for t in until}
    exits: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    while set(exits) != until:
        assert time.monotonic() < deadline, f"no exit for {until - set(exits)}; sent {sent}"
        for event in executor.poll(0.05):
            assert event.trial_id not in exits, f"an event after the exit: {event}"
            if isinstance(event, Exited):
                exits[event.trial_id] = event.code
                continue
            assert isinstance(event, Message) and event.body is not None, event
            sent.setdefault(event.trial_id, []).append(event.body)
            seq = event.body.get("seq")
            if seq is not None and (decision := decide(event.trial_id, seq)) is not None:
                assert executor.send(event.trial_id, {"seq": seq, "decision": decision})
    return sent, exits


def _reports(bodies: list[dict]) -> list[tuple[int, float]]:
    return [(b["seq"], b["metrics"]["accuracy"]) for b in bodies if "seq" in b]


def test_every_executor_is_an_executor(subject):
    assert isinstance(subject.executor, Executor)


def test_a_trial_reports_in_order_and_ends_once_after_its_last_message(subject):
    ex = subject.executor
    ref = ex.reserve(1)
    assert isinstance(ref, RunRef) and ex.pid_of(1) == ref.pid
    ex.start(_order(subject, 1, x=0.25))
    sent, exits = _drive(ex, lambda t, seq: "continue", {1})
    assert _reports(sent[1]) == [(1, 0.25), (2, 0.5), (3, 0.75)]
    assert sent[1][-1] == {"op": "done"} and exits == {1: 0}
    assert ex.pid_of(1) is None


def test_a_stop_decision_ends_the_trial_at_that_report(subject):
    ex = subject.executor
    ex.reserve(2)
    ex.start(_order(subject, 2))
    sent, exits = _drive(ex, lambda t, seq: "stop" if seq == 2 else "continue", {2})
    assert [seq for seq, _ in _reports(sent[2])] == [1, 2] and exits == {2: 0}


def test_trials_run_side_by_side(subject):
    ex = subject.executor
    for trial_id, x in ((3, 0.1), (4, 0.2)):
        ex.reserve(trial_id)
        ex.start(_order(subject, trial_id, x))
    sent, exits = _drive(ex, lambda t, seq: "continue", {3, 4})
    assert _reports(sent[3]) == [(1, 0.1), (2, 0.2), (3, 0.30000000000000004)]
    assert [seq for seq, _ in _reports(sent[4])] == [1, 2, 3] and exits == {3: 0, 4: 0}


@pytest.mark.parametrize("how, code", [("stop", -15), ("kill", -9)])
def test_stop_and_kill_end_a_waiting_trial_with_the_signal(subject, how, code):
    ex = subject.executor
    ex.reserve(5)
    ex.start(_order(subject, 5))
    sent, _ = _drive_until_report(ex, 5)
    getattr(ex, how)(5)
    rest, exits = _drive(ex, lambda t, seq: None, {5})
    assert exits == {5: code} and not _reports(rest[5])  # nothing more after it
    assert ex.send(5, {"seq": 2, "decision": "continue"})  # a trial gone is no error


def test_a_trial_killed_before_its_start_never_runs(subject):
    ex = subject.executor
    ex.reserve(6)
    ex.kill(6)
    ex.start(_order(subject, 6))
    sent, exits = _drive(ex, lambda t, seq: "continue", {6})
    assert exits[6] == -9 and not _reports(sent[6])


def test_a_trial_id_is_reserved_once(subject):
    ex = subject.executor
    ex.reserve(7)
    with pytest.raises(RuntimeError, match="running already"):
        ex.reserve(7)
    ex.kill(7)
    _drive(ex, lambda t, seq: None, {7})


def test_liveness_adoption_and_termination_by_ref(subject):
    ex = subject.executor
    ref = ex.reserve(8)
    ex.start(_order(subject, 8))
    _drive_until_report(ex, 8)
    assert ex.alive(ref) is subject.real
    gone = RunRef(ref.pid, (ref.start or 0) + 1)  # the same pid, another process
    assert not ex.alive(gone)
    ex.terminate(gone)  # names no live process: nothing happens
    assert not ex.adopt(99, gone)
    assert ex.pid_of(8) == ref.pid
    ex.terminate(ref)  # the trial's own process (a simulated one names none)
    if not subject.real:
        assert ex.pid_of(8) == ref.pid
        ex.kill(8)
    _, exits = _drive(ex, lambda t, seq: None, {8})
    assert exits == {8: -9} and not ex.alive(ref)


def test_shutdown_ends_every_trial_and_prepare_release(subject):
    ex = subject.executor
    for trial_id in (9, 10):
        ex.reserve(trial_id)
        ex.start(_order(subject, trial_id))
    _drive_until_report(ex, 9)
    exits = ex.shutdown(grace=0.5)
    assert sorted(e.trial_id for e in exits) == [9, 10]
    assert all(e.code is not None and e.code < 0 for e in exits)
    made = ex.prepare()
    assert made is subject.real and ex.prepared == (1 if made else 0)
    ex.release()
    assert ex.prepared == 0


def test_no_checkpoint_to_clone_and_discarding_none_is_fine(subject, tmp_path):
    ex = subject.executor
    assert ex.clone_checkpoint(1, str(tmp_path / "a"), 2, str(tmp_path / "b")) is None
    ex.discard_checkpoints(str(tmp_path / "nothing-here"))


def _drive_until_report(executor: Any, trial_id: int,
                        timeout: float = 30.0) -> tuple[list[dict], None]:
    """Poll until the trial's first report came (left unanswered: the trial waits)."""
    deadline = time.monotonic() + timeout
    while True:
        assert time.monotonic() < deadline, "no report came"
        for event in executor.poll(0.05):
            assert not isinstance(event, Exited), f"it ended first: {event}"
            if event.trial_id == trial_id and event.body and "seq" in event.body:
                return [event.body], None
