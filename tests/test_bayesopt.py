"""The Bayesian optimisation searcher and its Gaussian process.

GP: the posterior and the marginal likelihood against direct formulas, the gradient against
finite differences, the fit, EI. Searcher: options, quality against random search, pending
trials, finite spaces, the multi-fidelity path, state (round trip, two processes, chunking).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_searchers import MIXED  # the mixed space every searcher is tested on

from tuned.core.searchers import SearcherStateError, gp, make_searcher
from tuned.core.searchers.bayesopt import CHUNK, BayesOptSearcher, Encoder
from tuned.core.searchers.random import RandomSearcher, config_key
from tuned.core.space import Bool, Categorical, Int, Real, Space

ROOT = Path(__file__).resolve().parent.parent

BRANIN = Space({"x": Real(-5.0, 10.0), "y": Real(0.0, 15.0)})
BRANIN_MIN = 0.397887


def branin(config: dict[str, Any]) -> float:
    """Branin's function, negated (scores are higher-is-better); the maximum is -0.397887."""
    x, y = config["x"], config["y"]
    b, c, t = 5.1 / (4 * math.pi ** 2), 5 / math.pi, 1 / (8 * math.pi)
    return -((y - b * x * x + c * x - 6) ** 2 + 10 * (1 - t) * math.cos(x) + 10)


def mixed_score(config: dict[str, Any]) -> float:
    """A smooth deterministic score on MIXED."""
    return (-(math.log10(config["lr"]) + 2.5) ** 2 - (config["momentum"] - 0.9) ** 2
            - 0.1 * abs(config["layers"] - 3) + 0.5 * (config["act"] == "tanh")
            + 0.2 * config["bn"] - 0.05 * abs(math.log2(config["width"]) - 7))


def curve(config: dict[str, Any], t: float) -> float:
    """A learning curve on MIXED: rises with t towards `mixed_score`."""
    return mixed_score(config) - 2.0 / (1.0 + t)


def run(searcher: Any, n: int, start: int = 0, score=mixed_score) -> list[dict | None]:
    """Suggest `n` configurations one at a time, observing each one's final score."""
    out = []
    for trial_id in range(start, start + n):
        config = searcher.suggest(trial_id)
        out.append(config)
        if config is not None:
            searcher.observe(trial_id, config, score(config), True)
    return out


def run_multi(searcher: BayesOptSearcher, n: int, start: int = 0,
              flight: list | None = None) -> list[dict | None]:
    """Trials with two in flight: each reports at t = 1, 2, 3 and stops there, except every
    third one, which goes on to t = 9 (a crude successive halving)."""
    flight = [] if flight is None else flight
    out = []
    for trial_id in range(start, start + n):
        config = searcher.suggest(trial_id)
        out.append(config)
        flight.append((trial_id, config))
        if len(flight) > 1:
            done_id, done = flight.pop(0)
            last = 9 if done_id % 3 == 0 else 3
            for t in range(1, last + 1):
                searcher.observe(done_id, done, curve(done, t), final=False, time=t)
            searcher.observe(done_id, done, curve(done, last), final=True)
    return out


# --- the Gaussian process -------------------------------------------------------------------


def matern52(a: np.ndarray, b: np.ndarray, ls: np.ndarray, signal: float) -> float:
    r = math.sqrt(sum(((a - b) / ls) ** 2))
    return signal * (1 + math.sqrt(5) * r + 5 * r * r / 3) * math.exp(-math.sqrt(5) * r)


def test_kernel_matches_the_matern_formula() -> None:
    rng = np.random.default_rng(0)
    x1, x2 = rng.random((4, 3)), rng.random((5, 3))
    ls, signal, noise = np.array([0.3, 1.5, 0.7]), 2.0, 0.1
    theta = np.log(np.concatenate([ls, [signal, noise]]))
    expected = [[matern52(a, b, ls, signal) for b in x2] for a in x1]
    assert np.allclose(gp.kernel(x1, x2, theta), expected, rtol=1e-12, atol=1e-14)


def test_posterior_matches_the_direct_formula() -> None:
    x = np.array([[0.1], [0.4], [0.9]])
    y = np.array([0.5, -1.0, 2.0])
    ls, signal, noise = np.array([0.3]), 1.3, 0.05
    theta = np.log(np.concatenate([ls, [signal, noise]]))
    k = np.array([[matern52(a, b, ls, signal) for b in x] for a in x]) + noise * np.eye(3)
    post = gp.Posterior(x, y, theta)
    xs = np.array([[0.0], [0.4], [0.65]])
    mean, var = post.predict(xs)
    for i, p in enumerate(xs):
        ks = np.array([matern52(p, b, ls, signal) for b in x])
        assert mean[i] == pytest.approx(ks @ np.linalg.solve(k, y), rel=1e-9)
        assert var[i] == pytest.approx(signal - ks @ np.linalg.solve(k, ks), rel=1e-9)


def test_pending_conditioning_equals_adding_the_data() -> None:
    rng = np.random.default_rng(1)
    x, y = rng.random((6, 2)), rng.standard_normal(6)
    theta = np.log([0.4, 0.6, 1.0, 0.01])
    pending, values = rng.random((2, 2)), np.array([-1.0, 0.3])
    xs = rng.random((5, 2))
    post = gp.Posterior(x, y, theta)
    post.with_pending(pending, values)
    direct = gp.Posterior(np.vstack([x, pending]), np.concatenate([y, values]), theta)
    for got, want in zip(post.predict(xs), direct.predict(xs), strict=True):
        assert np.allclose(got, want, rtol=1e-7, atol=1e-9)


def test_negative_log_likelihood_matches_the_direct_formula() -> None:
    rng = np.random.default_rng(2)
    x, y = rng.random((7, 2)), rng.standard_normal(7)
    theta = np.log([0.5, 2.0, 1.5, 0.1])
    ls, signal, noise = np.exp(theta[:2]), math.exp(theta[2]), math.exp(theta[3])
    k = np.array([[matern52(a, b, ls, signal) for b in x] for a in x]) + noise * np.eye(7)
    direct = 0.5 * (y @ np.linalg.solve(k, y) + np.linalg.slogdet(k)[1] + 7 * math.log(2 * math.pi))
    assert gp.neg_log_posterior(theta, x, y, prior=False)[0] == pytest.approx(direct, rel=1e-10)


@pytest.mark.parametrize("prior", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradient_matches_finite_differences(prior: bool, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, dim = 12, 3
    x = rng.random((n, dim))
    y = np.sin(5 * x[:, 0]) + x[:, 1] + 0.1 * rng.standard_normal(n)
    theta = np.concatenate([rng.normal(-1.0, 0.7, dim), [rng.normal(0, 0.5), math.log(0.02)]])
    _, grad = gp.neg_log_posterior(theta, x, y, prior=prior)
    h = 1e-6
    numeric = np.array([
        (gp.neg_log_posterior(theta + h * e, x, y, prior=prior)[0]
         - gp.neg_log_posterior(theta - h * e, x, y, prior=prior)[0]) / (2 * h)
        for e in np.eye(dim + 2)])
    assert np.allclose(grad, numeric, rtol=1e-5, atol=1e-5)


def test_fit_lowers_the_objective_and_stays_in_bounds() -> None:
    rng = np.random.default_rng(3)
    x = rng.random((40, 2))
    y = np.sin(6 * x[:, 0])  # the second input is irrelevant
    y = (y - y.mean()) / y.std()
    start = gp.default_theta(2)
    theta = gp.fit_theta(x, y, [start])
    lo, hi = gp.bounds(2)
    assert np.all(theta >= lo) and np.all(theta <= hi)
    assert gp.neg_log_posterior(theta, x, y)[0] < gp.neg_log_posterior(start, x, y)[0] - 10
    assert theta[1] > theta[0] + 1  # the irrelevant input gets the longer length scale


def test_lbfgs_minimises_a_quadratic() -> None:
    a = np.diag([1.0, 10.0, 100.0])

    def fun(u: np.ndarray) -> tuple[float, np.ndarray]:
        d = u - 1.0
        return 0.5 * float(d @ a @ d), a @ d

    u, f = gp.lbfgs(fun, np.zeros(3), max_iter=100, gtol=1e-8, ftol=0.0)
    assert np.allclose(u, 1.0, atol=1e-6) and f < 1e-10


def test_cholesky_survives_duplicate_points() -> None:
    x = np.array([[0.2, 0.2]] * 5 + [[0.8, 0.1]])
    y = np.array([1.0, 1.0, 1.0, 1.0, 1.0, -1.0])
    theta = np.log([0.5, 0.5, 1.0, 1e-6])
    mean, var = gp.Posterior(x, y, theta).predict(x)
    assert np.all(np.isfinite(mean)) and np.all(var > 0)
    assert mean[0] == pytest.approx(1.0, abs=1e-3)


def test_normal_cdf_and_log_ei_match_direct_formulas() -> None:
    z = np.linspace(-8, 8, 161)
    exact = np.array([0.5 * math.erfc(-v / math.sqrt(2)) for v in z])
    assert np.allclose(gp.normal_cdf(z), exact, rtol=2e-7, atol=1e-300)
    mean, var, best = np.linspace(-3, 3, 61), np.full(61, 0.64), 0.5
    sd = 0.8
    zz = (mean - best) / sd
    pdf = np.exp(-0.5 * zz * zz) / math.sqrt(2 * math.pi)
    cdf = np.array([0.5 * math.erfc(-v / math.sqrt(2)) for v in zz])
    direct = sd * (pdf + zz * cdf)
    assert np.allclose(np.exp(gp.log_expected_improvement(mean, var, best)), direct, rtol=1e-5)


def test_log_ei_is_finite_and_ordered_far_in_the_tail() -> None:
    mean = -np.array([1.0, 5.0, 20.0, 30.0, 100.0, 1e4])
    log_ei = gp.log_expected_improvement(mean, np.ones_like(mean), 0.0)
    assert np.all(np.isfinite(log_ei))
    assert np.all(np.diff(log_ei) < 0)
    # log h(z) ~ log phi(z) - 2 log|z| for large |z|
    assert log_ei[3] == pytest.approx(-450 - 0.5 * math.log(2 * math.pi) - 2 * math.log(30),
                                      abs=0.01)


# --- encoding --------------------------------------------------------------------------------


def test_encoder_one_hot_round_trip() -> None:
    enc = Encoder(MIXED)
    assert enc.dim == 4 + 3 + 2
    rng = np.random.default_rng(0)
    for _ in range(50):
        config = MIXED.sample(rng)
        x = enc.encode(config)
        assert enc.decode(x) == config
        assert x[4:7].sum() == 1.0 and x[7:].sum() == 1.0
        assert np.allclose(enc.snap(x[None].copy())[0], x)
    points = enc.sample(rng, 100)
    assert np.all((points >= 0) & (points <= 1))
    assert np.all(points[:, 4:7].sum(1) == 1) and np.all(points[:, 7:].sum(1) == 1)
    # ints are snapped to the centre of the value they decode to
    for p in np.vstack([points, enc.perturb(rng, points[:5], 50, (0.01, 0.3))]):
        assert np.allclose(enc.encode(enc.decode(p)), p)


# --- options -------------------------------------------------------------------------------


@pytest.mark.parametrize("option, value", [
    ("num_init", 0), ("num_init", 2.5), ("num_init", True), ("max_t", 0), ("max_t", -3),
    ("max_t", float("nan")), ("max_t", "52"), ("fidelity", "both"), ("candidates", 5),
    ("candidates", "many"), ("refit_every", 0), ("max_points", 3), ("max_points", None),
])
def test_bad_options_raise_naming_the_option(option: str, value: Any) -> None:
    with pytest.raises(ValueError, match=option):
        make_searcher("bayesopt", MIXED, seed=0, **{option: value})


def test_multi_fidelity_needs_max_t() -> None:
    with pytest.raises(ValueError, match="max_t"):
        BayesOptSearcher(MIXED, fidelity="multi")
    assert BayesOptSearcher(MIXED, fidelity="multi", max_t=10).multi
    assert BayesOptSearcher(MIXED, max_t=10).multi  # "auto"
    assert not BayesOptSearcher(MIXED, max_t=10, fidelity="none").multi
    assert not BayesOptSearcher(MIXED).wants_reports


def test_unknown_option_is_named() -> None:
    with pytest.raises(ValueError, match="bogus_option"):
        make_searcher("bayesopt", MIXED, seed=0, bogus_option=1)


# --- behaviour -----------------------------------------------------------------------------


def test_first_suggestions_are_the_default_then_random() -> None:
    searcher = BayesOptSearcher(MIXED, seed=0, num_init=3)
    first = run(searcher, 3)
    assert first[0] == MIXED.default()
    assert len({config_key(c) for c in first}) == 3
    for config in run(searcher, 10, start=3):
        assert config is not None and MIXED.validate(config) == config


def test_beats_random_search_on_branin() -> None:
    regrets = {"bayesopt": [], "random": []}
    for seed in range(5):
        for name in regrets:
            searcher = make_searcher(name, BRANIN, seed=seed)
            best = max(branin(c) for c in run(searcher, 25, score=branin))
            regrets[name].append(-best - BRANIN_MIN)
    bo, rs = np.array(regrets["bayesopt"]), np.array(regrets["random"])
    assert np.median(bo) < 0.1 * np.median(rs), regrets
    assert np.all(bo < 0.5), regrets
    assert np.mean(bo < rs) >= 0.8, regrets


def test_pending_trials_push_suggestions_apart() -> None:
    space = Space({"x": Real(0, 1), "y": Real(0, 1)})

    def bowl(c: dict[str, Any]) -> float:
        return -((c["x"] - 0.3) ** 2 + (c["y"] - 0.7) ** 2)

    for seed in range(3):
        searcher = BayesOptSearcher(space, seed=seed, num_init=5)
        run(searcher, 12, score=bowl)
        points = [space.to_unit(searcher.suggest(100 + j)) for j in range(4)]
        gaps = [np.linalg.norm(a - b) for i, a in enumerate(points) for b in points[i + 1:]]
        assert min(gaps) > 0.05, (seed, points)


def test_failed_trials_are_not_suggested_again_and_do_not_break_the_model() -> None:
    searcher = BayesOptSearcher(MIXED, seed=1, num_init=4)
    seen = set()
    for trial_id in range(20):
        config = searcher.suggest(trial_id)
        assert config_key(config) not in seen
        seen.add(config_key(config))
        score = None if trial_id % 3 == 0 else mixed_score(config)
        searcher.observe(trial_id, config, score, final=True)
    searcher.observe(99, MIXED.default(), float("nan"), final=True)  # not finite: a failure
    assert searcher.suggest(20) is not None


@pytest.mark.parametrize("seed", [0, 1])
def test_small_finite_space_has_no_repeats_and_ends_with_none(seed: int) -> None:
    space = Space({"a": Int(0, 3), "b": Categorical("x", "y", 2), "c": Bool()})
    searcher = BayesOptSearcher(space, seed=seed, num_init=3)

    def score(c: dict[str, Any]) -> float:
        return c["a"] + (c["b"] == "y") - c["c"]

    configs = run(searcher, space.cardinality, score=score)
    keys = [config_key(c) for c in configs]
    assert len(set(keys)) == space.cardinality == 24
    assert searcher.suggest(100) is None and searcher.suggest(101) is None


def test_larger_finite_space_has_no_repeats() -> None:
    space = Space({"a": Int(0, 9), "b": Int(0, 4), "c": Bool()})  # 100 configurations
    searcher = BayesOptSearcher(space, seed=0, num_init=3, candidates=40, max_points=40)
    configs = run(searcher, 103, score=lambda c: -abs(c["a"] - 3) - abs(c["b"] - 2))
    assert configs[100:] == [None] * 3
    assert len({config_key(c) for c in configs[:100]}) == 100


def test_multi_fidelity_uses_reports() -> None:
    searcher = BayesOptSearcher(MIXED, seed=0, max_t=9, num_init=4)
    assert searcher.wants_reports
    run_multi(searcher, 30)
    data = searcher._data()
    assert data is not None and data.x.shape[1] == searcher.encoder.dim + 1
    # one point per trial and report bin; t = 9 reached by every third trial
    assert data.z_acq == pytest.approx(1.0)
    assert len(data.x) > 30
    assert searcher.theta is not None and len(searcher.theta) == searcher.encoder.dim + 3


def test_multi_fidelity_finds_better_configurations_than_random() -> None:
    wins = 0
    for seed in range(4):
        bo = BayesOptSearcher(MIXED, seed=seed, max_t=9)
        rs = RandomSearcher(MIXED, seed=seed)
        bo_best = max(mixed_score(c) for c in run_multi(bo, 30))
        rs_best = max(mixed_score(c) for c in run(rs, 30))
        wins += bo_best > rs_best
    assert wins >= 3


def test_reports_are_ignored_without_multi_fidelity() -> None:
    searcher = BayesOptSearcher(MIXED, seed=0)
    config = searcher.suggest(0)
    before = json.dumps(searcher.state_dict())
    searcher.observe(0, config, 0.5, final=False, time=1)
    assert json.dumps(searcher.state_dict()) == before


def test_observe_rejects_a_configuration_outside_the_space() -> None:
    searcher = BayesOptSearcher(MIXED, seed=0)
    with pytest.raises(ValueError, match="lr"):
        searcher.observe(0, {**MIXED.default(), "lr": 5.0}, 0.1, final=True)


def test_observing_an_unknown_trial_counts_it_as_seen() -> None:
    space = Space({"b": Bool()})
    searcher = BayesOptSearcher(space, seed=0)
    searcher.observe(7, {"b": False}, 1.0, final=True)
    assert searcher.suggest(0) == {"b": True}
    assert searcher.suggest(1) is None


# --- state -----------------------------------------------------------------------------------


def test_save_and_load_mid_run_changes_nothing() -> None:
    straight = run(BayesOptSearcher(MIXED, seed=3, num_init=4, refit_every=3), 24)
    first = BayesOptSearcher(MIXED, seed=3, num_init=4, refit_every=3)
    part_a = run(first, 12)
    second = BayesOptSearcher(MIXED, seed=999, num_init=4, refit_every=3)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    part_b = run(second, 12, start=12)
    assert json.dumps(part_a + part_b) == json.dumps(straight)


def test_save_and_load_mid_run_changes_nothing_in_multi_fidelity_mode() -> None:
    def make() -> BayesOptSearcher:
        return BayesOptSearcher(MIXED, seed=5, max_t=9, num_init=4, refit_every=4)

    straight = run_multi(make(), 20)
    first, flight = make(), []
    part_a = run_multi(first, 10, flight=flight)
    second = make()
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    part_b = run_multi(second, 10, start=10, flight=flight)  # the same trials in flight
    assert json.dumps(part_a + part_b) == json.dumps(straight)


def test_loading_rewinds_a_used_searcher() -> None:
    searcher = BayesOptSearcher(MIXED, seed=3, num_init=4)
    run(searcher, 10)
    saved = json.dumps(searcher.state_dict())
    later = run(searcher, 8, start=10)
    searcher.load_state_dict(json.loads(saved))
    assert json.dumps(run(searcher, 8, start=10)) == json.dumps(later)


CHILD = """
import json, sys
from tuned.core.searchers import make_searcher
from tuned.core.space import Space
sys.path.insert(0, sys.argv[3])
from test_bayesopt import run, run_multi

space = Space.from_json(json.loads(sys.argv[1]))
options = json.loads(sys.argv[2])
searcher = make_searcher("bayesopt", space, seed=7, **options)
out = run_multi(searcher, 16) if options.get("max_t") else run(searcher, 16)
print(json.dumps([out, searcher.state_dict()]))
"""


@pytest.mark.parametrize("options", [{"num_init": 4}, {"num_init": 4, "max_t": 9}])
def test_same_seed_same_suggestions_in_another_process(options: dict) -> None:
    searcher = make_searcher("bayesopt", MIXED, seed=7, **options)
    here = run_multi(searcher, 16) if options.get("max_t") else run(searcher, 16)
    child = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(MIXED.to_json()), json.dumps(options),
         str(ROOT / "tests")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr[-3000:]
    there, state = json.loads(child.stdout)
    assert json.dumps(there) == json.dumps(here)
    assert json.dumps(state) == json.dumps(searcher.state_dict())
    assert state["gp"]["theta"] is not None  # the model was used


def test_state_dict_is_versioned_json_with_rng_gp_and_log() -> None:
    searcher = BayesOptSearcher(MIXED, seed=1, num_init=3)
    run(searcher, 6)
    state = json.loads(json.dumps(searcher.state_dict()))
    assert state["kind"] == "bayesopt" and state["v"] == 1
    assert set(state) == {"v", "kind", "rng", "gp", "log.0"}
    assert len(state["gp"]["theta"]) == Encoder(MIXED).dim + 2
    assert [e[0] for e in state["log.0"]] == ["s", "f"] * 6


@pytest.mark.parametrize("change", [{"kind": "other"}, {"v": 999}])
def test_load_state_of_another_kind_or_version_raises(change: dict) -> None:
    state = {**BayesOptSearcher(MIXED, seed=1).state_dict(), **change}
    with pytest.raises(SearcherStateError):
        BayesOptSearcher(MIXED, seed=1).load_state_dict(state)


@pytest.mark.parametrize("corrupt", [
    {"gp": None}, {"gp": {"theta": [1.0], "fit_at": 0}}, {"log.0": [["x", 1]]},
    {"log.0": [["f", 12345, 1.0]]}, {"log.0": [["s", 0, {"lr": 7}]]}, {"rng": {}},
])
def test_corrupt_state_raises_and_changes_nothing(corrupt: dict) -> None:
    searcher = BayesOptSearcher(MIXED, seed=2, num_init=3)
    run(searcher, 5)
    good = json.dumps(searcher.state_dict())
    with pytest.raises(SearcherStateError):
        searcher.load_state_dict({**json.loads(good), **corrupt})
    assert json.dumps(searcher.state_dict()) == good
    twin = BayesOptSearcher(MIXED, seed=0, num_init=3)
    twin.load_state_dict(json.loads(good))
    assert json.dumps(run(searcher, 3, start=5)) == json.dumps(run(twin, 3, start=5))


def test_an_observation_changes_a_bounded_number_of_state_parts() -> None:
    searcher = BayesOptSearcher(MIXED, seed=0, max_t=50, num_init=3, candidates=50)
    previous = json.loads(json.dumps(searcher.state_dict()))
    changed_per_observe = []
    for trial_id in range(12):
        config = searcher.suggest(trial_id)
        previous = json.loads(json.dumps(searcher.state_dict()))
        for t in range(1, 51):
            searcher.observe(trial_id, config, curve(config, t), final=t == 50, time=t)
            state = json.loads(json.dumps(searcher.state_dict()))
            changed = {k for k in state if previous.get(k) != state[k]}
            changed_per_observe.append(len(changed))
            assert changed <= {f"log.{i}" for i in range(10)}
            previous = state
    state = searcher.state_dict()
    chunks = sorted(k for k in state if k.startswith("log."))
    assert len(chunks) == 12 * 51 // CHUNK + 1  # the log outgrew several chunks
    assert all(len(state[k]) == CHUNK for k in chunks[:-1])
    assert set(changed_per_observe) == {1}  # the last chunk (or a new one), nothing else


def test_a_multi_fidelity_state_does_not_load_without_max_t() -> None:
    searcher = BayesOptSearcher(MIXED, seed=0, max_t=9, num_init=10)
    run_multi(searcher, 5)  # random suggestions only: no hyperparameters yet, but reports
    assert searcher.theta is None
    with pytest.raises(SearcherStateError, match="max_t"):
        BayesOptSearcher(MIXED, seed=0).load_state_dict(searcher.state_dict())
    with pytest.raises(SearcherStateError, match="theta"):  # one input more than here
        BayesOptSearcher(MIXED, seed=0).load_state_dict(
            {**BayesOptSearcher(MIXED).state_dict(), "gp": {"theta": [0.0] * 12, "fit_at": 0}})
