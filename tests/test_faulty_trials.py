"""Faulty trials never hurt the daemon or other trials: each fault ends its trial FAILED with
its reason, the log kept, retried while max_retries allows (real daemon, real processes)."""

from __future__ import annotations

import os
import textwrap
import time
from pathlib import Path

import pytest
from helpers import Daemon, wait_until, write_spec

FAULTS = {
    # kind: (final state, a part of the error)
    "ok": ("COMPLETED", None),
    "noisy": ("COMPLETED", None),
    "raise": ("FAILED", "ValueError: broken on purpose"),
    "segfault": ("FAILED", "killed by signal SIGSEGV"),
    "abort": ("FAILED", "killed by signal SIGABRT"),
    "oom": ("FAILED", "killed by signal SIGKILL"),
    "hang": ("FAILED", "no report for 1.5 s (report_timeout)"),
    "silent_exit": ("FAILED", "ended without a single report"),
    "exit_code": ("FAILED", "exited with code 3"),
    "junk_channel": ("FAILED", "bad message on the report channel"),
    "oversized": ("FAILED", "report line over"),
    "out_of_order": ("FAILED", "report 5 out of order"),
    "forks_and_exits": ("FAILED", "exited before its function returned"),
}

MODULE = textwrap.dedent("""
    import ctypes, os, signal, subprocess, sys, time
    import tuned

    def misbehave(kind, reporter):
        sock = reporter._sock
        if kind == "noisy":
            sys.stdout.write("\\x00\\xff junk " * 1000 + "\\n")
            sys.stderr.buffer.write(os.urandom(4096))
        elif kind == "raise":
            raise ValueError("broken on purpose")
        elif kind == "segfault":
            ctypes.string_at(0)
        elif kind == "abort":
            os.abort()
        elif kind == "oom":
            os.kill(os.getpid(), signal.SIGKILL)
        elif kind == "hang":
            time.sleep(600)
        elif kind == "silent_exit":
            os._exit(0)
        elif kind == "exit_code":
            sys.stdout.flush()
            os._exit(3)
        elif kind == "junk_channel":
            sock.sendall(b"\\x00\\x01 not json at all\\n")
            time.sleep(600)
        elif kind == "oversized":
            sock.sendall(b"{" + b"x" * (2 << 20))
            time.sleep(600)
        elif kind == "out_of_order":
            sock.sendall(b'{"seq": 5, "metrics": {"accuracy": 1}}\\n')
            time.sleep(600)
        elif kind == "forks_and_exits":
            with open(os.environ["FAULT_PIDS"] + f"/{os.getpid()}", "w") as f:
                child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
                f.write(str(child.pid))
            os._exit(0)

    @tuned.args(kind=tuned.space.Categorical(*KINDS), epochs=2, EXTRA)
    def train(args, reporter):
        first = args.kind in ("silent_exit",)
        if not first:
            reporter(epoch=1, accuracy=0.5)
        misbehave(args.kind, reporter)
        reporter(epoch=2, accuracy=0.6)
""")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _module(tmp_path: Path, kinds: list[str], extra: str = "seed=0") -> Path:
    path = tmp_path / "faulty.py"
    path.write_text(MODULE.replace("KINDS", repr(kinds)).replace("EXTRA", extra))
    return path


def _expected(kind: str) -> tuple[str, str | None]:
    return FAULTS.get(kind) or FAULTS["ok"]


@pytest.fixture
def daemon(tmp_path):
    pids = tmp_path / "pids"
    pids.mkdir()
    d = Daemon(tmp_path)
    d.start(env={"FAULT_PIDS": str(pids)})
    yield d
    d.stop()


def test_each_fault_fails_its_trial_with_its_reason_and_is_retried(daemon, tmp_path):
    kinds = list(FAULTS)
    assert daemon.ctl("submit", write_spec(tmp_path, "faults", f"""
        name = "faults"
        entry = "{_module(tmp_path, kinds)}:train"
        searcher = "grid"
        num_trials = {len(kinds)}
        max_concurrent = 4
        max_retries = 1
        report_timeout = 1.5
        [resources]
        num_cpus = 0.25
    """)).returncode == 0
    daemon.wait_state("faults", ("COMPLETED",), timeout=120)
    trials = {t["config"]["kind"]: t for t in daemon.json("trials", "faults", "--all")["trials"]}
    assert set(trials) == set(kinds)
    for kind, (state, error) in FAULTS.items():
        t = trials[kind]
        assert t["state"] == state, (kind, t)
        if error is not None:
            assert error in (t["error"] or ""), (kind, t["error"])
            assert t["attempt"] == 2, (kind, t)  # retried once, failed again
        log = daemon.state / "logs" / "faults" / f"trial-{t['trial']}.log"
        assert log.exists(), kind
    assert "Traceback" in (daemon.state / "logs" / "faults"
                           / f"trial-{trials['raise']['trial']}.log").read_text()
    # The children a trial left behind went with its process group.
    left = [int(p.read_text()) for p in (tmp_path / "pids").iterdir()]
    assert len(left) == 2 and not any(_alive(pid) for pid in left)
    assert daemon.json("status")["experiments"][0]["state"] == "COMPLETED"  # still serving


@pytest.mark.slow
def test_a_soak_of_short_trials_with_faulty_ones_accounts_for_every_trial(daemon, tmp_path):
    count = int(os.environ.get("TUNED_SOAK_TRIALS", "150"))
    kinds = [f"ok{i}" for i in range(7)] + ["raise", "segfault", "silent_exit"]  # 30% faulty
    fds = len(os.listdir(f"/proc/{daemon.proc.pid}/fd"))
    started = time.monotonic()
    assert daemon.ctl("submit", write_spec(tmp_path, "soak", f"""
        name = "soak"
        entry = "{_module(tmp_path, kinds, 'x=tuned.space.Real(0, 1)')}:train"
        num_trials = {count}
        max_concurrent = 2
        seed = 11
        [resources]
        num_cpus = 0.5
    """)).returncode == 0
    done = daemon.wait_state("soak", ("COMPLETED",), timeout=300)
    assert sum(done["trials"].values()) == count
    trials = daemon.json("trials", "soak", "--all")["trials"]
    for t in trials:
        expected = _expected(t["config"]["kind"])
        assert t["state"] == expected[0] and (expected[1] or "") in (t["error"] or "")
    faulty = sum(t["state"] == "FAILED" for t in trials)
    assert 0.15 * count < faulty < 0.45 * count
    # No leaks: the daemon's descriptors are back to where they were, no zombie children.
    assert abs(len(os.listdir(f"/proc/{daemon.proc.pid}/fd")) - fds) <= 5
    assert _zombie_children(daemon.proc.pid) == []
    print(f"soak: {count} trials, {faulty} faulty, all accounted for, "
          f"{time.monotonic() - started:.1f} s")


def _zombie_children(pid: int) -> list[int]:
    zombies = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] == "Z" and int(fields[1]) == pid:
                zombies.append(int(entry))
    return zombies


def test_a_trial_that_ignores_sigterm_goes_with_its_group_after_the_grace(daemon, tmp_path):
    module = tmp_path / "stubborn.py"
    module.write_text(textwrap.dedent(f"""
        import os, signal, subprocess, sys, time
        import tuned

        @tuned.args(x=tuned.space.Real(0, 1))
        def train(args, reporter):
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            child = subprocess.Popen([sys.executable, "-c",
                "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "time.sleep(600)"])
            with open({str(tmp_path / "pids")!r} + f"/{{os.getpid()}}", "w") as f:
                f.write(str(child.pid))
            reporter(accuracy=args.x)
            time.sleep(600)
    """))
    assert daemon.ctl("submit", write_spec(tmp_path, "stubborn", f"""
        name = "stubborn"
        entry = "{module}:train"
        num_trials = 1
    """)).returncode == 0
    wait_until(lambda: list((tmp_path / "pids").iterdir()), 20, "the trial's pid file",
               every=0.05)
    (record,) = (tmp_path / "pids").iterdir()
    pids = [int(record.name), int(record.read_text())]
    time.sleep(0.3)
    stopped = time.monotonic()
    assert daemon.json("stop", "stubborn")["state"] == "STOPPED"
    while any(_alive(p) for p in pids):
        assert time.monotonic() - stopped < 5.0 + 1.0, "still alive after the grace + 1 s"
        time.sleep(0.05)
    assert time.monotonic() - stopped > 4.5  # it had its grace period
