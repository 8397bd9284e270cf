"""The daemon end to end: a real `tuned serve` process, real sockets, real trials."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import Daemon, toy_spec, wait_until, write_spec


def test_submit_status_best_trials_curves(daemon, tmp_path):
    out = daemon.ctl("submit", toy_spec(tmp_path, "hb", extra='scheduler = "hyperband"'))
    assert out.returncode == 0, out.stderr
    daemon.wait_state("hb", ("COMPLETED",))
    status = daemon.json("status")
    (hb,) = status["experiments"]
    assert sum(hb["trials"].values()) == 12
    best = daemon.json("best", "hb")
    assert set(best) == {"experiment", "trial", "config", "reward", "metric", "mode"}
    assert (best["metric"], best["mode"]) == ("accuracy", "max")
    assert set(best["config"]) == {"lr", "wd"}
    trials = daemon.json("trials", "hb")["trials"]
    assert max(t["reward"] for t in trials if t["reward"] is not None) == best["reward"]
    curves = daemon.json("curves", "hb")
    assert len(curves["curves"]) == 12
    text = daemon.ctl("curves", "hb")
    assert text.returncode == 0 and "accuracy" in text.stdout
    png = tmp_path / "c.png"
    assert daemon.ctl("curves", "hb", "--png", str(png)).returncode == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_bad_spec_is_refused_with_every_problem(daemon, tmp_path):
    path = write_spec(tmp_path, "bad", """
        name = "bad"
        entry = "nowhere.py:f"
        searcher = "nope"
        num_trials = -1
        mode = "sideways"
    """)
    out = daemon.ctl("submit", path)
    assert out.returncode == 1
    for key in ("searcher", "num_trials", "mode"):
        assert key in out.stderr
    assert daemon.ctl("best", "bad").returncode == 4
    assert daemon.ctl("status").returncode == 0


def test_name_taken_and_unknown_experiment(daemon, tmp_path):
    path = toy_spec(tmp_path, "twice", trials=2)
    assert daemon.ctl("submit", path).returncode == 0
    out = daemon.ctl("submit", path)
    assert out.returncode == 1 and "exists" in out.stderr
    assert daemon.ctl("trials", "nope").returncode == 4
    assert daemon.ctl("kill", "nope", "0").returncode == 4


def test_pause_resume_and_stop(daemon, tmp_path):
    slow = tmp_path / "slow.py"
    slow.write_text(textwrap.dedent("""
        import time
        import tuned

        @tuned.args(x=tuned.space.Real(0, 1), epochs=40)
        def train(args, reporter):
            for e in range(args.epochs):
                time.sleep(0.05)
                reporter(epoch=e + 1, accuracy=args.x * e)
    """))
    path = write_spec(tmp_path, "slow", f"""
        name = "slow"
        entry = "{slow}:train"
        num_trials = 4
    """)
    assert daemon.ctl("submit", path).returncode == 0
    time.sleep(0.5)
    assert daemon.json("pause", "slow")["state"] == "PAUSED"
    wait_until(lambda: not daemon.trials_in("slow", "RUNNING"), 20, "the trials' pausing",
               every=0.1)
    paused = daemon.json("status", "slow")["experiments"][0]["trials"]
    assert paused.get("PAUSED", 0) >= 1
    assert daemon.json("resume", "slow")["state"] == "RUNNING"
    done = daemon.wait_state("slow", ("COMPLETED",))
    assert done["trials"] == {"COMPLETED": 4}
    # Resumed trials kept their reports: each has exactly 40, none doubled.
    with daemon.db() as c:
        counts = [r[0] for r in c.execute("SELECT COUNT(*) FROM reports GROUP BY trial_id")]
    assert counts == [40] * 4

    assert daemon.ctl("submit", write_spec(tmp_path, "slow2", f"""
        name = "slow2"
        entry = "{slow}:train"
        num_trials = 10
        [constants]
        epochs = 400
    """)).returncode == 0
    time.sleep(0.5)
    running = [t for t in daemon.json("trials", "slow2")["trials"] if t["state"] == "RUNNING"]
    assert running
    killed = daemon.json("kill", "slow2", str(running[0]["trial"]))
    assert killed["killed"]
    assert daemon.json("stop", "slow2")["state"] == "STOPPED"
    ended = daemon.wait_state("slow2", ("STOPPED",))
    assert ended["reason"] == "stopped by the user"
    wait_until(lambda: not daemon.trials_in("slow2", "RUNNING"), 10,
               "the stopped trials' end", every=0.1)
    rows = daemon.json("trials", "slow2", "--all")["trials"]
    states = {t["trial"]: (t["state"], t["error"]) for t in rows}
    # 400 epochs of 50 ms: none of them could finish; the killed one says so, and every other
    # one (running or waiting when the stop came) ended FAILED "stopped by the user".
    assert states.pop(running[0]["trial"]) == ("FAILED", "killed by the user")
    assert set(states.values()) == {("FAILED", "stopped by the user")}
    daemon.stop()
    daemon.start()
    again = daemon.json("status", "slow2")["experiments"][0]
    assert again["state"] == "STOPPED" and set(again["trials"]) == {"FAILED"}


def test_one_daemon_per_state_dir(daemon):
    second = Daemon(daemon.root)
    proc = second.start(wait=False)
    proc.wait(timeout=20)
    assert proc.returncode != 0
    assert "another tuned daemon" in second.log()
    assert daemon.ctl("status").returncode == 0


def test_restart_after_sigkill_completes_without_doubling(tmp_path):
    d = Daemon(tmp_path)
    d.start()
    try:
        slow = tmp_path / "slow.py"
        slow.write_text(textwrap.dedent("""
            import time
            import numpy as np
            import tuned

            @tuned.args(x=tuned.space.Real(0, 1), epochs=10)
            def train(args, reporter):
                for e in range(args.epochs):
                    time.sleep(0.02)
                    reporter(epoch=e + 1, accuracy=args.x + np.random.uniform(0, 0.01))
        """))
        assert d.ctl("submit", write_spec(tmp_path, "k", f"""
            name = "k"
            entry = "{slow}:train"
            num_trials = 30
            seed = 1
        """)).returncode == 0
        deadline = time.monotonic() + 30
        while sum(v for s, v in d.json("status", "k")["experiments"][0]["trials"].items()
                  if s in ("COMPLETED", "STOPPED")) < 5:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait()
        # A stale socket file and lock from the dead daemon do not stop a new one.
        assert os.path.exists(d.sock)
        d.start()
        done = d.wait_state("k", ("COMPLETED",))
        assert done["trials"] == {"COMPLETED": 30}
        with d.db() as c:
            assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            per_trial = c.execute("SELECT trial_id, COUNT(*), MAX(seq) FROM reports "
                                  "GROUP BY trial_id").fetchall()
            assert len(per_trial) == 30
            assert all(n == 10 and top == 10 for _, n, top in per_trial)
            running = c.execute("SELECT COUNT(*) FROM trials WHERE state = 'RUNNING'")
            assert running.fetchone()[0] == 0
    finally:
        d.close()


def test_spool_accepts_and_rejects(daemon, tmp_path):
    inbox = daemon.state / "inbox"
    good = Path(toy_spec(tmp_path, "spooled", trials=3))
    staged = inbox / ".spooled.toml"
    staged.write_text(good.read_text())
    staged.rename(inbox / "spooled.toml")
    (inbox / "broken.toml").write_text("name = [unclosed")
    deadline = time.monotonic() + 40
    while not (list((daemon.state / "accepted").glob("*spooled.toml"))
               and list((daemon.state / "rejected").glob("*broken.toml.error"))):
        assert time.monotonic() < deadline, "the spool did not handle the files"
        time.sleep(0.1)
    error = next((daemon.state / "rejected").glob("*broken.toml.error")).read_text()
    assert "broken.toml" in error or "line" in error
    daemon.wait_state("spooled", ("COMPLETED",))


def test_socket_is_private(daemon):
    assert os.stat(daemon.sock).st_mode & 0o777 == 0o600
    assert os.stat(os.path.dirname(daemon.sock)).st_mode & 0o777 == 0o700


def test_junk_on_the_socket_gets_an_error_and_the_daemon_stays_up(daemon):
    import socket

    with socket.socket(socket.AF_UNIX) as s:
        s.connect(daemon.sock)
        s.sendall(b"this is not json\n")
        answer = json.loads(s.makefile().readline())
    assert answer["error"]["code"] == "bad_json"
    assert daemon.ctl("status").returncode == 0


def test_a_silent_trial_is_killed_after_report_timeout_and_retried(daemon, tmp_path):
    marker = tmp_path / "hung-once"
    hang = tmp_path / "hang.py"
    hang.write_text(textwrap.dedent(f"""
        import os, time
        import tuned

        @tuned.args(x=tuned.space.Real(0, 1))
        def train(args, reporter):
            if not os.path.exists({str(marker)!r}):
                open({str(marker)!r}, "w").close()
                time.sleep(600)
            reporter(accuracy=args.x)
    """))
    assert daemon.ctl("submit", write_spec(tmp_path, "hang", f"""
        name = "hang"
        entry = "{hang}:train"
        num_trials = 1
        report_timeout = 1.0
        max_retries = 1
        time_attr = "epoch"
    """)).returncode == 0
    done = daemon.wait_state("hang", ("COMPLETED",), timeout=30)
    assert done["trials"] == {"COMPLETED": 1}
    (trial,) = daemon.json("trials", "hang")["trials"]
    assert trial["attempt"] == 2


def test_a_scheduled_experiment_waits_for_its_time(daemon, tmp_path):
    path = toy_spec(tmp_path, "later", trials=2, extra='schedule = "0 3 1 1 *"')
    assert daemon.json("submit", path)["state"] == "SCHEDULED"
    assert daemon.json("status", "later")["experiments"][0]["state"] == "SCHEDULED"
    assert daemon.json("status", "later")["experiments"][0]["trials"] == {}
    assert daemon.json("stop", "later")["state"] == "STOPPED"  # cancelled
    daemon.stop()
    daemon.start()
    assert daemon.json("status", "later")["experiments"][0] == {
        "experiment": "later", "state": "STOPPED", "reason": "cancelled by the user before "
        "it started", "waiting": None, "trials": {}, "best": None, "num_trials": 2,
        "time_out": None, "metric": "accuracy", "mode": "max"}


def _argv_probe(tmp_path: Path) -> Path:
    probe = tmp_path / "probe.py"
    probe.write_text(textwrap.dedent("""
        import os, sys
        import tuned

        IMPORTED_IN = os.getpid()

        @tuned.args(x=tuned.space.Real(0, 1))
        def train(args, reporter):
            reporter(accuracy=args.x, spawned="--trial" in sys.argv,
                     imported_here=IMPORTED_IN == os.getpid())
    """))
    return probe


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_trials_come_from_the_template_or_a_fresh_interpreter(daemon, tmp_path, method):
    probe = _argv_probe(tmp_path)
    assert daemon.ctl("submit", write_spec(tmp_path, method, f"""
        name = "{method}"
        entry = "{probe}:train"
        num_trials = 3
        start_method = "{method}"
    """)).returncode == 0
    daemon.wait_state(method, ("COMPLETED",))
    with daemon.db() as c:
        rows = [json.loads(r[0]) for r in c.execute(
            "SELECT r.metrics FROM reports r JOIN trials t ON t.id = r.trial_id "
            "JOIN experiments e ON e.id = t.experiment_id WHERE e.name = ?", (method,))]
    assert len(rows) == 3
    # Forked trials run the module their template imported; spawned ones import it anew.
    assert all(r["spawned"] == (method == "spawn") for r in rows)
    assert all(r["imported_here"] == (method == "spawn") for r in rows)


def test_an_entry_that_fails_to_import_is_refused(daemon, tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('this module cannot be imported')\n")
    out = daemon.ctl("submit", write_spec(tmp_path, "broken", f"""
        name = "broken"
        entry = "{broken}:train"
        num_trials = 1
        [space]
        x = {{type = "real", lower = 0, upper = 1}}
    """))
    assert out.returncode == 1
    assert "entry" in out.stderr and "cannot be imported" in out.stderr
    assert daemon.ctl("status", "broken").returncode == 4
    assert daemon.ctl("status").returncode == 0


def test_watch_streams_starts_reports_and_ends(daemon, tmp_path):
    code = "import sys; from tuned.cli import tunectl_main; sys.argv[0] = 'x'; tunectl_main()"
    watcher = subprocess.Popen([sys.executable, "-c", code, "--socket", daemon.sock, "--json",
                                "watch"], stdout=subprocess.PIPE, text=True)
    try:
        # Its first line (the status snapshot) means it is subscribed.
        first = json.loads(watcher.stdout.readline())
        assert "experiments" in first
        assert daemon.ctl("submit", toy_spec(tmp_path, "watched", trials=3)).returncode == 0
        daemon.wait_state("watched", ("COMPLETED",))
        time.sleep(0.5)
    finally:
        watcher.send_signal(signal.SIGINT)
        out, _ = watcher.communicate(timeout=10)
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    events = [e for e in events if "event" in e]
    kinds = [(e["event"], e["trial"]) for e in events if e.get("experiment") == "watched"]
    for trial in range(3):
        assert ("start", trial) in kinds and ("end", trial) in kinds
        assert kinds.count(("report", trial)) == 10
    assert all(e["topic"] == "exp/watched" for e in events)


def test_gpus_busy_with_foreign_processes_are_not_handed_out(tmp_path):
    gpus = tmp_path / "gpus.json"
    busy = {"uuid": "GPU-b", "processes": [{"pid": 999999, "used_memory": 2 << 30}]}
    gpus.write_text(json.dumps([{"uuid": "GPU-a"}, busy]))
    d = Daemon(tmp_path)
    d.start(env={"TUNED_FAKE_GPUS": f"@{gpus}"})
    try:
        probe = tmp_path / "cuda.py"
        probe.write_text(textwrap.dedent("""
            import os, time
            import tuned

            @tuned.args(x=tuned.space.Real(0, 1))
            def train(args, reporter):
                time.sleep(0.2)
                reporter(accuracy=args.x, cuda=os.environ.get("CUDA_VISIBLE_DEVICES", ""))
        """))
        assert d.ctl("submit", write_spec(tmp_path, "g", f"""
            name = "g"
            entry = "{probe}:train"
            num_trials = 4
            [resources]
            num_cpus = 0.5
            num_gpus = 1
        """)).returncode == 0
        d.wait_state("g", ("COMPLETED",))
        with d.db() as c:
            seen = {json.loads(r[0])["cuda"] for r in c.execute("SELECT metrics FROM reports")}
        assert seen == {"GPU-a"}
        assert d.json("status")["gpus_busy_foreign"] == {"GPU-b": [999999]}
    finally:
        d.close()


def test_trials_pages_and_best_curves(daemon, tmp_path):
    assert daemon.ctl("submit", toy_spec(tmp_path, "paged", trials=8)).returncode == 0
    daemon.wait_state("paged", ("COMPLETED",))
    page = daemon.json("trials", "paged", "--limit", "3", "--offset", "2")
    assert [t["trial"] for t in page["trials"]] == [2, 3, 4] and page["total"] == 8
    everything = daemon.json("trials", "paged", "--all")["trials"]
    assert [t["trial"] for t in everything] == list(range(8))
    # Without --all a page: the last ones (--limit of them), said on stderr in text.
    last = daemon.json("trials", "paged", "--limit", "3")
    assert [t["trial"] for t in last["trials"]] == [5, 6, 7] and last["offset"] == 5
    text = daemon.ctl("trials", "paged", "--limit", "3")
    assert text.returncode == 0 and len(text.stdout.splitlines()) == 1 + 3  # a header
    assert "3 of 8 trials shown: positions 5-7" in text.stderr and "--all" in text.stderr
    assert daemon.ctl("trials", "paged").stderr == ""  # 8 trials fit the default page
    best_two = sorted(everything, key=lambda t: -t["reward"])[:2]
    curves = daemon.json("curves", "paged", "--top", "2")
    assert set(curves["curves"]) == {str(t["trial"]) for t in best_two}
    assert curves["total"] == 8
    text = daemon.ctl("curves", "paged", "--top", "2")
    assert "the curves of the 2 best of 8 trials" in text.stderr
    epochs = daemon.json("curves", "paged", "--top", "2", "--metric", "epoch")["curves"]
    assert set(epochs) == set(curves["curves"])
    assert len(daemon.json("curves", "paged")["curves"]) == 8
    assert daemon.ctl("--json", "trials", "paged", "--limit", "-1").returncode == 2
    assert daemon.ctl("trials", "paged", "--all", "--limit", "2").returncode == 2
    assert daemon.ctl("curves", "paged", "--all", "--top", "2").returncode == 2


def test_a_start_missed_while_no_daemon_ran_happens_on_restart(tmp_path):
    from datetime import datetime, timedelta, timezone

    # Daily at the minute that began a minute or two ago: it fires again only tomorrow.
    t = datetime.now(timezone.utc) - timedelta(seconds=60)
    d = Daemon(tmp_path)
    d.start()
    path = toy_spec(tmp_path, "missed", trials=2,
                     extra=f'schedule = "{t.minute} {t.hour} * * *"')
    assert d.json("submit", path)["state"] == "SCHEDULED"
    d.stop()
    # As if it had been submitted three minutes ago to a daemon that then went down: the
    # cron fired while no daemon ran.
    with d.db() as c:
        c.execute("UPDATE experiments SET created = created - 180 WHERE name = 'missed'")
        state = c.execute("SELECT state FROM experiments WHERE name = 'missed'").fetchone()
        assert state == ("SCHEDULED",)
    d.start()
    try:
        done = d.wait_state("missed", ("COMPLETED",), timeout=40)
        assert done["trials"] == {"COMPLETED": 2}
    finally:
        d.close()


def test_an_entry_that_imports_slowly_holds_up_nothing(daemon, tmp_path):
    module = tmp_path / "slow_import.py"
    module.write_text(textwrap.dedent("""
        import time
        import tuned

        time.sleep(3)

        @tuned.args(x=tuned.space.Real(0, 1))
        def train(args, reporter):
            reporter(accuracy=args.x)
    """))
    spec = write_spec(tmp_path, "slow", f"""
        name = "slow"
        entry = "{module}:train"
        num_trials = 2
    """)
    code = "import sys; from tuned.cli import tunectl_main; sys.argv[0] = 'x'; tunectl_main()"
    submit = subprocess.Popen([sys.executable, "-c", code, "submit", spec],
                              env={**os.environ, "TUNED_SOCKET": daemon.sock},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until((daemon.state / "logs" / "slow" / "template.log").exists, 20,
                   "the template's start", every=0.05)
        started = time.monotonic()
        assert daemon.json("status")["experiments"] == []  # answered while it loads
        again = daemon.ctl("submit", spec)
        assert time.monotonic() - started < 2.5
        assert again.returncode == 1 and "exists already" in again.stderr
        out, err = submit.communicate(timeout=30)
    finally:
        submit.kill()
    assert submit.returncode == 0, err
    assert "submitted slow" in out
    assert daemon.wait_state("slow", ("COMPLETED",))["trials"] == {"COMPLETED": 2}
