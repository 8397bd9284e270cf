"""Bayesian optimisation: a Gaussian process, expected improvement, and a multi-fidelity mode.

The model. A GP (`tuned.core.searchers.gp`: Matérn 5/2 with one length scale per input, signal
and noise variances, MAP hyperparameters by L-BFGS on the log marginal likelihood) over the
configurations in the unit cube: numeric parameters through `Domain.to_unit` (log-aware),
each categorical (and Bool) one-hot, one coordinate per choice. Scores are standardised;
they are higher-is-better, as `observe` receives them.

Choosing a configuration (`suggest`). While fewer than `num_init` trials are known
(suggested, or observed without being suggested), suggestions are random: the space's
default first, then samples (as `RandomSearcher`). After that the searcher maximises
expected improvement (Jones, Schonlau and Welch, "Efficient Global Optimization of
Expensive Black-Box Functions", J. Global Optim. 1998) over the incumbent, the best
posterior mean among the observed configurations, by scoring `candidates` points: half
uniform in the cube, half local perturbations of the five best observed configurations (at
several scales; categoricals resampled now and then), then a finer round around the best
five of those. Integer coordinates are snapped to their value's centre and one-hots are
exact, so EI is scored at the configuration that will be run. The best-scoring candidate
whose configuration was never suggested (nor observed) wins; in a finite space with at most
`candidates` configurations left, those are the candidates; when the space is exhausted,
`suggest` returns None.

Pending trials (suggested, not yet ended) are handled with a constant liar (Ginsbourger,
Le Riche and Carraro, "Kriging is well-suited to parallelize optimization", 2010): each is
conditioned on as an observation of the lowest posterior mean among the observed
configurations, which lowers EI around it, so parallel workers are not sent to one spot.

Multi-fidelity (`fidelity="auto"` with `max_t` given, or `"multi"`): MOBSTER (Klein, Tiao,
Lienen, Archambeau and Seeger, "Model-based Asynchronous Hyperparameter and Neural
Architecture Search", arXiv:2003.10865, 2020). Every report a trial makes (`observe(...,
final=False, time=t)`) is data: the GP's input is the configuration plus the resource
``z = log(1 + t) / log(1 + max_t)``, clipped to [0, 1], with its own length scale. New
configurations maximise EI at the acquisition level `r_acq`, the largest resource that at
least `num_init` trials have reached (the rule MOBSTER takes from BOHB: Falkner, Klein and
Hutter, "BOHB: Robust and Efficient Hyperparameter Optimization at Scale", ICML 2018),
against the best posterior mean at `r_acq` among the trials that reached it; pending trials
are fantasised at `r_acq`. A final result only marks its trial as ended (its score is the
last report's). A trial keeps at most one report per tenth of the z range (the latest in
each), and the model at most `max_points` points, split evenly across those tenths, so that
its cost stays bounded; within a tenth that has too many, a quarter of the quota goes to the
best scores and the rest is spread evenly over the trials.

Failed trials (score None or not finite) are not re-suggested and count as the lowest score
seen (at `r_acq` in multi-fidelity mode); reports with a non-finite score are ignored.

Hyperparameters are refitted, by the next `suggest`, once `refit_every` trials, and a
quarter as many as had ended at the last fit, have ended since then (reports do not count:
they can arrive every epoch; the fits thin out as the data grows, since the thinned data
the model sees changes less and less), from the previous
fit and one random start, on at most `FIT_POINTS` of the points; in between they are
reused. If the kernel matrix cannot be factorised, `suggest` falls back to a random
configuration. Cost: a `suggest` is a few small dense linear-algebra operations (at most
`max_points` points) and scoring about `candidates` points; a multi-threaded BLAS on a
busy machine can make it several times slower than a single thread
(``OPENBLAS_NUM_THREADS=1``).

State. ``{"v", "kind", "rng", "gp": {"theta", "fit_at"}, "log.0", "log.1", ...}``: the RNG,
the GP hyperparameters (None before the first fit) with the number of ended trials then,
and the log of every suggestion and observation, in order, cut into chunks of `CHUNK`
entries (``["s", trial, config]``, ``["r", trial, time, score]``,
``["f", trial, score]``; the configuration is appended to an "r"/"f" entry when it differs
from the one known for the trial). Only the last chunk changes when an observation
arrives, so a store that rewrites changed parts only writes O(CHUNK) per observation.
Everything else is derived from the log, so a loaded searcher suggests exactly what the
original would.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tuned.core.searchers import gp
from tuned.core.searchers.base import Searcher, SearcherStateError
from tuned.core.searchers.random import ENUMERATE_LIMIT, MAX_TRIES, config_key
from tuned.core.space import Categorical, Int, Space

__all__ = ["BayesOptSearcher", "Encoder", "CHUNK"]

#: Log entries per state part.
CHUNK = 256
#: Resource bins per trial in multi-fidelity mode (the z range cut into this many parts).
BINS = 10
#: At most this many points are used to fit the hyperparameters.
FIT_POINTS = 160
#: Local candidates are spread around this many of the best observed configurations.
CENTRES = 5
#: Perturbation scales (standard deviations in the unit cube) of local candidates, log-uniform.
LOCAL_SCALES = (0.01, 0.3)
#: Candidates of the finer second round, around each of the best `CENTRES` of the first.
REFINE_EACH = 20
#: Ints with at most this many values are snapped to their value's centre in candidates.
SNAP_LIMIT = 100_000


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _finite(value: Any) -> bool:
    return (not isinstance(value, bool) and isinstance(value, (int, float, np.number))
            and math.isfinite(value))


# --- encoding --------------------------------------------------------------------------------


class Encoder:
    """Configurations as points of the unit cube: numeric parameters one coordinate each
    (`Domain.to_unit`), categoricals one-hot. `dim` is the number of coordinates."""

    def __init__(self, space: Space):
        self.space = space
        self.names = list(space)
        self.numeric: list[int] = []  # coordinate of each numeric parameter
        self.blocks: list[tuple[int, int]] = []  # (first coordinate, choices) per categorical
        self.snaps: list[tuple[int, np.ndarray]] = []  # (coordinate, unit centres) per Int
        self._slots: list[tuple[str, int, int]] = []
        col = 0
        for dom in space.values():
            if isinstance(dom, Categorical):
                self.blocks.append((col, len(dom.choices)))
                self._slots.append(("c", col, len(dom.choices)))
                col += len(dom.choices)
            else:
                self.numeric.append(col)
                if isinstance(dom, Int) and dom.cardinality <= SNAP_LIMIT:
                    values = range(dom.lower, dom.upper + 1)
                    self.snaps.append((col, np.array([dom.to_unit(v) for v in values])))
                self._slots.append(("n", col, 1))
                col += 1
        self.dim = col

    def encode(self, config: dict[str, Any]) -> np.ndarray:
        """The point of a (valid) configuration."""
        x = np.zeros(self.dim)
        for (kind, col, _), (name, dom) in zip(self._slots, self.space.items(), strict=True):
            if kind == "c":
                x[col + dom.index(config[name])] = 1.0
            else:
                x[col] = dom.to_unit(config[name])
        return x

    def decode(self, x: np.ndarray) -> dict[str, Any]:
        """The configuration at a point (a categorical takes its largest coordinate)."""
        out = {}
        for (kind, col, n), (name, dom) in zip(self._slots, self.space.items(), strict=True):
            if kind == "c":
                out[name] = dom.choices[int(np.argmax(x[col:col + n]))]
            else:
                out[name] = dom.from_unit(float(x[col]))
        return out

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """`n` uniform points: numeric coordinates uniform, categoricals uniform one-hots."""
        x = np.zeros((n, self.dim))
        x[:, self.numeric] = rng.random((n, len(self.numeric)))
        rows = np.arange(n)
        for col, k in self.blocks:
            x[rows, col + rng.integers(k, size=n)] = 1.0
        return self.snap(x)

    def perturb(self, rng: np.random.Generator, centres: np.ndarray, n: int,
                scales: tuple[float, float]) -> np.ndarray:
        """`n` points near `centres` (rows picked uniformly): numeric coordinates moved by a
        normal step of a log-uniform scale in `scales` and clipped, each categorical
        resampled with probability 1 / (number of parameters)."""
        pick = rng.integers(len(centres), size=n)
        x = centres[pick].copy()
        scale = np.exp(rng.uniform(math.log(scales[0]), math.log(scales[1]), size=(n, 1)))
        if self.numeric:
            step = rng.standard_normal((n, len(self.numeric))) * scale
            x[:, self.numeric] = np.clip(x[:, self.numeric] + step, 0.0, 1.0)
        rows = np.arange(n)
        p = 1.0 / max(1, len(self.names))
        for col, k in self.blocks:
            flip = rng.random(n) < p
            new = rng.integers(k, size=n)
            x[flip, col:col + k] = 0.0
            x[rows[flip], col + new[flip]] = 1.0
        return self.snap(x)

    def snap(self, x: np.ndarray) -> np.ndarray:
        """`x` with every Int coordinate moved to the centre of the value it decodes to."""
        for col, centres in self.snaps:
            mids = 0.5 * (centres[1:] + centres[:-1])
            x[:, col] = centres[np.searchsorted(mids, x[:, col])]
        return x


# --- what the searcher knows about a trial ----------------------------------------------------


@dataclass
class _Trial:
    config: dict[str, Any]
    x: np.ndarray
    ended: bool = False
    failed: bool = False
    final: float | None = None
    # resource bin -> (time, score, z): the latest report in each bin.
    reports: dict[int, tuple[float, float, float]] = field(default_factory=dict)
    top_time: float = -math.inf


@dataclass
class _Data:
    """What a suggestion is computed from: model inputs and (raw) scores, the rows of the
    trials that count for the incumbent, the pending points and the acquisition level z."""

    x: np.ndarray
    y: np.ndarray
    strata: np.ndarray
    incumbents: np.ndarray  # points (model inputs) whose posterior mean sets the incumbent
    pending: np.ndarray
    z_acq: float | None


def _thin(y: np.ndarray, strata: np.ndarray, limit: int) -> np.ndarray:
    """Indices of at most `limit` rows, split evenly across strata (a stratum with fewer
    rows than its share gives the rest to the others); within a stratum over its share, a
    quarter of it goes to the highest `y`, the rest spread evenly over the others in
    order. Deterministic; sorted."""
    if len(y) <= limit:
        return np.arange(len(y))
    groups = [np.flatnonzero(strata == s) for s in np.unique(strata)]
    sizes = sorted(len(g) for g in groups)
    left, quota = limit, limit
    for i, size in enumerate(sizes):  # water-filling: the largest share all strata can take
        share = left // (len(sizes) - i)
        if size >= share:
            quota = share
            break
        left -= size
    keep = []
    for g in groups:
        if len(g) <= quota:
            keep.append(g)
            continue
        n_top = quota // 4
        order = g[np.argsort(-y[g], kind="stable")]
        top, rest = order[:n_top], np.sort(order[n_top:])
        spread = rest[np.linspace(0, len(rest) - 1, quota - n_top).round().astype(int)]
        keep += [top, spread]
    return np.sort(np.concatenate(keep))


#: The attributes `_reset` sets: all the searcher learns, the RNG aside.
_DERIVED = ("theta", "fit_at", "trials", "seen", "n_ended", "_log",
            "_chunks")


# --- the searcher -----------------------------------------------------------------------------


class BayesOptSearcher(Searcher):
    """Bayesian optimisation with a GP and expected improvement; MOBSTER-style multi-fidelity
    when `max_t` is given (see the module docstring).

    Options (a bad one raises ValueError naming it):

    - `num_init` (int >= 1; default ``max(5, parameters + 1)``): trials known before the
      model is used; also the number of trials a resource level needs to become the
      acquisition level.
    - `max_t` (number > 0 or None): the largest resource (`time_attr` value) a trial reaches;
      needed for the multi-fidelity mode.
    - `fidelity` ("auto", "none" or "multi"): "auto" is "multi" when `max_t` is given, else
      "none"; "none" uses only final results; "multi" needs `max_t`.
    - `candidates` (int >= 10): points scored by EI per suggestion (the finer round adds
      ``CENTRES * REFINE_EACH``).
    - `refit_every` (int >= 1): ended trials between hyperparameter fits (at least; see the
      module docstring).
    - `max_points` (int >= 10): the most data points the GP is given.

    `wants_reports` is True unless the fidelity is "none" (then intermediate reports are
    not wanted, and ignored if they come anyway).
    """

    kind = "bayesopt"
    version = 1
    wants_reports = True
    multi_fidelity = True

    def __init__(self, space: Space, seed: int | None = None, num_init: int | None = None,
                 max_t: float | None = None, fidelity: str = "auto", candidates: int = 1000,
                 refit_every: int = 10, max_points: int = 256):
        super().__init__(space, seed)
        if num_init is None:
            num_init = max(5, len(space) + 1)
        self.num_init = _check_int("num_init", num_init, 1)
        if max_t is not None and not (_finite(max_t) and max_t > 0):
            raise ValueError(f"max_t must be a finite number > 0 or None, got {max_t!r}")
        self.max_t = None if max_t is None else float(max_t)
        if fidelity not in ("auto", "none", "multi"):
            raise ValueError(f"fidelity must be 'auto', 'none' or 'multi', got {fidelity!r}")
        if fidelity == "multi" and self.max_t is None:
            raise ValueError("max_t is needed (a number > 0) when fidelity is 'multi'")
        self.multi = fidelity == "multi" or (fidelity == "auto" and self.max_t is not None)
        self.wants_reports = self.multi
        self.candidates = _check_int("candidates", candidates, 10)
        self.refit_every = _check_int("refit_every", refit_every, 1)
        self.max_points = _check_int("max_points", max_points, 10)
        self.encoder = Encoder(space)
        self.model_dim = self.encoder.dim + (1 if self.multi else 0)
        self._reset()
        self._grid: list[tuple[str, dict[str, Any]]] | None = None  # finite spaces, lazily

    def _reset(self) -> None:
        """Forget everything learnt (the RNG aside): sets each of `_DERIVED`."""
        self.theta: np.ndarray | None = None
        self.fit_at = 0
        self.trials: dict[int, _Trial] = {}
        self.seen: set[str] = set()
        self.n_ended = 0
        self._log: list[list[Any]] = []
        self._chunks: list[list[list[Any]]] = []  # closed chunks of the log, cached

    # -- the contract ----------------------------------------------------------------------

    def suggest(self, trial_id: int) -> dict[str, Any] | None:
        """The next configuration, or None when a finite space has nothing new left."""
        if self._n_left() == 0:
            return None
        config = None
        if len(self.trials) >= self.num_init:
            config = self._suggest_by_model()
        if config is None:
            config = self._random_new()
        if config is None:
            return None
        self._record(["s", int(trial_id), dict(config)])
        return config

    def observe(self, trial_id: int, config: dict[str, Any], score: float | None,
                final: bool = True, time: float | None = None) -> None:
        """Record a result (see the module docstring for how each kind is used).

        Raises ValueError when `config` is not a configuration of the space. A report
        (``final=False``) is ignored when the fidelity is "none", or its `time` or `score` is
        not a finite number.
        """
        trial_id = int(trial_id)
        known = self.trials.get(trial_id)
        extra: list[Any] = []
        if known is None or config != known.config:
            extra = [self.space.validate(config)]
        if not final:
            if not (self.multi and _finite(time) and _finite(score)):
                return
            self._record(["r", trial_id, float(time), float(score), *extra])
        else:
            value = float(score) if _finite(score) else None
            self._record(["f", trial_id, value, *extra])

    def state_dict(self) -> dict[str, Any]:
        """The state (see the module docstring); JSON-serialisable."""
        state = super().state_dict()
        state["gp"] = {"theta": None if self.theta is None else [float(v) for v in self.theta],
                       "fit_at": self.fit_at}
        for i, chunk in enumerate(self._chunks):
            state[f"log.{i}"] = chunk
        tail = self._log[len(self._chunks) * CHUNK:]
        if tail:
            state[f"log.{len(self._chunks)}"] = tail
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict()`; SearcherStateError (this searcher unchanged) when it is
        of another kind or version, or corrupt."""
        if state.get("kind") != self.kind or state.get("v") != self.version:
            super().load_state_dict(state)
        before = {name: getattr(self, name) for name in _DERIVED}
        self._reset()
        try:
            theta, fit_at = self._parse_gp(state.get("gp"))
            for i in range(sum(1 for key in state if key.startswith("log."))):
                for entry in state[f"log.{i}"]:
                    self._record(list(entry))
            super().load_state_dict(state)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            for name, value in before.items():
                setattr(self, name, value)
            raise SearcherStateError(f"bayesopt state is corrupt: {exc!r}") from None
        self.theta, self.fit_at = theta, fit_at

    def _parse_gp(self, data: Any) -> tuple[np.ndarray | None, int]:
        if not isinstance(data, dict):
            raise ValueError("'gp' must be a mapping")
        fit_at = _check_int("fit_at", data["fit_at"], 0)
        theta = data["theta"]
        if theta is None:
            return None, fit_at
        arr = np.array([float(v) for v in theta])
        if arr.shape != (self.model_dim + 2,) or not np.all(np.isfinite(arr)):
            raise ValueError(f"theta must be {self.model_dim + 2} finite numbers")
        return arr, fit_at

    # -- the log ---------------------------------------------------------------------------

    def _record(self, entry: list[Any]) -> None:
        self._apply(entry)
        self._log.append(entry)
        if len(self._log) % CHUNK == 0:
            self._chunks.append(self._log[-CHUNK:])

    def _apply(self, entry: list[Any]) -> None:
        """Update what the searcher knows from one log entry; ValueError if it is malformed."""
        op, trial_id = entry[0], int(entry[1])
        if op == "s":
            config = self.space.validate(entry[2])
            self.trials[trial_id] = _Trial(config, self.encoder.encode(config))
            self.seen.add(config_key(config))
            return
        if op not in ("r", "f"):
            raise ValueError(f"unknown log entry {op!r}")
        n_args = 4 if op == "r" else 3
        if len(entry) not in (n_args, n_args + 1):
            raise ValueError(f"log entry {entry!r} has the wrong length")
        trial = self.trials.get(trial_id)
        if len(entry) == n_args + 1:
            config = self.space.validate(entry[-1])
            self.seen.add(config_key(config))
            if trial is None:
                trial = self.trials[trial_id] = _Trial(config, self.encoder.encode(config))
            else:
                trial.config, trial.x = config, self.encoder.encode(config)
        elif trial is None:
            raise ValueError(f"log entry {entry!r} names an unknown trial")
        if op == "r":
            time, score = float(entry[2]), float(entry[3])
            z = self._z(time)
            trial.reports[min(BINS, int(BINS * z))] = (time, score, z)
            trial.top_time = max(trial.top_time, time)
        else:
            self.n_ended += 0 if trial.ended else 1
            trial.ended = True
            trial.final = None if entry[2] is None else float(entry[2])
            trial.failed = trial.final is None

    def _z(self, time: float) -> float:
        """The resource `time` on [0, 1]; ValueError without `max_t` (a report in the state
        of a searcher that had one)."""
        if self.max_t is None:
            raise ValueError("a report, but this searcher has no max_t")
        return min(1.0, max(0.0, math.log1p(max(time, 0.0)) / math.log1p(self.max_t)))

    # -- random suggestions ----------------------------------------------------------------

    def _n_left(self) -> int | None:
        """Configurations never seen, or None for an infinite space."""
        cardinality = self.space.cardinality
        return None if cardinality is None else max(0, cardinality - len(self.seen))

    def _unseen_grid(self) -> list[tuple[str, dict[str, Any]]]:
        """(key, configuration) of every configuration not seen, in grid order (a finite
        space of at most ENUMERATE_LIMIT configurations)."""
        if self._grid is None:
            self._grid = [(config_key(c), c) for c in self.space.grid()]
        return [(k, c) for k, c in self._grid if k not in self.seen]

    def _enumerable(self) -> bool:
        cardinality = self.space.cardinality
        return cardinality is not None and cardinality <= ENUMERATE_LIMIT

    def _random_new(self) -> dict[str, Any] | None:
        """The default if unseen, else a random unseen configuration (as RandomSearcher)."""
        default = self.space.default()
        if config_key(default) not in self.seen:
            return default
        for _ in range(MAX_TRIES):
            config = self.space.sample(self.rng)
            if config_key(config) not in self.seen:
                return config
        if self._enumerable():
            left = self._unseen_grid()
            if left:
                return left[int(self.rng.integers(len(left)))][1]
        return None

    # -- the model -------------------------------------------------------------------------

    def _data(self) -> _Data | None:
        """The model's data, or None while there is too little to fit a model."""
        if self.multi:
            return self._data_multi()
        done = [t for t in self.trials.values() if t.ended]
        ok = [t for t in done if not t.failed]
        if len(ok) < 2:
            return None
        worst = min(t.final for t in ok)  # type: ignore[type-var]
        x = np.array([t.x for t in done])
        y = np.array([worst if t.failed else t.final for t in done], dtype=float)
        pending = [t.x for t in self.trials.values() if not t.ended]
        return _Data(x, y, np.zeros(len(y), dtype=int), np.array([t.x for t in ok]),
                     np.array(pending).reshape(-1, self.encoder.dim), None)

    def _data_multi(self) -> _Data | None:
        reported = [t for t in self.trials.values() if t.reports]
        if len(reported) < 2:
            return None
        r_acq = self._acquisition_level(reported)
        z_acq = self._z(r_acq)
        xs, zs, ys, strata = [], [], [], []
        for t in reported:
            xs += [t.x] * len(t.reports)
            strata += t.reports.keys()
            for _, score, z in t.reports.values():
                zs.append(z)
                ys.append(score)
        worst = min(ys)
        for t in self.trials.values():
            if t.failed and not t.reports:
                xs.append(t.x)
                zs.append(z_acq)
                ys.append(worst)
                strata.append(BINS + 1)
        incumbents = [np.append(t.x, z_acq) for t in reported if t.top_time >= r_acq]
        pending = [np.append(t.x, z_acq) for t in self.trials.values() if not t.ended]
        return _Data(np.column_stack([np.array(xs), zs]), np.array(ys), np.array(strata),
                     np.array(incumbents), np.array(pending).reshape(-1, self.model_dim),
                     z_acq)

    def _fit(self, x: np.ndarray, y: np.ndarray, strata: np.ndarray) -> None:
        """Refit the hyperparameters on (a thinned part of) the data; draws from the RNG."""
        keep = _thin(y, strata, FIT_POINTS)
        starts = [gp.default_theta(self.model_dim) if self.theta is None else self.theta,
                  gp.default_theta(self.model_dim)
                  + 0.7 * self.rng.standard_normal(self.model_dim + 2)]
        self.theta = gp.fit_theta(x[keep], y[keep], starts)
        self.fit_at = self.n_ended

    def _suggest_by_model(self) -> dict[str, Any] | None:
        """The unseen candidate of highest EI, or None (no model yet, or nothing found)."""
        data = self._data()
        if data is None:
            return None
        keep = _thin(data.y, data.strata, self.max_points)
        x = data.x[keep]
        mu, sd = float(data.y[keep].mean()), float(data.y[keep].std())
        y = (data.y[keep] - mu) / (sd if sd > 1e-12 else 1.0)
        if self.theta is None or self.n_ended - self.fit_at >= max(self.refit_every,
                                                                   self.fit_at // 4):
            self._fit(x, y, data.strata[keep])
        assert self.theta is not None
        try:
            post = gp.Posterior(x, y, self.theta)
            inc_mean = post.predict(data.incumbents)[0]
            if len(data.pending):
                lie = float(post.predict(x if data.z_acq is None else
                                         self._at_level(x, data.z_acq))[0].min())
                post.with_pending(data.pending, np.full(len(data.pending), lie))
            best = float(inc_mean.max())

            def acquisition(points: np.ndarray) -> np.ndarray:
                return gp.log_expected_improvement(
                    *post.predict(self._model_input(points, data.z_acq)), best)

            return self._maximise(acquisition, data.incumbents[
                np.argsort(-inc_mean, kind="stable")[:CENTRES]])
        except gp.GPError:
            return None

    def _acquisition_level(self, reported: list[_Trial]) -> float:
        """The largest time that `num_init` of the `reported` trials have reached (the
        smallest time reached if fewer trials reported)."""
        tops = sorted((t.top_time for t in reported), reverse=True)
        return tops[min(self.num_init, len(tops)) - 1]

    @staticmethod
    def _at_level(x: np.ndarray, z: float) -> np.ndarray:
        out = x.copy()
        out[:, -1] = z
        return out

    def _model_input(self, points: np.ndarray, z_acq: float | None) -> np.ndarray:
        if z_acq is None:
            return points
        return np.hstack([points, np.full((len(points), 1), z_acq)])

    def _maximise(self, acquisition: Callable[[np.ndarray], np.ndarray],
                  centres: np.ndarray) -> dict[str, Any] | None:
        """The unseen candidate of highest `acquisition` (see the module docstring)."""
        enc = self.encoder
        centres = centres[:, :enc.dim]
        left = self._n_left()
        exact = left is not None and left <= self.candidates and self._enumerable()
        if exact:
            pool = self._unseen_grid()
            points = np.array([enc.encode(c) for _, c in pool]).reshape(-1, enc.dim)
        else:
            n_local = self.candidates // 2
            points = np.vstack([enc.sample(self.rng, self.candidates - n_local),
                                enc.perturb(self.rng, centres, n_local, LOCAL_SCALES)])
        score = acquisition(points)
        if not exact:
            top = points[np.argsort(-score, kind="stable")[:CENTRES]]
            fine = enc.perturb(self.rng, top, CENTRES * REFINE_EACH,
                               (LOCAL_SCALES[0], LOCAL_SCALES[0] * 4))
            fine_score = acquisition(fine)
            points, score = np.vstack([points, fine]), np.concatenate([score, fine_score])
        for i in np.argsort(-score, kind="stable"):
            config = pool[i][1] if exact else enc.decode(points[i])
            if config_key(config) not in self.seen:
                return config
        return None
