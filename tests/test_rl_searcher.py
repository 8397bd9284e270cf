"""The RL searcher: options, valid suggestions, determinism and resume, learning, gradients."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tuned.core.searchers.base import SearcherStateError
from tuned.core.searchers.rl import RLSearcher, init_params, log_prob_and_grad, param_names
from tuned.core.space import Bool, Categorical, Int, Real, Space


def mixed_space() -> Space:
    return Space({
        "lr": Real(1e-4, 1e-1, log=True),
        "momentum": Real(0.5, 0.99),
        "layers": Int(1, 4),
        "width": Int(8, 1024, log=True),
        "batch": Int(0, 999),
        "nesterov": Bool(),
        "act": Categorical("relu", "tanh", None, 3, 0.5),
    })


def reward(config: dict) -> float:
    """A deterministic score of a mixed-space configuration."""
    return (-abs(math.log10(config["lr"]) + 2) + config["momentum"] + config["layers"] / 4
            + (config["act"] == "tanh") + 0.1 * config["nesterov"])


def run(searcher: RLSearcher, start: int, stop: int, flight: list) -> list[dict]:
    """Trials start..stop-1 with two in flight: suggest, then report the oldest."""
    configs = []
    for trial_id in range(start, stop):
        config = searcher.suggest(trial_id)
        configs.append(config)
        flight.append((trial_id, config))
        if len(flight) > 1:
            done_id, done = flight.pop(0)
            score = None if done_id % 7 == 3 else reward(done)  # some trials fail
            searcher.observe(done_id, done, score, final=True)
    return configs


# --- options -------------------------------------------------------------------------------


@pytest.mark.parametrize("option, value", [
    ("controller_batch_size", 0), ("controller_batch_size", 2.0),
    ("controller_batch_size", True), ("controller_lr", 0), ("controller_lr", -1e-3),
    ("controller_lr", float("nan")), ("controller_lr", "fast"), ("ema_baseline_decay", 1.0),
    ("ema_baseline_decay", -0.1), ("hidden_size", 0), ("real_bins", 1),
])
def test_bad_options_raise_naming_the_option(option, value):
    with pytest.raises(ValueError, match=option):
        RLSearcher(mixed_space(), seed=0, **{option: value})


# --- suggestions ---------------------------------------------------------------------------


def test_suggestions_are_valid_native_configs():
    space = mixed_space()
    searcher = RLSearcher(space, seed=1, real_bins=8)
    configs = run(searcher, 0, 120, [])
    for config in configs:
        assert list(config) == list(space)
        assert space.validate(config) == config
        assert type(config["lr"]) is float and type(config["momentum"]) is float
        assert type(config["layers"]) is int and type(config["batch"]) is int
        assert type(config["nesterov"]) is bool
    lrs = {c["lr"] for c in configs}
    assert lrs <= set(space["lr"].grid(8)) and len(lrs) > 4
    assert {c["layers"] for c in configs} == {1, 2, 3, 4}
    assert len({c["batch"] for c in configs}) <= 8


def test_actions_discretise_each_domain():
    searcher = RLSearcher(mixed_space(), seed=0, real_bins=8)
    lr, momentum, layers, width, batch, nesterov, act = searcher.values
    assert lr[0] == pytest.approx(1e-4) and lr[-1] == pytest.approx(1e-1) and len(lr) == 8
    assert lr[1] / lr[0] == pytest.approx(lr[-1] / lr[-2])  # log spacing
    assert layers == [1, 2, 3, 4]
    assert len(batch) == 8 and len(width) <= 8
    assert nesterov == [False, True] and act == ["relu", "tanh", None, 3, 0.5]


def test_empty_space_suggests_empty_configs():
    searcher = RLSearcher(Space({}), seed=0, controller_batch_size=2)
    for trial_id in range(4):
        assert searcher.suggest(trial_id) == {}
        searcher.observe(trial_id, {}, 1.0)


# --- determinism and resume ----------------------------------------------------------------


def test_same_seed_same_suggestions():
    a = run(RLSearcher(mixed_space(), seed=5, controller_batch_size=3), 0, 60, [])
    b = run(RLSearcher(mixed_space(), seed=5, controller_batch_size=3), 0, 60, [])
    c = run(RLSearcher(mixed_space(), seed=6, controller_batch_size=3), 0, 60, [])
    assert a == b and a != c


def assert_same_state(x: RLSearcher, y: RLSearcher) -> None:
    for name in x.params:
        assert np.array_equal(x.params[name], y.params[name]), name
        assert np.array_equal(x.adam_m[name], y.adam_m[name]), name
        assert np.array_equal(x.adam_v[name], y.adam_v[name]), name
    assert (x.adam_step, x.baseline, x.pending, x.batch) == (y.adam_step, y.baseline,
                                                              y.pending, y.batch)
    assert json.dumps(x.state_dict()) == json.dumps(y.state_dict())


def test_save_and_load_mid_run_continues_exactly():
    options = {"controller_batch_size": 4, "controller_lr": 5e-3, "real_bins": 6}
    whole = RLSearcher(mixed_space(), seed=11, **options)
    flight_whole: list = []
    run(whole, 0, 41, flight_whole)

    first = RLSearcher(mixed_space(), seed=11, **options)
    flight: list = []
    run(first, 0, 22, flight)
    assert first.pending and first.batch and first.adam_step > 0  # a state worth saving
    resumed = RLSearcher(mixed_space(), seed=None, **options)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert_same_state(first, resumed)
    later = run(resumed, 22, 41, flight)

    fresh: list = []
    assert later == run(RLSearcher(mixed_space(), seed=11, **options), 0, 41, fresh)[22:]
    assert resumed.adam_step > first.adam_step
    assert_same_state(whole, resumed)


def test_state_is_versioned_json():
    searcher = RLSearcher(mixed_space(), seed=0)
    state = json.loads(json.dumps(searcher.state_dict()))
    assert state["v"] == 1 and state["kind"] == "rl"


def test_load_rejects_other_kinds_and_shapes():
    searcher = RLSearcher(mixed_space(), seed=0)
    before = json.dumps(searcher.state_dict())
    with pytest.raises(SearcherStateError):
        searcher.load_state_dict({"v": 1, "kind": "random", "rng": {}})
    with pytest.raises(SearcherStateError):
        searcher.load_state_dict(RLSearcher(mixed_space(), seed=0, hidden_size=7).state_dict())
    other = RLSearcher(mixed_space(), seed=0).state_dict()
    other["params"]["W"]["shape"] = [2, 2]
    with pytest.raises(SearcherStateError, match="W"):
        searcher.load_state_dict(other)
    assert json.dumps(searcher.state_dict()) == before


# --- what is learned from ------------------------------------------------------------------


def test_only_final_scored_suggestions_are_learned():
    searcher = RLSearcher(mixed_space(), seed=0, controller_batch_size=2)
    config = searcher.suggest(1)
    searcher.observe(1, config, 0.5, final=False)  # intermediate: kept pending
    searcher.observe(99, config, 0.5)  # never suggested: ignored
    assert list(searcher.pending) == [1] and searcher.batch == []
    searcher.observe(1, config, None)  # failed: forgotten, not learned
    assert searcher.pending == {} and searcher.batch == []
    searcher.observe(2, searcher.suggest(2), float("nan"))  # not a number: not learned
    searcher.observe(3, searcher.suggest(3), 1.0)
    searcher.observe(3, config, 2.0)  # already learned from: ignored
    assert searcher.adam_step == 0 and len(searcher.batch) == 1
    searcher.observe(4, searcher.suggest(4), 0.0)  # the batch of 2 is full: one update
    assert searcher.adam_step == 1 and searcher.batch == [] and searcher.pending == {}
    assert searcher.baseline == pytest.approx(0.95)  # the first score, 1.0, then 0.0


def test_learns_the_paying_choice():
    space = Space({"c": Categorical(*range(10))})
    searcher = RLSearcher(space, seed=3, controller_batch_size=4, controller_lr=5e-3)
    picks = []
    for trial_id in range(200):
        config = searcher.suggest(trial_id)
        picks.append(config["c"] == 7)
        searcher.observe(trial_id, config, 1.0 if config["c"] == 7 else 0.0)
    assert searcher.greedy_policy()[0][7] > 0.8  # 0.97 and more for 30 seeds tried
    assert sum(picks[-50:]) > 35


# --- the gradient --------------------------------------------------------------------------


def test_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    n_actions = [3, 4, 2]
    params = {k: v * 20 for k, v in init_params(n_actions, 5, rng).items()}  # not linear
    for name in ("b", "c0", "c1", "c2"):
        params[name] = rng.normal(size=params[name].shape)
    actions = np.array([[0, 3, 1], [2, 1, 0], [2, 3, 1]])
    weights = np.array([0.7, -1.3, 0.4])
    _, grads = log_prob_and_grad(params, actions, weights)
    assert set(grads) == set(param_names(n_actions))

    def objective() -> float:
        return float(weights @ log_prob_and_grad(params, actions, weights)[0])

    eps = 1e-6
    for name, value in params.items():
        numeric = np.zeros_like(value)
        for index in np.ndindex(value.shape):
            saved = value[index]
            value[index] = saved + eps
            up = objective()
            value[index] = saved - eps
            down = objective()
            value[index] = saved
            numeric[index] = (up - down) / (2 * eps)
        np.testing.assert_allclose(grads[name], numeric, rtol=1e-5, atol=1e-7, err_msg=name)
