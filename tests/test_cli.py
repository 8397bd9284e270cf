"""The `tuned` and `tunectl` command lines, run as real processes on a real store."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tuned.core.decisions import Decision, TrialState
from tuned.store.database import Store


def _run(*args: str, env: dict[str, str] | None = None,
         cwd: str | None = None) -> subprocess.CompletedProcess:
    code = "import sys; from tuned.cli import {0}; sys.argv[0] = 'x'; {0}()"
    entry = "tunectl_main" if args[0] == "tunectl" else "tuned_main"
    return subprocess.run([sys.executable, "-c", code.format(entry), *args[1:]],
                          capture_output=True, text=True, timeout=60, cwd=cwd,
                          env={**os.environ, **(env or {})})


def _make_store(path, config_values=(0, 1)) -> str:
    store = Store(path)
    exp = store.create_experiment("exp", {"reward_attr": "acc", "mode": "max",
                                          "num_trials": 4, "space": {
                                              "x": {"type": "real", "lower": 0, "upper": 1}}})
    for n, reward in enumerate([0.2, 0.8]):
        tid = store.add_trial(exp.id, n, {"x": config_values[n]}, 0)
        store.claim_trial(tid, 1)
        store.record_report(tid, 1, 1, reward, reward, json.dumps({"acc": reward}),
                            Decision.CONTINUE)
        store.finish_trial(tid, TrialState.COMPLETED)
    store.close()
    return str(path)


@pytest.fixture
def db(tmp_path):
    return _make_store(tmp_path / "t.db")


def test_best_json_before_or_after_the_command(db):
    expected = {"experiment": "exp", "trial": 1, "config": {"x": 1}, "reward": 0.8,
                "metric": "acc", "mode": "max"}
    for args in (("best", "--db", db, "--json", "exp"), ("--json", "best", "--db", db, "exp")):
        out = _run("tuned", *args)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == expected


def test_best_text_names_the_metric_and_rounds_numbers(tmp_path):
    db = _make_store(tmp_path / "t.db", config_values=(0.1, 0.0055000000000000005))
    out = _run("tuned", "best", "--db", db, "exp")
    assert out.stdout == "trial 1: acc (max) 0.8  x=0.0055\n"


def test_experiments_and_trials(db):
    out = _run("tuned", "experiments", "--db", db, "--json")
    (exp,) = json.loads(out.stdout)["experiments"]
    assert exp["trials"] == {"COMPLETED": 2} and exp["best"]["trial"] == 1
    text = _run("tuned", "experiments", "--db", db).stdout
    assert text.splitlines()[0] == "exp  RUNNING  2 of 4 trials: 2 completed"
    out = _run("tuned", "trials", "--db", db, "exp")
    assert out.returncode == 0 and "COMPLETED" in out.stdout and "x=1" in out.stdout
    assert out.stdout.splitlines()[0].split() == ["trial", "state", "attempt", "reports",
                                                  "acc", "(max)", "config"]
    assert out.stderr == ""  # every trial fits the default page
    out = _run("tuned", "trials", "--db", db, "--limit", "1", "exp")
    assert out.returncode == 0 and "x=1" in out.stdout and "x=0" not in out.stdout
    assert "1 of 2 trials shown: positions 1-1" in out.stderr
    out = _run("tuned", "trials", "--db", db, "--json", "--all", "exp")
    assert [t["trial"] for t in json.loads(out.stdout)["trials"]] == [0, 1]


def test_unknown_experiment_exits_4(db):
    out = _run("tuned", "best", "--db", db, "nope")
    assert out.returncode == 4 and out.stderr == "error: no experiment 'nope'\n"
    out = _run("tuned", "--json", "best", "--db", db, "nope")
    assert out.returncode == 4
    assert json.loads(out.stdout) == {"error": {"code": "not_found",
                                                "message": "no experiment 'nope'"}}


def test_usage_error_exits_2_and_is_json_with_json(db):
    out = _run("tuned", "best", "--db", db)
    assert out.returncode == 2 and "Missing argument 'EXPERIMENT'" in out.stderr
    out = _run("tuned", "best", "--db", db, "--json")
    assert out.returncode == 2
    error = json.loads(out.stdout)["error"]
    assert error["code"] == "usage" and "Missing argument" in error["message"]


def test_a_mistyped_db_is_not_found_and_creates_nothing(tmp_path):
    missing = tmp_path / "no" / "such" / "t.db"
    out = _run("tuned", "experiments", "--db", str(missing))
    assert out.returncode == 4 and f"no store at {missing}" in out.stderr
    assert not (tmp_path / "no").exists()


def test_the_daemons_store_is_found_without_db(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    _make_store(state / "tuned.db")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    out = _run("tuned", "--json", "experiments", env={"TUNED_STATE_DIR": str(state)},
               cwd=str(elsewhere))
    assert out.returncode == 0, out.stdout
    assert [e["experiment"] for e in json.loads(out.stdout)["experiments"]] == ["exp"]
    # No store anywhere: not found, naming where it looked, and nothing is created.
    home = tmp_path / "home"
    out = _run("tuned", "--json", "experiments", cwd=str(elsewhere),
               env={"TUNED_STATE_DIR": "", "HOME": str(home),
                    "XDG_STATE_HOME": str(home / "state")})
    assert out.returncode == 4 and json.loads(out.stdout)["error"]["code"] == "not_found"
    assert "give --db FILE" in json.loads(out.stdout)["error"]["message"]
    assert not home.exists() and list(elsewhere.iterdir()) == []


def test_export_csv_and_jsonl_from_a_store(db, tmp_path):
    out = _run("tuned", "export", "--db", db, "exp")
    lines = out.stdout.splitlines()
    assert out.returncode == 0, out.stderr
    assert lines[0] == ("trial,state,attempt,reward,reports,parent,error,created,started,"
                        "ended,duration,x")
    assert [line.split(",")[:4] for line in lines[1:]] == [["0", "COMPLETED", "1", "0.2"],
                                                           ["1", "COMPLETED", "1", "0.8"]]
    target = tmp_path / "reports.jsonl"
    out = _run("tuned", "export", "--db", db, "--reports", "--format", "jsonl", "-o",
               str(target), "exp")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert [(r["trial"], r["seq"], r["acc"]) for r in rows] == [(0, 1, 0.2), (1, 1, 0.8)]


def test_export_in_pages_gives_what_one_page_gives(tmp_path):
    store = Store(tmp_path / "p.db")
    exp = store.create_experiment("exp", {"space": {"x": {"type": "int", "lower": 0,
                                                          "upper": 9}}})
    for n in range(5):
        tid = store.add_trial(exp.id, n, {"x": n}, 0)
        store.claim_trial(tid, 1)
        for seq in (1, 2, 3):
            store.record_report(tid, seq, seq, n + seq / 10, n + seq / 10,
                                json.dumps({"acc": n + seq / 10, "epoch": seq}),
                                Decision.CONTINUE)
        store.finish_trial(tid, TrialState.COMPLETED)
    store.close()
    paged = ("import sys, tuned.cli as c; c.EXPORT_PAGE = 2; sys.argv[0] = 'x'; "
             "c.tuned_main()")
    for extra in ((), ("--reports",)):
        args = ("export", "--db", str(tmp_path / "p.db"), *extra, "exp")
        whole = _run("tuned", *args)
        pages = subprocess.run([sys.executable, "-c", paged, *args], capture_output=True,
                               text=True, timeout=60)
        assert whole.returncode == pages.returncode == 0, pages.stderr
        assert pages.stdout == whole.stdout
        assert len(whole.stdout.splitlines()) == 1 + (15 if extra else 5)


def test_experiment_names_complete_from_the_store(db):
    out = _run("tuned", env={"_TUNED_COMPLETE": "bash_complete",
                             "COMP_WORDS": f"tuned best --db {db} e", "COMP_CWORD": "4"})
    assert out.stdout.split() == ["plain,exp"]


def test_tunectl_says_no_daemon(tmp_path):
    out = _run("tunectl", "--socket", str(tmp_path / "none.sock"), "status")
    assert out.returncode == 3 and "no tuned daemon" in out.stderr
    out = _run("tunectl", "--socket", str(tmp_path / "none.sock"), "status", "--json")
    assert out.returncode == 3 and json.loads(out.stdout)["error"]["code"] == "no_daemon"


def test_tunectl_loads_the_client_only(tmp_path):
    """tunectl starts once per command: it must not load the daemon's side (the server's
    transport and logging, the store, numpy), which would cost every command."""
    code = ("import sys\nfrom tuned.cli import tunectl_main\nsys.argv[0] = 'x'\n"
            "try:\n    tunectl_main()\nexcept SystemExit:\n    pass\n"
            "print(' '.join(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code, "--socket", str(tmp_path / "none.sock"),
                          "status"], capture_output=True, text=True, timeout=60)
    loaded = set(out.stdout.split())
    assert "tuned.daemon.client" in loaded, out.stderr
    assert not loaded & {"tuned.daemon.control", "tuned.store.database", "tuned.daemon.daemon",
                         "logging", "selectors", "numpy", "sqlite3"}
