"""Reports under a report lag: a trial with short steps goes on before each answer, and no
report is lost, doubled, stored past a stop, or acknowledged before it is stored."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import tempfile
import textwrap
import threading
import time

import pytest
from helpers import Daemon, write_spec

import tuned as ag
from tuned.trial.reporter import WINDOW, Reconnect, Reporter, TrialStopped


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _lines(sock: socket.socket, n: int) -> list[dict]:
    """The next `n` report lines the engine's end of the channel receives."""
    f = sock.makefile("rb")
    return [json.loads(f.readline()) for _ in range(n)]


def _answer(sock: socket.socket, seq: int, decision: str = "continue") -> None:
    sock.sendall(json.dumps({"seq": seq, "decision": decision}).encode() + b"\n")


def _returns(fn, timeout: float = 0.3) -> bool:
    """Whether `fn()` (run in a thread) returns within `timeout` s; the thread goes on."""
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    thread.join(timeout)
    return not thread.is_alive()


def test_without_a_lag_a_call_returns_only_once_its_report_is_answered():
    ours, engine = socket.socketpair()
    reporter = Reporter(ours, lag=0.0)
    assert not _returns(lambda: reporter(accuracy=0.5))
    assert _lines(engine, 1) == [{"seq": 1, "metrics": {"accuracy": 0.5}}]
    _answer(engine, 1)
    time.sleep(0.3)
    assert reporter.acknowledged == 1


def test_under_a_lag_calls_return_at_once_and_flush_waits_for_every_answer():
    clock = FakeClock()
    ours, engine = socket.socketpair()
    reporter = Reporter(ours, lag=0.01, clock=clock)
    for e in (1, 2, 3):
        reporter(epoch=e, accuracy=0.5)  # nobody answers, and none of them waits
    assert [line["seq"] for line in _lines(engine, 3)] == [1, 2, 3]
    assert reporter.seq == 3 and reporter.acknowledged == 0
    flushed = threading.Event()
    thread = threading.Thread(target=lambda: (reporter.flush(), flushed.set()), daemon=True)
    thread.start()
    _answer(engine, 1)
    _answer(engine, 2)
    assert not flushed.wait(0.3)
    _answer(engine, 3)
    assert flushed.wait(5)
    assert reporter.acknowledged == 3


def test_a_stop_takes_effect_at_the_first_call_after_its_answer_and_sends_nothing_more():
    clock = FakeClock()
    ours, engine = socket.socketpair()
    reporter = Reporter(ours, lag=0.01, clock=clock)
    reporter(epoch=1, accuracy=0.5)
    reporter(epoch=2, accuracy=0.5)
    _answer(engine, 1, "stop")
    time.sleep(0.1)
    with pytest.raises(TrialStopped):
        reporter(epoch=3, accuracy=0.5)
    engine.settimeout(0.3)
    assert [line["seq"] for line in _lines(engine, 2)] == [1, 2]
    with pytest.raises(TimeoutError):
        engine.recv(1)  # report 3 was never sent


def test_a_call_waits_when_the_window_is_full():
    clock = FakeClock()
    ours, engine = socket.socketpair()
    reporter = Reporter(ours, lag=0.01, clock=clock)
    for e in range(1, WINDOW):
        reporter(epoch=e, accuracy=0.5)
    assert not _returns(lambda: reporter(epoch=WINDOW, accuracy=0.5))
    _answer(engine, 1)
    time.sleep(0.3)
    assert reporter.seq == WINDOW and reporter.acknowledged == 1


def test_a_call_waits_while_the_oldest_unanswered_report_is_a_lag_old():
    clock = FakeClock()
    ours, engine = socket.socketpair()
    reporter = Reporter(ours, lag=0.01, clock=clock)
    reporter(epoch=1, accuracy=0.5)
    clock.now += 0.006  # a short step: report 1 is 6 ms old
    reporter(epoch=2, accuracy=0.5)
    clock.now += 0.006  # and now 12 ms old
    assert not _returns(lambda: reporter(epoch=3, accuracy=0.5))
    _answer(engine, 1)
    time.sleep(0.3)
    assert reporter.seq == 3 and reporter.acknowledged == 1


def test_a_call_after_a_step_as_long_as_the_lag_waits_for_its_answer():
    clock = FakeClock()
    ours, engine = socket.socketpair()
    reporter = Reporter(ours, lag=0.01, clock=clock)
    clock.now += 0.01
    assert not _returns(lambda: reporter(epoch=1, accuracy=0.5))
    _answer(engine, 1)
    time.sleep(0.3)
    assert reporter.acknowledged == 1


def test_a_checkpoint_waits_for_the_answers_and_is_not_saved_past_a_stop(tmp_path):
    clock = FakeClock()
    ours, engine = socket.socketpair()
    reporter = Reporter(ours, lag=0.01, clock=clock, checkpoint_dir=str(tmp_path))
    reporter(epoch=1, accuracy=0.5)
    reporter(epoch=2, accuracy=0.5)
    _answer(engine, 1)
    _answer(engine, 2, "pause")
    with pytest.raises(TrialStopped):
        reporter.save_checkpoint({"epoch": 2})
    assert Reporter(socket.socketpair()[0], checkpoint_dir=str(tmp_path)).resume_from is None

    ours, engine = socket.socketpair()
    reporter = Reporter(ours, lag=0.01, clock=clock, checkpoint_dir=str(tmp_path))
    reporter(epoch=1, accuracy=0.5)
    _answer(engine, 1)
    reporter.save_checkpoint({"epoch": 1})
    assert reporter.acknowledged == 1
    # A trial that keeps checkpoints waits for each answer from now on.
    assert not _returns(lambda: reporter(epoch=2, accuracy=0.5))
    _answer(engine, 2)


def test_a_restarted_daemon_gets_every_unanswered_report_again_in_order(tmp_path):
    path = os.path.join(tempfile.mkdtemp(prefix="lag", dir="/tmp"), "c.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    seen: list[dict] = []

    def serve() -> None:
        listener.settimeout(5)
        conn, _ = listener.accept()
        conn.settimeout(5)
        f = conn.makefile("rb")
        try:
            seen.append(json.loads(f.readline()))
            conn.sendall(b'{"v":1,"ok":true,"trial":0}\n')
            seen.extend(json.loads(f.readline()) for _ in range(2))
            _answer(conn, 2)
            _answer(conn, 3, "stop")
            time.sleep(0.5)
        finally:
            f.close()
            conn.close()
            listener.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    ours, engine = socket.socketpair()
    reporter = Reporter(ours, lag=0.01, clock=FakeClock(), reconnect=Reconnect(path, timeout=5))
    reporter(epoch=1, accuracy=0.5)
    _answer(engine, 1)
    reporter(epoch=2, accuracy=0.5)
    reporter(epoch=3, accuracy=0.5)
    engine.close()
    with pytest.raises(TrialStopped):
        reporter.flush()
    thread.join(5)
    assert seen[0] == {"v": 1, "op": "adopt"}
    assert [line["seq"] for line in seen[1:]] == [2, 3]


# -- the engine ------------------------------------------------------------------------------


def _fast(args, reporter):
    for e in range(1, 11):
        reporter(epoch=e, accuracy=args.x * e)


def _stored(checkpoint: str) -> list[tuple]:
    with sqlite3.connect(checkpoint) as c:
        return c.execute(
            "SELECT t.number, t.state, t.config, r.seq, r.reward, r.decision FROM trials t "
            "LEFT JOIN reports r ON r.trial_id = t.id ORDER BY t.number, r.seq").fetchall()


def _hyperband(checkpoint: str, slots: int, lag: float) -> list[tuple]:
    fn = ag.args(x=ag.space.Real(0, 1), epochs=10)(_fast)
    ag.scheduler.HyperbandScheduler(
        fn, num_trials=12, grace_period=1, reduction_factor=3, seed=3,
        resource={"num_cpus": 1}, max_concurrent=slots, checkpoint=checkpoint,
        report_lag=lag).run()
    return _stored(checkpoint)


def _nothing_stored_past_a_stop(rows: list[tuple]) -> None:
    for number in {row[0] for row in rows}:
        decisions = [row[5] for row in rows if row[0] == number]
        assert set(decisions[:-1]) <= {"continue"}, f"trial {number}: {decisions}"


def test_hyperband_under_a_lag_stores_what_it_stores_without_one(tmp_path):
    """One trial at a time, decisions do not depend on timing: the same trials, reports
    and decisions are stored with a lag as without, though the trials ran on past stops."""
    lagged = _hyperband(str(tmp_path / "lag.db"), 1, 0.5)
    _nothing_stored_past_a_stop(lagged)
    assert "stop" in {row[5] for row in lagged}
    assert lagged == _hyperband(str(tmp_path / "nolag.db"), 1, 0.0)


def test_parallel_hyperband_under_a_lag_stores_nothing_past_a_stop(tmp_path):
    lagged = _hyperband(str(tmp_path / "lag.db"), 2, 0.5)
    _nothing_stored_past_a_stop(lagged)
    assert len({row[0] for row in lagged}) == 12
    assert {row[1] for row in lagged} <= {"COMPLETED", "STOPPED"}


def test_a_lagged_trial_that_returns_right_after_its_reports_has_them_all_stored(tmp_path):
    fn = ag.args(x=ag.space.Real(0, 1), epochs=10)(_fast)
    checkpoint = str(tmp_path / "t.db")
    ag.scheduler.FIFOScheduler(fn, num_trials=3, seed=1, max_concurrent=2,
                               checkpoint=checkpoint, report_lag=0.5).run()
    rows = _stored(checkpoint)
    assert [(r[0], r[3]) for r in rows] == [(n, s) for n in range(3) for s in range(1, 11)]
    assert {r[1] for r in rows} == {"COMPLETED"} and {r[5] for r in rows} == {"continue"}


# -- the daemon killed while reports are in flight -------------------------------------------


@pytest.mark.slow
def test_daemon_killed_while_lagged_reports_fly_loses_and_doubles_nothing(tmp_path):
    acks = tmp_path / "acks"
    acks.mkdir()
    module = tmp_path / "fast.py"
    module.write_text(textwrap.dedent(f"""
        import os, time
        def train(args, reporter):
            path = os.path.join({str(acks)!r}, str(reporter.trial_number))
            for e in range(1, 2001):
                reporter(epoch=e, accuracy=args.x)
                with open(path, "a") as f:
                    f.write(f"{{reporter.acknowledged}}\\n")
                time.sleep(0.0005)
    """))
    d = Daemon(tmp_path)
    d.start()
    assert d.ctl("submit", write_spec(tmp_path, "lag", f"""
        name = "lag"
        entry = "{module}:train"
        num_trials = 4
        max_concurrent = 2
        seed = 2
        report_lag = 0.05
        [resources]
        num_cpus = 0.5
        [space]
        x = {{ type = "real", lower = 0, upper = 1 }}
    """)).returncode == 0
    for kill_after in (0.4, 0.7, 0.3, 0.9):
        time.sleep(kill_after)
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait()
        time.sleep(0.2)  # the trials' calls in flight return, or wait for a daemon
        with sqlite3.connect(d.state / "tuned.db") as c:
            stored = dict(c.execute("SELECT t.number, max(r.seq) FROM reports r "
                                    "JOIN trials t ON t.id = r.trial_id GROUP BY t.number"))
        for p in acks.iterdir():
            acked = max(int(s) for s in p.read_text().split())
            assert acked <= stored.get(int(p.name), 0), (p.name, acked, stored)
        d.start()
    try:
        done = d.wait_state("lag", ("COMPLETED",), timeout=180)
        assert done["trials"] == {"COMPLETED": 4}, done
        with sqlite3.connect(d.state / "tuned.db") as c:
            rows = c.execute("SELECT t.number, r.seq FROM reports r JOIN trials t "
                             "ON t.id = r.trial_id ORDER BY t.number, r.seq").fetchall()
        for number in range(4):
            seqs = [s for n, s in rows if n == number]
            assert seqs == list(range(1, 2001)), f"trial {number}: {seqs[:3]}..{seqs[-3:]}"
        for p in acks.iterdir():
            acked = [int(s) for s in p.read_text().split()]
            assert acked == sorted(acked) and acked[-1] <= 2000
    finally:
        d.close()
