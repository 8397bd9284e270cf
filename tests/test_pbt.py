"""Population based training: the pure scheduler, and whole runs whose clones continue from
their parents' checkpoints."""

from __future__ import annotations

import json
import math
import sqlite3
import subprocess
import sys

import numpy as np
import pytest

import tuned as ag
from tuned.core.decisions import Decision
from tuned.core.schedulers.pbt import PopulationBasedTraining
from tuned.core.space import Bool, Categorical, Int, Real, Space

SPACE = Space({"lr": Real(1e-3, 1, log=True), "layers": Int(1, 4),
               "act": Categorical("relu", "tanh", "gelu"), "bn": Bool()})


def _pbt(**kw):
    kw.setdefault("max_t", 20)
    kw.setdefault("perturbation_interval", 5)
    return PopulationBasedTraining(SPACE, **kw)


def test_the_bottom_quantile_is_replaced_by_a_clone_of_a_top_trial():
    pbt = _pbt(quantile_fraction=0.25, resample_probability=0.0, seed=1)
    config = {"lr": 0.1, "layers": 2, "act": "tanh", "bn": True}
    for t in range(8):
        pbt.on_trial_add(t, {**config, "lr": 0.01 * (t + 1)})
    assert pbt.on_report(0, 0, 4, 0.1).decision is Decision.CONTINUE  # before a boundary
    for t in range(1, 8):
        out = pbt.on_report(t, 0, 5, float(t))
        assert out.decision is Decision.CONTINUE and out.clone is None
    out = pbt.on_report(0, 0, 5, 0.0)  # the worst of 8: bottom 2
    assert out.decision is Decision.STOP and out.rungs[0].decision is Decision.STOP
    assert out.clone.source in (6, 7)  # the top 2
    parent = {**config, "lr": 0.01 * (out.clone.source + 1)}
    changed = out.clone.config
    assert changed["lr"] == pytest.approx(parent["lr"] * 0.8) or \
        changed["lr"] == pytest.approx(parent["lr"] * 1.2)
    assert changed["layers"] in (1, 3) and changed["act"] in ("relu", "gelu")
    assert changed["bn"] is True
    assert pbt.on_report(7, 0, 6, 9.0).decision is Decision.CONTINUE  # same boundary again
    assert pbt.on_report(7, 0, 20, 9.0).completed


def test_explore_stays_in_the_space_and_resamples():
    pbt = _pbt(resample_probability=1.0)
    rng = np.random.default_rng(0)
    for _ in range(50):
        new = pbt.explore({"lr": 1.0, "layers": 4, "act": "gelu", "bn": False}, rng)
        assert all(SPACE[k].contains(v) for k, v in new.items())
    edge = _pbt(resample_probability=0.0)
    assert edge.explore({"lr": 1.0, "layers": 4, "act": "gelu", "bn": False},
                        np.random.default_rng(3))["lr"] <= 1.0


@pytest.mark.parametrize("kwargs, name", [
    ({"perturbation_interval": 0}, "perturbation_interval"),
    ({"perturbation_interval": 30}, "perturbation_interval"),
    ({"quantile_fraction": 0.7}, "quantile_fraction"),
    ({"resample_probability": -1}, "resample_probability"),
    ({"max_t": "x"}, "max_t"),
])
def test_bad_options_are_named(kwargs, name):
    with pytest.raises(ValueError, match=name):
        _pbt(**kwargs)


def test_replayed_from_its_records_it_decides_as_the_original():
    live, stored = _pbt(seed=4), []
    configs = {t: {"lr": 0.01 * (t + 1), "layers": 1, "act": "relu", "bn": False}
               for t in range(6)}
    for t, c in configs.items():
        live.on_trial_add(t, c)
    rng = np.random.default_rng(9)
    for step in range(1, 4):
        for t in range(6):
            out = live.on_report(t, 0, 5 * step, float(rng.random()))
            stored += out.rungs
            if out.clone is not None:
                live.on_trial_end(t)
    replay = _pbt(seed=4)
    replay.load_rungs(stored)
    for t, c in configs.items():
        replay.on_trial_add(t, c)
    for t in range(6):
        a, b = live.on_report(t, 0, 20 - 1e-9 + 5, 0.5), replay.on_report(t, 0, 25, 0.5)
        assert (a.decision, a.clone) == (b.decision, b.clone)


@ag.args(lr=ag.space.Real(1e-3, 1, log=True), epochs=30)
def drifting_fn(args, reporter):
    """Accuracy accumulates per epoch; the best learning rate drops after epoch 15."""
    state = reporter.load_checkpoint() or {"epoch": 0, "acc": 0.0}
    for epoch in range(state["epoch"] + 1, args.epochs + 1):
        target = 0.3 if epoch < 15 else 0.01
        state["acc"] += 0.1 * math.exp(-abs(math.log10(args.lr) - math.log10(target)))
        reporter(epoch=epoch, accuracy=state["acc"])
        state["epoch"] = epoch
        reporter.save_checkpoint(state)


def test_clones_continue_from_their_parents_checkpoints(tmp_path):
    s = ag.scheduler.PBTScheduler(drifting_fn, perturbation_interval=5, num_trials=8,
                                  resource={"num_cpus": 0.25, "num_gpus": 0},
                                  checkpoint=str(tmp_path / "t.db"), seed=3)
    s.run()
    trials = {t.number: t for t in s.trials()}
    clones = [t for t in trials.values() if t.parent is not None]
    assert clones and {t.state for t in trials.values()} <= {"COMPLETED", "STOPPED"}
    with sqlite3.connect(tmp_path / "t.db") as c:

        def lineage_reward(trial, seq):
            """The reward stored at `seq` by `trial` or, when it has none there (a clone
            copied before it made that report: a clone of a clone that had not reported
            yet), by the nearest ancestor that made it."""
            while trial is not None:
                row = c.execute("SELECT reward FROM reports WHERE trial_id = ? AND seq = ?",
                                (trial.id, seq)).fetchone()
                if row is not None:
                    return row[0]
                trial = trials.get(trial.parent) if trial.parent is not None else None
            return None

        for clone in clones:
            first_seq, first = c.execute(
                "SELECT seq, reward FROM reports WHERE trial_id = ? ORDER BY seq LIMIT 1",
                (clone.id,)).fetchone()
            before = lineage_reward(trials[clone.parent], first_seq - 1)
            # It went on from its lineage's state at that epoch, not from scratch.
            assert first_seq > 1 and before is not None and first > before
    code = "import sys; from tuned.cli import tuned_main; sys.argv[0] = 'tuned'; tuned_main()"
    out = subprocess.run([sys.executable, "-c", code, "trials", "--db", str(tmp_path / "t.db"),
                          "--json", s.experiment.name], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    shown = {r["trial"]: r["parent"] for r in json.loads(out.stdout)["trials"]}
    assert {n for n, p in shown.items() if p is not None} == {t.number for t in clones}
