"""The in-process API's executor: trials forked by a fork server, a fork of this process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

from test_faulty_trials import _alive

from tuned.engine.executor import TrialOrder
from tuned.executors.template import ForkServerExecutor
from tuned.protocol.channel import Exited


def _runner_writing_to(folder: str):
    token = object()  # a closure over a live object: only a fork can run it

    def runner(payload, channel) -> int:
        assert token is not None
        with open(os.path.join(folder, str(payload["number"])), "w") as f:
            f.write(str(os.getpid()))
        return payload["config"].get("code", 0)

    return runner


def _order(n: int, tmp_path, **config) -> TrialOrder:
    return TrialOrder(n, n, 1, config, 0, log_path=str(tmp_path / f"{n}.log"))


def _exits(executor: ForkServerExecutor, count: int, timeout: float = 20.0) -> dict[int, int]:
    found: dict[int, int] = {}
    deadline = time.monotonic() + timeout
    while len(found) < count:
        assert time.monotonic() < deadline, f"exits seen: {found}"
        for event in executor.poll(0.1):
            if isinstance(event, Exited):
                found[event.trial_id] = event.code
    return found


def test_trials_run_the_inherited_function_and_their_exits_come_back(tmp_path):
    executor = ForkServerExecutor(_runner_writing_to(str(tmp_path)), spares=1)
    try:
        pids = {n: executor.launch(_order(n, tmp_path, code=n)).pid for n in (1, 2, 3)}
        assert _exits(executor, 3) == {1: 1, 2: 2, 3: 3}
        assert {n: int((tmp_path / str(n)).read_text()) for n in pids} == pids
        assert len(set(pids.values()) | {os.getpid(), executor.process.pid}) == 5
    finally:
        executor.close()


def test_spares_given_up_before_they_were_forked_are_never_handed_out(tmp_path):
    executor = ForkServerExecutor(_runner_writing_to(str(tmp_path)), spares=3)
    try:
        assert executor.prepare() and executor.prepare() and executor.prepare()
        assert not executor.prepare()  # three asked for: enough
        executor.release()  # before the server answered for them
        pid = executor.launch(_order(7, tmp_path)).pid
        assert _exits(executor, 1) == {7: 0}
        assert int((tmp_path / "7").read_text()) == pid
    finally:
        executor.close()
    assert executor.process is None


def test_the_server_and_its_trials_die_with_the_engine(tmp_path):
    engine = tmp_path / "engine.py"
    engine.write_text(textwrap.dedent(f"""
        import os, sys, time
        from tuned.engine.executor import TrialOrder
        from tuned.executors.template import ForkServerExecutor

        def runner(payload, channel):
            time.sleep(600)
            return 0

        ex = ForkServerExecutor(runner, spares=0)
        pid = ex.launch(TrialOrder(1, 1, 1, {{}}, 0, log_path={str(tmp_path / "t.log")!r})).pid
        print(ex.process.pid, pid, flush=True)
        time.sleep(600)
    """))
    proc = subprocess.Popen([sys.executable, str(engine)], stdout=subprocess.PIPE, text=True)
    server, trial = map(int, proc.stdout.readline().split())
    for pid in (server, trial):
        os.kill(pid, 0)  # alive
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (_alive(trial) or _alive(server)):
            time.sleep(0.05)
        assert not _alive(trial) and not _alive(server)
    finally:
        for pid in (trial, server):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)

