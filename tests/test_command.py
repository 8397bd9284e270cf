"""Command specs: trials that run a program, reporting over the channel in TUNED_REPORT_FD
(with `tuned.report`, or by hand), through a real daemon."""

from __future__ import annotations

import json
import signal
import textwrap
import time

import pytest
from helpers import Daemon, write_spec

from tuned.experiment.command import check_command, placeholders, render


def test_fields_are_replaced_and_braces_escaped():
    command = ["prog", "--lr={lr}", "{{x}}", "-v={verbose}", "{lr}{lr}", "plain"]
    assert placeholders(command) == ["lr", "verbose"]
    assert render(command, {"lr": 0.5, "verbose": True}) == [
        "prog", "--lr=0.5", "{x}", "-v=true", "0.50.5", "plain"]
    with pytest.raises(KeyError):
        render(["{missing}"], {})


def test_unknown_fields_are_problems_naming_them():
    assert check_command(["{python}", "t.py", "{lr}", "{epochs}"], {"lr", "epochs"}) == []
    (problem,) = check_command(["t", "{lr}", "{nope}"], {"lr"})
    assert problem.startswith("command: {nope} names no parameter") and "lr" in problem


def _program(tmp_path, body: str):
    path = tmp_path / "prog.py"
    path.write_text(textwrap.dedent(body))
    return path


def test_a_python_program_reports_with_tuned_report_and_hyperband_stops_it(daemon, tmp_path):
    _program(tmp_path, """
        import sys
        import tuned.report as report

        args = report.config()
        assert sys.argv[1] == f"--x={args['x']}", sys.argv
        for epoch in range(1, args["epochs"] + 1):
            report.report(epoch=epoch, accuracy=args["x"] * epoch,
                          number=report.trial_number())
    """)
    spec = write_spec(tmp_path, "prog", """
        name = "prog"
        command = ["{python}", "prog.py", "--x={x}"]
        num_trials = 9
        scheduler = "hyperband_stopping"
        seed = 4
        [constants]
        epochs = 9
        [space]
        x = {type = "real", lower = 0, upper = 1}
        [scheduler_options]
        grace_period = 1
        reduction_factor = 3
    """)
    out = daemon.ctl("submit", spec)
    assert out.returncode == 0, out.stderr
    daemon.wait_state("prog", ("COMPLETED",))
    trials = daemon.json("trials", "prog")["trials"]
    states = {t["state"] for t in trials}
    assert states <= {"COMPLETED", "STOPPED"} and "STOPPED" in states, trials
    assert any(t["reports"] == 9 and t["state"] == "COMPLETED" for t in trials)
    with daemon.db() as c:
        numbers = {json.loads(m)["number"] for (m,) in c.execute("SELECT metrics FROM reports")}
    assert numbers == {t["trial"] for t in trials}
    best = daemon.json("best", "prog")
    assert best["reward"] == max(t["reward"] for t in trials)


def test_a_program_in_any_language_speaks_the_protocol(daemon, tmp_path):
    script = tmp_path / "prog.sh"
    script.write_text(textwrap.dedent("""
        fd=$TUNED_REPORT_FD
        for seq in 1 2 3; do
            printf '{"seq":%d,"metrics":{"epoch":%d,"accuracy":0.%d}}\\n' $seq $seq $seq >&"$fd"
            read -r answer <&"$fd"
            case "$answer" in *'"decision":"continue"'*) ;; *) exit 0 ;; esac
        done
    """))
    spec = write_spec(tmp_path, "sh", f"""
        name = "sh"
        command = ["bash", "{script}"]
        num_trials = 2
        [space]
        x = {{type = "int", lower = 0, upper = 9}}
    """)
    assert daemon.ctl("submit", spec).returncode == 0
    assert daemon.wait_state("sh", ("COMPLETED",))["trials"] == {"COMPLETED": 2}
    assert all(t["reports"] == 3 and t["reward"] == 0.3
               for t in daemon.json("trials", "sh")["trials"])


def test_programs_that_cannot_run_or_raise_fail_with_their_reason(daemon, tmp_path):
    _program(tmp_path, """
        import tuned.report as report

        report.report(accuracy=0.1)
        raise ValueError("boom after one report")
    """)
    for name, command in (("missing", '["no-such-program-here", "x"]'),
                          ("raises", '["{python}", "prog.py"]')):
        assert daemon.ctl("submit", write_spec(tmp_path, name, f"""
            name = "{name}"
            command = {command}
            num_trials = 1
            [space]
            x = {{type = "int", lower = 0, upper = 9}}
        """)).returncode == 0
        ended = daemon.wait_state(name, ("COMPLETED", "FAILED"))
        # Its only trial failed: the experiment failed too, with the trial's error.
        assert ended["state"] == "FAILED"
        assert ended["reason"].startswith("1 trial(s) failed and none succeeded; "
                                          "last errors: trial 0: ")
    (missing,) = daemon.json("trials", "missing")["trials"]
    assert missing["state"] == "FAILED"
    assert "cannot run 'no-such-program-here'" in missing["error"]
    (raised,) = daemon.json("trials", "raises")["trials"]
    assert raised["state"] == "FAILED" and raised["error"] == "ValueError: boom after one report"


def test_a_field_naming_nothing_is_refused(daemon, tmp_path):
    out = daemon.ctl("submit", write_spec(tmp_path, "bad", """
        name = "bad"
        command = ["prog", "--lr={lr}"]
        num_trials = 1
        [space]
        x = {type = "int", lower = 0, upper = 9}
    """))
    assert out.returncode == 1 and "command: {lr} names no parameter" in out.stderr


def test_a_program_trial_is_adopted_after_the_daemon_is_killed(tmp_path):
    _program(tmp_path, """
        import os, time
        import tuned.report as report

        for epoch in range(1, 16):
            time.sleep(0.1)
            report.report(epoch=epoch, accuracy=0.5, pid=os.getpid())
    """)
    d = Daemon(tmp_path)
    d.start()
    try:
        assert d.ctl("submit", write_spec(tmp_path, "p", """
            name = "p"
            command = ["{python}", "prog.py"]
            num_trials = 2
            max_concurrent = 2
            [space]
            x = {type = "int", lower = 0, upper = 9}
        """)).returncode == 0
        deadline = time.monotonic() + 30
        while d.json("status", "p")["experiments"][0]["trials"].get("RUNNING", 0) < 2 \
                or _reports(d) < 4:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait()
        d.start()
        assert d.wait_state("p", ("COMPLETED",))["trials"] == {"COMPLETED": 2}
        with d.db() as c:
            rows = c.execute("SELECT trial_id, COUNT(*), COUNT(DISTINCT "
                             "json_extract(metrics, '$.pid')) FROM reports GROUP BY trial_id")
            assert sorted(n for _, n, _ in rows) == [15, 15]
            attempts = {a for (a,) in c.execute("SELECT attempt FROM trials")}
        assert attempts == {1}, "a trial ran again instead of being adopted"
    finally:
        d.close()


def _reports(d: Daemon) -> int:
    with d.db() as c:
        return c.execute("SELECT COUNT(*) FROM reports").fetchone()[0]


