"""Search quality: tuned's searchers and schedulers against Optuna, in simulated time.

    pip install -e '.[bench]'          # optuna (matplotlib for the plot: the `plot` extra)
    python benchmarks/search_quality.py --quick
    python benchmarks/search_quality.py [--problems lcbench,hartmann6] [--tasks 3945,7593]
        [--seeds 3] [--workers 4] [--methods NAME,...] [--rs-trials 100]
        [--fraction 0.25] [--jobs N] [--out DIR]

Every method runs with the same number of parallel workers (default 4) in the same virtual
time, and the budget is counted in epochs (one report = one epoch):

- tuned's methods run through the real Engine, searcher, scheduler and store (SQLite,
  ``durable=False``) on the simulated executor (`tuned.simulate`);
- Optuna's run through its ask-and-tell interface in an event loop of the same kind:
  `--workers` trials in flight, each epoch taking the same virtual seconds as in tuned's
  runs, ``trial.report`` then ``trial.should_prune`` after every epoch, a new trial asked for
  when one ends. Optuna keeps its study in memory (``InMemoryStorage``, the default of
  ``create_study`` without a storage), for speed; its TPE runs with its defaults
  (``constant_liar`` off).

Budgets: random search with FIFO gets ``--rs-trials`` (100) trials to their last epoch, the
*full budget* B (100 x 52 = 5200 epochs on lcbench); every method runs to B, and its
result is read at ``--fraction`` (a quarter, 1300 epochs) and at B. All these methods are
budget-oblivious (asynchronous successive halving, Hyperband and TPE never look at the total
budget), so the first 1300 epochs of a run to 5200 are exactly a run with 1300. A run stops
starting trials at its budget; the epochs its running trials still report are cut off.
``--until q`` runs every method but random-FIFO only to the quarter budget (a quarter of
the time; what the quality targets need): regret@B is then not measured ("-"), anytime
regret is over 1..q, and to-RS counts only what was reached by q.

Objectives (``--problems``):

- ``lcbench``: the tables in ../shared/data/lcbench/ (34 OpenML tasks, 1000 configurations,
  52 epochs; see its README). tuned's Space has the 7 hyperparameters with the README's
  ranges; a suggested configuration is snapped to the nearest of the 1000 (Euclidean, in the
  unit cube of that Space) that no other configuration of the run has taken (`TableRows`:
  every method samples the table without replacement; the same configuration again, as a
  promoted or resumed trial, trains its row again), and a trial reports its validation
  accuracy (percent) after each of the 52 epochs. An epoch takes the configuration's final
  cumulative training time / 52 virtual seconds (the surrogate's cumulative times are not
  monotone, so per-epoch differences can be negative). The optimum of a task is the best
  final-epoch accuracy among its 1000 configurations.
- ``hartmann6``: a synthetic multi-fidelity function over x in [0, 1]^6 with fidelity
  r = 1..R (R = 52 "epochs"). With h(x; alpha) the Hartmann-6 function (its standard A, P
  and alpha = (1, 1.2, 3, 3.2); minimum h* = -3.32237) and s = 1 - r / R::

      reward(x, r) = -(h(x; alpha + 0.5 s (0, 0, 1, -1)) - h*) - s^2 (1 + x_1) + 0.01 eps

  eps ~ N(0, 1) drawn from the trial's seed and r. At r = R the reward is -(h(x) - h*) plus
  noise: higher is better, 0 at the optimum (the optimum used for regret). At low fidelity the
  third mode of the function is favoured over the fourth (where the optimum lies) and
  configurations with a large x_1 learn late, so early ranks mislead somewhat. An epoch
  takes 1 + x_6 virtual seconds.

PBT's clones start from their parent's (virtual) checkpoint with a new configuration; the
step functions model that as the new configuration's own curve from the next epoch on (no
table holds "trained with one configuration, then another"), which flatters PBT on lcbench.

Metrics, per (problem, task, seed, method). A trial's value is its reward at the last epoch
it reported (as `best_trial` and a user see it, not its maximum over epochs); the incumbent
after b epochs is the best value among the trials, each at its last epoch reported by then
(it can go down when the best trial's next epoch is worse). Regret = optimum - incumbent
(it can be negative on lcbench, where an intermediate epoch may beat the best final one).

- regret@q and regret@B: regret after the quarter budget and after the full budget;
- anytime: the mean of the regret after each epoch 1..H (the area under the regret curve
  against epochs spent, divided by H), H = B, or q with ``--until q``;
- to-RS: the epochs a method needed to reach random-FIFO's final incumbent (same task and
  seed), or "n/r" (not reached within B);
- the table prints medians over tasks and seeds, and win-tie-loss counts of every tuned
  method against each Optuna baseline (on regret@q and on anytime regret) and against the
  better of Optuna's TPE baselines on each (task, seed) (on regret@q);
- a plot of the median regret against epochs spent (``DIR/regret_<problem>.png``, when
  matplotlib is installed), the runs (``DIR/runs.csv``) and the curves (``DIR/curves.npz``);
- how well the ranking after epoch 1 (and 3, 9, 27) predicts the ranking after the last
  epoch: the median over tasks of Spearman's rank correlation over the 1000 configurations.

Methods are named entries of `METHODS` (``tuned:<searcher>+<scheduler>`` or
``optuna:<sampler>+<pruner>``); those whose searcher or scheduler tuned does not have yet
(bayesopt, Hyperband promotion, PBT) are listed as not available until they exist.
``--methods seed-grid`` runs the original tutorial's settings (`SEED_GRID`: grace period 1
or 3 x Hyperband stopping or promotion x random or bayesopt) beside Optuna's two methods.
"""

from __future__ import annotations

import argparse
import csv
import heapq
import itertools
import math
import os
import platform
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

# One BLAS thread per run: the runs go in parallel processes, and a multi-threaded BLAS on a
# busy machine makes bayesopt's small linear algebra several times slower.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tuned.core.space import Int, Real, Space  # noqa: E402

LCBENCH = os.path.normpath(os.path.join(ROOT, "..", "shared", "data", "lcbench",
                                        "lcbench_tabular.npz"))
EPOCHS = 52
QUICK_TASKS = ("3945", "7593", "34539")

StepFunction = Callable[[dict[str, Any], int, int], Iterator[tuple[float, dict[str, Any]]]]


def trial_seed(seed: int, number: int) -> int:
    """A trial's seed, as tuned's engine derives it (`tuned.engine.engine.trial_seed`)."""
    return zlib.crc32(f"{seed}:{number}".encode())


# -- problems ----------------------------------------------------------------------------


@dataclass
class Problem:
    """One objective: its Space, its epochs (max fidelity), its step function and the best
    value reachable (for regret). `steps(config, seed, start)` yields (seconds, metrics)
    with metrics {"epoch": e, "accuracy": reward}."""

    name: str
    task: str
    space: Space
    epochs: int
    optimum: float
    steps: StepFunction


def lcbench_space() -> Space:
    """The 7 hyperparameters of the lcbench README, with its ranges."""
    return Space({
        "batch_size": Int(16, 512, log=True),
        "learning_rate": Real(1e-4, 1e-1, log=True),
        "max_dropout": Real(0.0, 1.0),
        "max_units": Int(64, 1024, log=True),
        "momentum": Real(0.1, 0.99),
        "num_layers": Int(1, 5),
        "weight_decay": Real(1e-5, 1e-1),
    })


_LCBENCH_CACHE: dict[str, Any] = {}


def lcbench_data() -> dict[str, Any]:
    """The lcbench arrays (loaded once per process): tasks, unit points of the 1000
    configurations, accuracy (34, 1000, 52) and per-epoch seconds (34, 1000)."""
    if not _LCBENCH_CACHE:
        data = np.load(LCBENCH)
        space = lcbench_space()
        configs = [{name: data[f"config_{name}"][i].item() for name in space}
                   for i in range(data["val_accuracy"].shape[1])]
        _LCBENCH_CACHE.update(
            tasks=[str(t) for t in data["tasks"]],
            units=np.array([space.to_unit(c) for c in configs]),
            accuracy=data["val_accuracy"].astype(np.float64),
            seconds=data["time"][:, :, -1].astype(np.float64) / data["time"].shape[2])
    return _LCBENCH_CACHE


def lcbench_problem(task: str) -> Problem:
    """The lcbench problem of OpenML task `task`."""
    data = lcbench_data()
    k = data["tasks"].index(task)
    space = lcbench_space()
    units, accuracy, seconds = data["units"], data["accuracy"][k], data["seconds"][k]

    table = TableRows(units)

    def steps(config: dict[str, Any], seed: int, start: int
              ) -> Iterator[tuple[float, dict[str, Any]]]:
        i = table.row(space.to_unit(config))
        for e in range(start, accuracy.shape[1]):
            yield seconds[i], {"epoch": e + 1, "accuracy": accuracy[i, e]}

    return Problem("lcbench", task, space, accuracy.shape[1], float(accuracy[:, -1].max()),
                   steps)


class TableRows:
    """Which row of a table each configuration of one run trains: a point seen before gets
    its row again (a paused or promoted trial resumes the same curve); a new point gets the
    nearest row (Euclidean in the unit cube, the first on ties) that no other point of the
    run has taken, so that every method samples the table without replacement, as a
    searcher restricted to the table's configurations would. After every row is taken,
    new points get their nearest row."""

    def __init__(self, units: np.ndarray):
        self.units = units
        self.rows: dict[bytes, int] = {}
        self.free = np.ones(len(units), dtype=bool)

    def row(self, point: np.ndarray) -> int:
        key = np.asarray(point, dtype=np.float64).tobytes()
        if key not in self.rows:
            distance = ((self.units - point) ** 2).sum(axis=1)
            if self.free.any():
                distance[~self.free] = np.inf
            i = int(np.argmin(distance))
            self.free[i] = False
            self.rows[key] = i
        return self.rows[key]


HARTMANN_ALPHA = np.array([1.0, 1.2, 3.0, 3.2])
HARTMANN_A = np.array([[10, 3, 17, 3.5, 1.7, 8], [0.05, 10, 17, 0.1, 8, 14],
                       [3, 3.5, 1.7, 10, 17, 8], [17, 8, 0.05, 10, 0.1, 14]])
HARTMANN_P = 1e-4 * np.array([[1312, 1696, 5569, 124, 8283, 5886],
                              [2329, 4135, 8307, 3736, 1004, 9991],
                              [2348, 1451, 3522, 2883, 3047, 6650],
                              [4047, 8828, 8732, 5743, 1091, 381]])
HARTMANN_MIN = -3.32237
HARTMANN_SHIFT = np.array([0.0, 0.0, 0.5, -0.5])


def hartmann6(x: np.ndarray, alpha: np.ndarray = HARTMANN_ALPHA) -> float:
    """The Hartmann-6 function (minimum -3.32237 with the standard alpha)."""
    inner = (HARTMANN_A * (x - HARTMANN_P) ** 2).sum(axis=1)
    return float(-(alpha * np.exp(-inner)).sum())


def hartmann_reward(x: np.ndarray, r: int, epochs: int, eps: float = 0.0) -> float:
    """The multi-fidelity reward of the module docstring at fidelity `r` of `epochs`."""
    s = 1.0 - r / epochs
    h = hartmann6(x, HARTMANN_ALPHA + s * HARTMANN_SHIFT)
    return -(h - HARTMANN_MIN) - s * s * (1.0 + x[0]) + 0.01 * eps


def hartmann_problem(epochs: int = EPOCHS) -> Problem:
    space = Space({f"x{j + 1}": Real(0.0, 1.0) for j in range(6)})

    def steps(config: dict[str, Any], seed: int, start: int
              ) -> Iterator[tuple[float, dict[str, Any]]]:
        x = np.array(list(config.values()), dtype=float)
        for r in range(start + 1, epochs + 1):
            eps = float(np.random.default_rng([seed, r]).standard_normal())
            yield 1.0 + x[5], {"epoch": r, "accuracy": hartmann_reward(x, r, epochs, eps)}

    return Problem("hartmann6", "-", space, epochs, 0.0, steps)


def make_problem(name: str, task: str) -> Problem:
    return lcbench_problem(task) if name == "lcbench" else hartmann_problem()


# -- methods -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """A named method: `kind` "tuned" (searcher and scheduler names of tuned, with their
    options) or "optuna" (sampler and pruner names of `run_optuna`)."""

    kind: str
    searcher: str
    scheduler: str
    searcher_options: dict[str, Any] = field(default_factory=dict)
    scheduler_options: dict[str, Any] = field(default_factory=dict)


_ASHA = {"grace_period": 1, "reduction_factor": 3}
# bayesopt under Hyperband: the first rung at epoch 3, since the ranks after epoch 1 say
# little on lcbench (see the rank correlations this script prints).
_ASHA3 = {"grace_period": 3, "reduction_factor": 3}
# A smaller model and fewer candidates than bayesopt's defaults (1000, 256): each suggestion
# about 3 times cheaper, the search worse (see docs/search-quality.md).
_BO_SMALL = {"candidates": 500, "max_points": 128}
#: The methods by name. Hooks: a method whose searcher or scheduler tuned does not have
#: (yet) is listed as not available and skipped (`available` checks); add new ones here.
METHODS: dict[str, Method] = {
    "tuned:random+fifo": Method("tuned", "random", "fifo"),
    "tuned:random+hyperband": Method("tuned", "random", "hyperband_stopping",
                                     scheduler_options=_ASHA),
    "tuned:random+hyperband_promotion": Method("tuned", "random", "hyperband_promotion",
                                               scheduler_options=_ASHA),
    "tuned:random+hyperband_promotion@3": Method("tuned", "random", "hyperband_promotion",
                                                 scheduler_options=_ASHA3),
    "tuned:bayesopt+hyperband_promotion@small_model_2brackets": Method(
        "tuned", "bayesopt", "hyperband_promotion", _BO_SMALL, {**_ASHA3, "brackets": 2}),
    "tuned:random+pbt": Method("tuned", "random", "pbt",
                               scheduler_options={"perturbation_interval": 4}),
    "tuned:rl+fifo": Method("tuned", "rl", "fifo"),
    "tuned:rl+hyperband": Method("tuned", "rl", "hyperband_stopping", scheduler_options=_ASHA),
    "tuned:rl+hyperband_promotion": Method("tuned", "rl", "hyperband_promotion",
                                           scheduler_options=_ASHA),
    "tuned:bayesopt+fifo": Method("tuned", "bayesopt", "fifo"),
    "tuned:bayesopt+hyperband": Method("tuned", "bayesopt", "hyperband_stopping",
                                       scheduler_options=_ASHA3),
    "tuned:bayesopt+hyperband_promotion": Method("tuned", "bayesopt", "hyperband_promotion",
                                                 scheduler_options=_ASHA3),
    # variants: a smaller model (about 3 times cheaper per suggestion), two brackets
    "tuned:bayesopt+hyperband@small_model": Method("tuned", "bayesopt", "hyperband_stopping",
                                                   _BO_SMALL, _ASHA3),
    "tuned:bayesopt+hyperband_promotion@small_model": Method(
        "tuned", "bayesopt", "hyperband_promotion", _BO_SMALL, _ASHA3),
    # the Optuna baselines
    "optuna:tpe+hyperband": Method("optuna", "tpe", "hyperband"),
    "optuna:tpe+sha": Method("optuna", "tpe", "sha"),
    # Optuna's Hyperband with the minimum resource of tuned's grace_period=3 methods
    "optuna:tpe+hyperband@3": Method("optuna", "tpe", "hyperband",
                                     scheduler_options={"min_resource": 3}),
    "optuna:random+sha": Method("optuna", "random", "sha"),
}
#: The original tutorial's settings, as a new user writes them (issue 19): a first rung at
#: epoch 1 or 3 (`grace_period`), `reduction_factor = 3`, one bracket, Hyperband stopping or
#: promotion, random search or bayesopt with its defaults; named with the grace period.
SEED_GRID = {
    f"tuned:{searcher}+hyperband_{kind}@g{grace}": Method(
        "tuned", searcher, f"hyperband_{kind}",
        scheduler_options={"grace_period": grace, "reduction_factor": 3})
    for grace in (1, 3) for kind in ("stopping", "promotion")
    for searcher in ("random", "bayesopt")}
METHODS.update(SEED_GRID)
#: ``--methods seed-grid``: that grid, and Optuna's two methods beside it.
GROUPS = {"seed-grid": [*SEED_GRID, "optuna:tpe+hyperband", "optuna:tpe+sha"]}
BASELINE = "tuned:random+fifo"
OPTUNA_BASELINES = ("optuna:tpe+hyperband", "optuna:tpe+sha", "optuna:tpe+hyperband@3",
                    "optuna:random+sha")


def tuned_spec(problem: Problem, method: Method, seed: int, num_trials: int) -> Any:
    """The ExperimentSpec of a tuned method on `problem`; ValueError if tuned refuses it."""
    from tuned.experiment.spec import ExperimentSpec

    options = dict(method.scheduler_options)
    if method.scheduler != "fifo":
        options.setdefault("max_t", problem.epochs)
    return ExperimentSpec.from_dict({
        "name": f"{problem.name}-{problem.task}", "space": problem.space,
        "searcher": method.searcher, "searcher_options": dict(method.searcher_options),
        "scheduler": method.scheduler, "scheduler_options": options,
        "num_trials": num_trials, "reward_attr": "accuracy", "time_attr": "epoch",
        "mode": "max", "seed": seed})


def available(name: str) -> str | None:
    """None when method `name` can run here, else why not."""
    method = METHODS[name]
    if method.kind == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            return "optuna is not installed (pip install -e '.[bench]')"
        return None
    from tuned.core.factory import make_scheduler, make_searcher

    problem = hartmann_problem()
    try:
        spec = tuned_spec(problem, method, 0, 1)
        make_searcher(spec.searcher, spec.space, seed=0, **spec.searcher_options)
        make_scheduler(spec.scheduler, spec.scheduler_options, seed=0, space=spec.space)
    except (ValueError, TypeError, ImportError) as exc:
        problems = getattr(exc, "problems", None)
        return "; ".join(problems) if problems else str(exc) or type(exc).__name__
    return None


# -- running -----------------------------------------------------------------------------


@dataclass
class Run:
    """One run's incumbent curve: `values[b]` is the incumbent after b + 1 epochs."""

    problem: str
    task: str
    seed: int
    method: str
    values: np.ndarray
    trials: int
    wall: float


def incumbents(trials: list[int], rewards: list[float], budget: int) -> np.ndarray:
    """The incumbent after each of the first `budget` reports: the best of the trials'
    latest rewards. Padded with the last value when the run reported less."""
    latest: dict[int, float] = {}
    out = np.empty(budget)
    best, best_trial = -math.inf, None
    n = min(budget, len(rewards))
    for b in range(n):
        t, v = trials[b], rewards[b]
        latest[t] = v
        if v >= best:
            best, best_trial = v, t
        elif t == best_trial:
            best_trial = max(latest, key=latest.__getitem__)
            best = latest[best_trial]
        out[b] = best
    out[n:] = out[n - 1] if n else -math.inf
    return out


def run_tuned(problem: Problem, method: Method, seed: int, budget: int, workers: int,
              num_trials: int) -> tuple[np.ndarray, int]:
    """A tuned method through the real engine on the simulated executor; (incumbents,
    trials started)."""
    from tuned.simulate import simulate

    spec = tuned_spec(problem, method, seed, num_trials)
    result = simulate(spec, problem.steps, workers, max_reports=budget)
    timeline = result.timeline
    return (incumbents([e["trial"] for e in timeline], [e["reward"] for e in timeline],
                       budget), len(result.trials))


def run_optuna(problem: Problem, method: Method, seed: int, budget: int,
               workers: int) -> tuple[np.ndarray, int]:
    """An Optuna sampler and pruner, `workers` trials in flight in virtual time (see the
    module docstring); (incumbents, trials started). Stops at `budget` epochs."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = (optuna.samplers.TPESampler(seed=seed) if method.searcher == "tpe"
               else optuna.samplers.RandomSampler(seed=seed))
    options = {"min_resource": 1, "reduction_factor": 3, **method.scheduler_options}
    if method.scheduler == "hyperband":
        pruner: Any = optuna.pruners.HyperbandPruner(max_resource=problem.epochs, **options)
    else:
        pruner = optuna.pruners.SuccessiveHalvingPruner(**options)
    # A fixed study name: HyperbandPruner draws each trial's bracket from it.
    study = optuna.create_study(direction="maximize", sampler=sampler, pruner=pruner,
                                study_name=f"{problem.name}-{problem.task}-{seed}")
    heap: list[tuple[float, int, Any, Iterator[Any], dict[str, Any]]] = []
    order = itertools.count()
    trials: list[int] = []
    rewards: list[float] = []
    started = 0

    def launch(now: float) -> None:
        nonlocal started
        trial = study.ask()
        config = {name: suggest(trial, name, dom) for name, dom in problem.space.items()}
        steps = iter(problem.steps(config, trial_seed(seed, trial.number), 0))
        started += 1
        step(trial, steps, now)

    def step(trial: Any, steps: Iterator[Any], now: float) -> None:
        seconds, metrics = next(steps)
        heapq.heappush(heap, (now + seconds, next(order), trial, steps, metrics))

    for _ in range(workers):
        launch(0.0)
    while heap and len(rewards) < budget:
        now, _, trial, steps, metrics = heapq.heappop(heap)
        value, epoch = float(metrics["accuracy"]), int(metrics["epoch"])
        trials.append(trial.number)
        rewards.append(value)
        trial.report(value, epoch)
        if trial.should_prune():
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        elif epoch >= problem.epochs:
            study.tell(trial, value)
        else:
            step(trial, steps, now)
            continue
        if len(rewards) < budget:
            launch(now)
    return incumbents(trials, rewards, budget), started


def suggest(trial: Any, name: str, domain: Any) -> Any:
    """Optuna's suggestion for one tuned domain (Real or Int, log scale kept)."""
    if isinstance(domain, Int):
        return trial.suggest_int(name, domain.lower, domain.upper, log=domain.log)
    return trial.suggest_float(name, domain.lower, domain.upper, log=domain.log)


def run_one(job: tuple[str, str, int, str, int, int, int]) -> Run:
    """One (problem, task, seed, method) run; the unit of work of the process pool."""
    problem_name, task, seed, name, budget, workers, rs_trials = job
    problem = make_problem(problem_name, task)
    method = METHODS[name]
    began = time.perf_counter()
    if method.kind == "optuna":
        values, started = run_optuna(problem, method, seed, budget, workers)
    else:
        num_trials = rs_trials if name == BASELINE else budget
        values, started = run_tuned(problem, method, seed, budget, workers, num_trials)
    return Run(problem_name, task, seed, name, values, started, time.perf_counter() - began)


# -- analysis ----------------------------------------------------------------------------


@dataclass
class Scores:
    regret_q: float
    regret_full: float
    anytime: float
    to_rs: float  # epochs to reach random-FIFO's final incumbent; inf when not reached


def score(run: Run, optimum: float, quarter: int, full: int, horizon: int,
          target: float | None) -> Scores:
    """The metrics of the module docstring for one run: regret@B is NaN for a run shorter
    than `full`, anytime regret is over the first `horizon` epochs."""
    regret = optimum - run.values
    reached = np.nonzero(run.values >= target)[0] if target is not None else []
    return Scores(float(regret[quarter - 1]),
                  float(regret[full - 1]) if len(regret) >= full else math.nan,
                  float(regret[:horizon].mean()),
                  float(reached[0] + 1) if len(reached) else math.inf)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    return float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=float)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / counts)[inverse]


def rank_correlations(problem: str, tasks: list[str]) -> dict[int, float]:
    """Epoch e -> the median over tasks of Spearman(reward after e, reward after the last
    epoch) over the 1000 configurations (hartmann6: 1000 random points, no noise)."""
    epochs = (1, 3, 9, 27)
    if problem == "lcbench":
        acc = lcbench_data()["accuracy"]
        index = [lcbench_data()["tasks"].index(t) for t in tasks]
        return {e: float(np.median([spearman(acc[k, :, e - 1], acc[k, :, -1])
                                    for k in index])) for e in epochs}
    xs = np.random.default_rng(0).random((1000, 6))
    final = np.array([hartmann_reward(x, EPOCHS, EPOCHS) for x in xs])
    return {e: spearman(np.array([hartmann_reward(x, e, EPOCHS) for x in xs]), final)
            for e in epochs}


def wtl(mine: list[float], theirs: list[float]) -> str:
    """Win-tie-loss counts, lower is better."""
    w = sum(a < b - 1e-9 for a, b in zip(mine, theirs, strict=True))
    loss = sum(a > b + 1e-9 for a, b in zip(mine, theirs, strict=True))
    return f"{w}-{len(mine) - w - loss}-{loss}"


def fmt(x: float, digits: int = 3) -> str:
    if math.isnan(x):
        return "-"
    return "n/r" if math.isinf(x) else f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:.0f}"


def fmt_epochs(x: float) -> str:
    return "n/r" if math.isinf(x) else f"{x:.0f}"


def report(runs: list[Run], problem: str, quarter: int, full: int, methods: list[str]) -> None:
    """Print the table of one problem: medians over tasks and seeds, win-tie-loss."""
    by = {(r.task, r.seed, r.method): r for r in runs if r.problem == problem}
    # the (task, seed) pairs every method ran (all of them, unless a run was cut short)
    keys = sorted({(t, s) for t, s, _ in by if all((t, s, m) in by for m in methods)})
    mine = [by[(t, s, m)] for t, s in keys for m in methods]
    optimum = {t: make_problem(problem, t).optimum for t, _ in keys}
    horizon = min(len(r.values) for r in mine)
    scores: dict[str, list[Scores]] = {}
    for name in methods:
        rows = []
        for task, seed in keys:
            base = by.get((task, seed, BASELINE))
            target = float(base.values[-1]) if base is not None else None
            rows.append(score(by[(task, seed, name)], optimum[task], quarter, full, horizon,
                              target))
        scores[name] = rows
    unit = "accuracy points" if problem == "lcbench" else "reward"
    print(f"\n== {problem}: {len({t for t, _ in keys})} task(s) x "
          f"{len({s for _, s in keys})} seed(s); regret in {unit}; medians; "
          f"q = {quarter} epochs, B = {full} epochs, anytime over 1..{horizon}")
    head = (f"{'method':36} {'regret@q':>9} {'regret@B':>9} {'anytime':>9} {'to-RS':>7} "
            f"{'reached':>8} {'trials':>7} {'wall s':>7}")
    print(head)
    print("-" * len(head))
    for name in methods:
        rows = scores[name]
        runs_m = [by[(t, s, name)] for t, s in keys]
        reached = sum(not math.isinf(r.to_rs) for r in rows)
        print(f"{name:36} {fmt(np.median([r.regret_q for r in rows])):>9} "
              f"{fmt(np.median([r.regret_full for r in rows])):>9} "
              f"{fmt(np.median([r.anytime for r in rows])):>9} "
              f"{fmt_epochs(float(np.median([r.to_rs for r in rows]))):>7} "
              f"{reached:>4}/{len(rows):<3} "
              f"{np.median([r.trials for r in runs_m]):>7.0f} "
              f"{np.median([r.wall for r in runs_m]):>7.1f}")
    baselines = [b for b in OPTUNA_BASELINES if b in methods]
    if not baselines:
        return
    print(f"\nwin-tie-loss (lower regret wins) of each tuned method against the Optuna "
          f"baselines, over {len(keys)} (task, seed) pairs: regret@q | anytime")
    print(f"{'method':36} " + " ".join(f"{b:>26}" for b in baselines))
    for name in methods:
        if not name.startswith("tuned:"):
            continue
        cells = []
        for b in baselines:
            q = wtl([r.regret_q for r in scores[name]], [r.regret_q for r in scores[b]])
            a = wtl([r.anytime for r in scores[name]], [r.anytime for r in scores[b]])
            cells.append(f"{q} | {a}")
        print(f"{name:36} " + " ".join(f"{c:>26}" for c in cells))
    tpe = [b for b in baselines if b.startswith("optuna:tpe")]
    if len(tpe) < 2:
        return
    print(f"\nregret@q against the better of {' and '.join(tpe)} on each (task, seed) pair: "
          "win-tie-loss (share won)")
    better = [min(scores[b][i].regret_q for b in tpe) for i in range(len(keys))]
    for name in methods:
        if name.startswith("tuned:"):
            counts = wtl([r.regret_q for r in scores[name]], better)
            won = int(counts.split("-")[0])
            print(f"{name:36} {counts:>12} ({won / len(keys):.0%})")


def plot(runs: list[Run], problem: str, quarter: int, methods: list[str],
         out: str) -> str | None:
    """Median regret against epochs spent, one line per method; the file, or None without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    mine = [r for r in runs if r.problem == problem]
    optimum = {t: make_problem(problem, t).optimum for t in {r.task for r in mine}}
    fig, ax = plt.subplots(figsize=(8, 5))
    floor = 1e-3
    for name in methods:
        curves = [optimum[r.task] - r.values for r in mine if r.method == name]
        median = np.maximum(np.median(np.array(curves), axis=0), floor)
        ax.plot(np.arange(1, len(median) + 1), median, label=name,
                linestyle="-" if name.startswith("tuned:") else "--")
    ax.axvline(quarter, color="grey", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("epochs spent (all workers)")
    ax.set_ylabel(f"median regret (floored at {floor:g})")
    ax.set_title(f"{problem}: best-so-far regret against budget")
    ax.legend(fontsize=8)
    path = os.path.join(out, f"regret_{problem}.png")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def load(out: str) -> list[Run]:
    """The runs `save` wrote to `out` (for --from)."""
    curves = np.load(os.path.join(out, "curves.npz"))
    with open(os.path.join(out, "runs.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    return [Run(r["problem"], r["task"], int(r["seed"]), r["method"],
                curves[f"{r['problem']}/{r['task']}/{r['seed']}/{r['method']}"],
                int(r["trials"]), float(r["wall_s"])) for r in rows]


def save(runs: list[Run], out: str) -> None:
    """runs.csv (one row per run) and curves.npz (each run's incumbent curve)."""
    with open(os.path.join(out, "runs.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["problem", "task", "seed", "method", "final_incumbent", "trials",
                         "wall_s"])
        for r in runs:
            writer.writerow([r.problem, r.task, r.seed, r.method, f"{r.values[-1]:.6g}",
                             r.trials, f"{r.wall:.3f}"])
    np.savez_compressed(os.path.join(out, "curves.npz"),
                        **{f"{r.problem}/{r.task}/{r.seed}/{r.method}": r.values for r in runs})


# -- the command line --------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--problems", default="lcbench,hartmann6",
                   help="comma-separated: lcbench, hartmann6")
    p.add_argument("--tasks", default="all", help="lcbench task ids, comma-separated, or all")
    p.add_argument("--seeds", type=int, default=3, help="seeds S..S+N-1 per task")
    p.add_argument("--seed-start", type=int, default=0, metavar="S",
                   help="the first seed (to add seeds to saved runs, with --from)")
    p.add_argument("--workers", type=int, default=4, help="trials in flight at once")
    p.add_argument("--methods", default="all",
                   help=f"comma-separated names or groups ({list(GROUPS)}), or all (the "
                        f"available ones): {list(METHODS)}")
    p.add_argument("--rs-trials", type=int, default=100,
                   help="random-FIFO's trials; the full budget B is these x the epochs")
    p.add_argument("--fraction", type=float, default=0.25, help="the smaller budget, of B")
    p.add_argument("--until", choices=("B", "q"), default="B",
                   help="run every method but random-FIFO to B (default) or only to q")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="runs in parallel (processes)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: lcbench tasks {','.join(QUICK_TASKS)}, 2 seeds")
    p.add_argument("--out", default="search_quality_out", help="directory for the outputs")
    p.add_argument("--from", dest="source", metavar="DIR[,DIR...]",
                   help="run nothing: print the tables and plots of the runs saved in these "
                        "directories together (with the same --rs-trials and --fraction)")
    args = p.parse_args(argv)
    if args.quick:
        args.tasks = ",".join(QUICK_TASKS) if args.tasks == "all" else args.tasks
        args.seeds = min(args.seeds, 2)
    return args


def choose_methods(spec: str) -> list[str]:
    """The methods to run: the named ones, or all available; prints what is left out."""
    names = list(METHODS) if spec == "all" else [
        n for m in spec.split(",") if m.strip() for n in GROUPS.get(m.strip(), [m.strip()])]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    chosen = []
    for name in names:
        why = available(name)
        if why is None:
            chosen.append(name)
        else:
            print(f"not available: {name} ({why})")
    if BASELINE not in chosen:
        chosen.insert(0, BASELINE)
    return chosen


def versions() -> str:
    try:
        import optuna

        optuna_version = optuna.__version__
    except ImportError:
        optuna_version = "not installed"
    from importlib.metadata import PackageNotFoundError, version

    try:
        tuned_version = version("tuned")
    except PackageNotFoundError:
        tuned_version = "unknown"
    return (f"machine: {platform.machine()}, {os.cpu_count()} CPU(s), "
            f"{platform.processor() or platform.platform()}; python {platform.python_version()}"
            f", numpy {np.__version__}, optuna {optuna_version}, tuned {tuned_version}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print("command: " + " ".join([os.path.basename(sys.executable), *sys.argv]))
    print(versions())
    problems = [p.strip() for p in args.problems.split(",") if p.strip()]
    if "lcbench" in problems and not os.path.exists(LCBENCH):
        print(f"error: the lcbench data is missing: {LCBENCH} (see the lcbench README)",
              file=sys.stderr)
        return 2
    full = args.rs_trials * EPOCHS
    quarter = max(1, int(full * args.fraction))
    if args.source:
        unique = {(r.problem, r.task, r.seed, r.method): r
                  for d in args.source.split(",") for r in load(d)}
        runs = list(unique.values())
        names = list(dict.fromkeys(r.method for r in runs))
        summarise(runs, list(dict.fromkeys(r.problem for r in runs)), names, quarter, full,
                  args.out)
        return 0
    methods = choose_methods(args.methods)
    jobs = []
    for problem in problems:
        tasks = ["-"]
        if problem == "lcbench":
            tasks = lcbench_data()["tasks"] if args.tasks == "all" else args.tasks.split(",")
        jobs += [(problem, t, s, m, full if args.until == "B" or m == BASELINE else quarter,
                  args.workers, args.rs_trials)
                 for t in tasks for s in range(args.seed_start, args.seed_start + args.seeds)
                 for m in methods]
    print(f"{len(jobs)} runs: problems {problems}, methods {methods}, {args.seeds} seed(s), "
          f"{args.workers} workers, budget B = {full} epochs, q = {quarter}, "
          f"{args.jobs} process(es)")
    began = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    runs = []
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for run in pool.map(run_one, jobs, chunksize=1):
            runs.append(run)
            if len(runs) % 20 == 0 or len(runs) == len(jobs):
                save(runs, args.out)  # a run cut short keeps what it did (--from reads it)
                print(f"{len(runs)}/{len(jobs)} runs, {time.perf_counter() - began:.0f} s",
                      flush=True)
    print(f"ran in {time.perf_counter() - began:.0f} s")
    summarise(runs, problems, methods, quarter, full, args.out)
    return 0


def summarise(runs: list[Run], problems: list[str], methods: list[str], quarter: int,
              full: int, out: str) -> None:
    """Print the tables, rank correlations and plots of every problem."""
    os.makedirs(out, exist_ok=True)
    print("\nA trial's value is its reward at the last epoch it reported (not its best epoch); "
          "regret = optimum - best value so far; anytime = mean regret over epochs 1..H; "
          "to-RS = epochs to reach random-FIFO's final incumbent (n/r: not reached by the "
          "run's end).")
    for problem in problems:
        report(runs, problem, quarter, full, methods)
        path = plot(runs, problem, quarter, methods, out)
        print(f"plot: {path}" if path else "plot: matplotlib is not installed, no plot")
        tasks = sorted({r.task for r in runs if r.problem == problem})
        corr = rank_correlations(problem, tasks)
        print("rank after epoch e against rank after the last epoch, median Spearman over "
              f"{'tasks' if problem == 'lcbench' else '1000 random points'}: "
              + ", ".join(f"e={e}: {c:.3f}" for e, c in corr.items()))
    print(f"\nruns and curves in {out}/")


if __name__ == "__main__":
    sys.exit(main())
