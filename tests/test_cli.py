"""The `tuned` and `tunectl` command lines, run as real processes on a real store."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tuned.decisions import Decision, TrialState
from tuned.store import Store


def _run(*args: str) -> subprocess.CompletedProcess:
    code = "import sys; from tuned.cli import {0}; sys.argv[0] = 'x'; {0}()"
    entry = "tunectl_main" if args[0] == "tunectl" else "tuned_main"
    return subprocess.run([sys.executable, "-c", code.format(entry), *args[1:]],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "t.db"
    store = Store(path)
    exp = store.create_experiment("exp", {})
    for n, reward in enumerate([0.2, 0.8]):
        tid = store.add_trial(exp.id, n, {"x": n}, 0)
        store.claim_trial(tid, 1)
        store.record_report(tid, 1, 1, reward, reward, json.dumps({"acc": reward}),
                            Decision.CONTINUE)
        store.finish_trial(tid, TrialState.COMPLETED)
    store.close()
    return str(path)


def test_best_json(db):
    out = _run("tuned", "best", "--db", db, "--json", "exp")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"experiment": "exp", "trial": 1, "config": {"x": 1},
                                      "reward": 0.8}


def test_experiments_and_trials(db):
    out = _run("tuned", "experiments", "--db", db, "--json")
    assert json.loads(out.stdout)[0]["trials"] == {"COMPLETED": 2}
    out = _run("tuned", "trials", "--db", db, "exp")
    assert out.returncode == 0 and "COMPLETED" in out.stdout and '{"x": 1}' in out.stdout
    assert out.stderr == ""  # every trial fits the default page
    out = _run("tuned", "trials", "--db", db, "--limit", "1", "exp")
    assert out.returncode == 0 and '{"x": 1}' in out.stdout and '{"x": 0}' not in out.stdout
    assert "1 of 2 trials shown: positions 1-1" in out.stderr
    out = _run("tuned", "trials", "--db", db, "--json", "--all", "exp")
    assert [t["trial"] for t in json.loads(out.stdout)] == [0, 1]


def test_unknown_experiment_exits_4(db):
    out = _run("tuned", "best", "--db", db, "nope")
    assert out.returncode == 4 and "'nope'" in out.stderr


def test_usage_error_exits_2(db):
    assert _run("tuned", "best", "--db", db).returncode == 2


def test_tunectl_says_no_daemon(tmp_path):
    out = _run("tunectl", "--socket", str(tmp_path / "none.sock"), "status")
    assert out.returncode == 3 and "no tuned daemon" in out.stderr


def test_tunectl_loads_the_client_only(tmp_path):
    """tunectl starts once per command: it must not load the daemon's side (the server's
    transport and logging, the store, numpy), which would cost every command."""
    code = ("import sys\nfrom tuned.cli import tunectl_main\nsys.argv[0] = 'x'\n"
            "try:\n    tunectl_main()\nexcept SystemExit:\n    pass\n"
            "print(' '.join(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code, "--socket", str(tmp_path / "none.sock"),
                          "status"], capture_output=True, text=True, timeout=60)
    loaded = set(out.stdout.split())
    assert "tuned.client" in loaded, out.stderr
    assert not loaded & {"tuned.control", "tuned.store", "tuned.daemon", "logging",
                         "selectors", "numpy", "sqlite3"}
