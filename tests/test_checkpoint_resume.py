"""Trials resume from their checkpoints: after a pause, and after a daemon that stopped its
trials; with real daemons and real trial processes."""

from __future__ import annotations

import json
import signal
import textwrap
from pathlib import Path

from helpers import Daemon, wait_until, write_spec

EPOCHS = 12


def _module(tmp_path: Path, save_first: bool = False, gate: bool = False) -> Path:
    """A training function that keeps its progress in a checkpoint and reports, with each
    epoch, the epochs it (re)started from so far; `save_first`: it wrongly saves the
    checkpoint of an epoch before reporting it; `gate`: on its first run it waits after it
    reported epoch 3 and saved its next checkpoint (of epoch 3, or of epoch 4 when
    `save_first`) until the file `tmp_path / "gate"` exists, so that what the test does
    meanwhile happens at that point, however slow the machine."""
    module = tmp_path / "ckpt_train.py"
    gate_path = str(tmp_path / "gate") if gate else ""
    module.write_text(textwrap.dedent(f"""
        import json, os, time
        import tuned

        def save(reporter, state, epoch):
            reporter.save_checkpoint({{**state, "epoch": epoch}})
            if {gate_path!r} and len(state["starts"]) == 1 and epoch == 3 + {save_first}:
                deadline = time.monotonic() + 60
                while not os.path.exists({gate_path!r}) and time.monotonic() < deadline:
                    time.sleep(0.02)

        @tuned.args(x=tuned.space.Real(0, 1), epochs={EPOCHS})
        def train(args, reporter):
            state = reporter.load_checkpoint() or {{"epoch": 0, "starts": []}}
            assert {save_first} or reporter.resume_from == (state["epoch"] or None)
            state["starts"].append(state["epoch"])
            for e in range(state["epoch"], args.epochs):
                time.sleep(0.06)
                if {save_first}:
                    save(reporter, state, e + 1)
                reporter(epoch=e + 1, accuracy=args.x, starts=json.dumps(state["starts"]))
                state["epoch"] = e + 1
                if not {save_first}:
                    save(reporter, state, e + 1)
    """))
    return module


def _submit(d: Daemon, tmp_path: Path, name: str, extra: str = "",
            save_first: bool = False, gate: bool = False) -> None:
    assert d.ctl("submit", write_spec(tmp_path, name, f"""
        name = "{name}"
        entry = "{_module(tmp_path, save_first, gate)}:train"
        num_trials = 2
        max_concurrent = 2
        seed = 2
        {extra}
    """)).returncode == 0


def _wait_reports(d: Daemon, n: int) -> None:
    def reported() -> bool:
        with d.db() as c:
            counts = [r[0] for r in c.execute("SELECT MAX(seq) FROM reports GROUP BY trial_id")]
        return len(counts) == 2 and min(counts) >= n

    wait_until(reported, 30, f"{n} reports of both trials", every=0.05)


def _check_resumed(d: Daemon) -> None:
    """Every trial has reports 1..EPOCHS once each, and its last report shows it restarted
    from a checkpoint (a start > 0), never from scratch a second time."""
    with d.db() as c:
        for (trial_id,) in c.execute("SELECT id FROM trials"):
            rows = c.execute("SELECT seq, metrics FROM reports WHERE trial_id = ? "
                             "ORDER BY seq", (trial_id,)).fetchall()
            assert [s for s, _ in rows] == list(range(1, EPOCHS + 1))
            starts = json.loads(json.loads(rows[-1][1])["starts"])
            assert starts[0] == 0 and len(starts) >= 2 and 0 not in starts[1:], starts


def _pause_and_resume(d: Daemon, name: str, gate: Path | None = None) -> None:
    """Pause `name` (then open `gate`, where its trials wait), wait until no trial of it
    runs, and resume it."""
    assert d.json("pause", name)["state"] == "PAUSED"
    if gate is not None:
        gate.touch()
    wait_until(lambda: not d.trials_in(name, "RUNNING"), 20, "the trials' pausing", every=0.05)
    assert d.json("resume", name)["state"] == "RUNNING"


def test_a_paused_trial_resumes_from_its_checkpoint(tmp_path):
    d = Daemon(tmp_path)
    d.start()
    try:
        _submit(d, tmp_path, "p", gate=True)
        _wait_reports(d, 3)
        _pause_and_resume(d, "p", tmp_path / "gate")
        assert d.wait_state("p", ("COMPLETED",))["trials"] == {"COMPLETED": 2}
        _check_resumed(d)
    finally:
        d.close()


def test_a_checkpoint_saved_before_its_report_is_caught_on_resume(tmp_path):
    d = Daemon(tmp_path)
    d.start(args=("--stop-trials",))
    try:
        _submit(d, tmp_path, "early", save_first=True, gate=True)
        _wait_reports(d, 3)
        # Stopped while they wait at the gate, after report 3 and checkpoint 4: the
        # checkpoint they resume from holds one epoch more than the reports it covers.
        d.proc.send_signal(signal.SIGTERM)
        d.proc.wait(timeout=30)
        (tmp_path / "gate").touch()
        d.start(args=("--stop-trials",))
        # Both trials fail for it, so the experiment fails, naming the error.
        ended = d.wait_state("early", ("COMPLETED", "FAILED"))
        assert ended["state"] == "FAILED"
        assert "a checkpoint must be saved after the report" in ended["reason"]
        errors = {t["error"] for t in d.json("trials", "early")["trials"]}
        assert any(e and "a checkpoint must be saved after the report" in e for e in errors), \
            errors
    finally:
        d.close()


def test_trials_stopped_with_their_daemon_resume_from_their_checkpoints(tmp_path):
    d = Daemon(tmp_path)
    d.start(args=("--stop-trials",))
    try:
        _submit(d, tmp_path, "r", extra="keep_checkpoints = 1")
        _wait_reports(d, 3)
        d.proc.send_signal(signal.SIGTERM)
        d.proc.wait(timeout=30)
        d.start(args=("--stop-trials",))
        assert d.wait_state("r", ("COMPLETED",))["trials"] == {"COMPLETED": 2}
        _check_resumed(d)
        # keep_checkpoints = 1: only the best trial's checkpoints are left.
        best = d.json("best", "r")["trial"]
        left = sorted(p.name for p in (d.state / "checkpoints" / "r").iterdir())
        assert left == [f"trial-{best}"]
    finally:
        d.close()


def test_promoted_trials_resume_from_checkpoints_across_a_daemon_restart(tmp_path):
    module = tmp_path / "promoted.py"
    module.write_text(textwrap.dedent("""
        import json, time
        import tuned

        @tuned.args(x=tuned.space.Real(0, 1), epochs=8)
        def train(args, reporter):
            state = reporter.load_checkpoint() or {"epoch": 0, "starts": []}
            state["starts"].append(state["epoch"])
            for epoch in range(state["epoch"] + 1, args.epochs + 1):
                time.sleep(0.05)
                reporter(epoch=epoch, accuracy=args.x * epoch,
                         starts=json.dumps(state["starts"]))
                state["epoch"] = epoch
                reporter.save_checkpoint(state)
    """))
    d = Daemon(tmp_path)
    d.start()
    try:
        assert d.ctl("submit", write_spec(tmp_path, "promo", f"""
            name = "promo"
            entry = "{module}:train"
            scheduler = "hyperband_promotion"
            num_trials = 10
            max_concurrent = 2
            seed = 7
            [scheduler_options]
            grace_period = 2
            reduction_factor = 2
        """)).returncode == 0
        wait_until(lambda: d.trials_in("promo", "PAUSED") >= 3, 60, "3 paused trials",
                   every=0.05)
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait()
        d.start()
        d.wait_state("promo", ("COMPLETED",))
        trials = d.json("trials", "promo")["trials"]
        assert {t["state"] for t in trials} <= {"COMPLETED", "STOPPED"}, trials
        with d.db() as c:
            rows = c.execute("SELECT trial_id, seq, metrics FROM reports "
                             "ORDER BY trial_id, seq").fetchall()
        by_trial: dict[int, list] = {}
        for trial_id, seq, metrics in rows:
            by_trial.setdefault(trial_id, []).append((seq, json.loads(metrics)))
        resumed = 0
        for reports in by_trial.values():
            assert [s for s, _ in reports] == list(range(1, len(reports) + 1))
            starts = json.loads(reports[-1][1]["starts"])
            assert starts == [0] + [lv for lv in (2, 4) if lv < len(reports)], starts
            resumed += len(starts) > 1
        assert resumed >= 2 and any(len(r) == 8 for r in by_trial.values())
    finally:
        d.close()
