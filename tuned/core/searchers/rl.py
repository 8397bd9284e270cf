"""The RL searcher: AutoGluon's RLScheduler controller, re-designed in numpy.

AutoGluon trained an LSTM controller with REINFORCE: the controller picks one value per
hyperparameter, in the space's order, each pick conditioned on the earlier ones through the
recurrent state; the log-probability of a whole configuration, weighted by its reward minus an
exponential-moving-average baseline, is pushed up by Adam once per batch of finished trials.

This controller keeps that design with a plain tanh recurrent cell instead of the LSTM::

    h_0     = h0                                        (a learned vector, size H)
    z_k     = D_k h_k + c_k                             (logits over parameter k's actions)
    a_k     ~ softmax(z_k)
    h_{k+1} = tanh(W h_k + E_k[a_k] + b)                (E_k: one embedding per action)

Every hyperparameter is a finite set of actions: the choices of a `Categorical` or `Bool`,
the integers of an `Int` with at most `real_bins` of them (else `real_bins` values spread over
its range, log-aware), and `real_bins` values of a `Real`, both bounds included, evenly spaced
on its (log) scale.

Learning. Trials suggested by this searcher keep their actions until their final result
arrives; a final, finite score joins a batch, and when the batch holds
`controller_batch_size` results the controller takes one Adam step (step size
`controller_lr`) on ``-mean_i (score_i - baseline) * log p(actions_i)``, the log-probability
recomputed under the current weights. The baseline is AutoGluon's: the first score of the first
batch, then ``baseline = decay * baseline + (1 - decay) * score`` for every score of a batch,
after the batch's advantages are taken. Scores are not normalised: Adam's per-coordinate
normalisation already makes a step's size (about `controller_lr` per weight) independent of the
reward scale. (AutoGluon's trainer ran Adam at ``controller_lr * controller_batch_size`` on the
summed loss; here the step size is `controller_lr` itself, whatever the batch size.)

Failed trials (score None) and non-finite scores are dropped from learning, as are results for
trials this searcher did not suggest (or already learned from).

The state is JSON: weights, Adam moments and step count, the baseline, the RNG state, the
pending actions and the batch. Arrays are stored as base64 of their little-endian float64
bytes, which round-trips exactly and is ~50 times faster to dump than lists of floats.
"""

from __future__ import annotations

import base64
import math
from typing import Any

import numpy as np

from tuned.core.searchers.base import Searcher, SearcherStateError
from tuned.core.space import Domain, Space

__all__ = ["RLSearcher", "action_values", "init_params", "log_prob_and_grad", "sample_actions"]

Params = dict[str, np.ndarray]

ADAM_BETA1 = 0.9
ADAM_BETA2 = 0.999
ADAM_EPS = 1e-8
# Initial weights are uniform in [-INIT_SCALE, INIT_SCALE] (gluon's default initializer, as
# AutoGluon's controller had), biases zero: the first policy is almost uniform. The initial
# state h0 is uniform in [-1, 1], the range of the later (tanh) states, so that each decoder's
# gradient is O(1) from the first update: an Adam step moves every weight by about `lr`, so a
# logit moves by about lr * |h|_1 ~ lr * hidden / 2 (0.08 for lr=5e-3, hidden=32). AutoGluon's
# LSTM started from a zero state and grew it, which is slower to start and faster later.
INIT_SCALE = 0.07


def action_values(domain: Domain, real_bins: int) -> list[Any]:
    """The values a parameter's actions stand for, in order; at least one, all distinct.

    Finite domains with at most `real_bins` values keep all of them; an `Int` with more gets
    `real_bins` values (fewer on a log scale, where some bins share an integer); a `Real` gets
    `real_bins` values with both bounds included.
    """
    return list(domain.grid(real_bins))


# --- the controller, as pure functions of its weights --------------------------------------


def param_names(n_actions: list[int]) -> list[str]:
    """The weight names of a controller over parameters with `n_actions` actions, in order."""
    names = ["h0", "W", "b"]
    for k in range(len(n_actions)):
        names += [f"D{k}", f"c{k}"]
        if k < len(n_actions) - 1:  # the last choice feeds no later state
            names.append(f"E{k}")
    return names


def init_params(n_actions: list[int], hidden: int, rng: np.random.Generator) -> Params:
    """Fresh weights: `h0` uniform in [-1, 1], biases (`b`, `c*`) zero, the others uniform in
    [-INIT_SCALE, INIT_SCALE]; drawn from `rng` in `param_names` order."""
    params = {"h0": rng.uniform(-1.0, 1.0, size=hidden),
              "W": rng.uniform(-INIT_SCALE, INIT_SCALE, size=(hidden, hidden)),
              "b": np.zeros(hidden)}
    for k, n in enumerate(n_actions):
        params[f"D{k}"] = rng.uniform(-INIT_SCALE, INIT_SCALE, size=(n, hidden))
        params[f"c{k}"] = np.zeros(n)
        if k < len(n_actions) - 1:
            params[f"E{k}"] = rng.uniform(-INIT_SCALE, INIT_SCALE, size=(n, hidden))
    return params


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def sample_actions(params: Params, n_actions: list[int], rng: np.random.Generator) -> list[int]:
    """One action per parameter, sampled from the policy; draws one uniform per parameter."""
    h = params["h0"]
    actions = []
    for k, n in enumerate(n_actions):
        z = params[f"D{k}"] @ h + params[f"c{k}"]
        cdf = np.cumsum(np.exp(z - z.max()))  # unnormalised: the draw is scaled instead
        a = min(n - 1, int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")))
        actions.append(a)
        if k < len(n_actions) - 1:
            h = np.tanh(params["W"] @ h + params[f"E{k}"][a] + params["b"])
    return actions


def log_prob_and_grad(params: Params, actions: np.ndarray,
                      weights: np.ndarray) -> tuple[np.ndarray, Params]:
    """Log-probabilities of a batch of action sequences and the gradient of their weighted sum.

    `actions` is an int array (batch, parameters), `weights` a float array (batch,). Returns
    ``(log_p, grads)``: ``log_p[i] = log p(actions[i])`` under `params`, and `grads` maps each
    weight name to d(sum_i weights[i] * log_p[i]) / d(weight), of the weight's shape.
    """
    batch, n_params = actions.shape
    rows = np.arange(batch)
    hs = [np.tile(params["h0"], (batch, 1))]
    dzs = []
    log_p = np.zeros(batch)
    for k in range(n_params):
        log_probs = _log_softmax(hs[k] @ params[f"D{k}"].T + params[f"c{k}"])
        log_p += log_probs[rows, actions[:, k]]
        probs = np.exp(log_probs)
        onehot = np.zeros_like(probs)
        onehot[rows, actions[:, k]] = 1.0
        dzs.append((onehot - probs) * weights[:, None])
        if k < n_params - 1:
            pre = hs[k] @ params["W"].T + params[f"E{k}"][actions[:, k]] + params["b"]
            hs.append(np.tanh(pre))
    grads = {name: np.zeros_like(value) for name, value in params.items()}
    g = np.zeros_like(hs[0])  # d(objective) / d(h_k), carried backwards
    for k in reversed(range(n_params)):
        if k < n_params - 1:
            dpre = g * (1.0 - hs[k + 1] ** 2)
            grads["W"] += dpre.T @ hs[k]
            grads["b"] += dpre.sum(axis=0)
            np.add.at(grads[f"E{k}"], actions[:, k], dpre)
            g = dpre @ params["W"]
        grads[f"D{k}"] += dzs[k].T @ hs[k]
        grads[f"c{k}"] += dzs[k].sum(axis=0)
        g = g + dzs[k] @ params[f"D{k}"]
    grads["h0"] += g.sum(axis=0)
    return log_p, grads


def adam_ascent(params: Params, grads: Params, m: Params, v: Params, step: int,
                lr: float) -> None:
    """One Adam step (bias-corrected) up the gradient, in place; `step` counts from 1."""
    c1 = 1.0 - ADAM_BETA1 ** step
    c2 = 1.0 - ADAM_BETA2 ** step
    for name, g in grads.items():
        m[name] *= ADAM_BETA1
        m[name] += (1.0 - ADAM_BETA1) * g
        v[name] *= ADAM_BETA2
        v[name] += (1.0 - ADAM_BETA2) * g * g
        params[name] += lr * (m[name] / c1) / (np.sqrt(v[name] / c2) + ADAM_EPS)


# --- JSON encoding of arrays ---------------------------------------------------------------


def _encode(array: np.ndarray) -> dict[str, Any]:
    data = np.ascontiguousarray(array, dtype="<f8").tobytes()
    return {"shape": list(array.shape), "f8": base64.b64encode(data).decode("ascii")}


def _decode(data: dict[str, Any]) -> np.ndarray:
    raw = base64.b64decode(data["f8"])
    return np.frombuffer(raw, dtype="<f8").astype(float).reshape(data["shape"])


def _encode_all(arrays: Params) -> dict[str, Any]:
    return {name: _encode(a) for name, a in arrays.items()}


def _decode_all(data: dict[str, Any], like: Params, what: str) -> Params:
    """Decode `data` into arrays of the names and shapes of `like`; SearcherStateError if not."""
    if not isinstance(data, dict) or set(data) != set(like):
        raise SearcherStateError(f"rl state: {what} do not match this searcher's controller")
    out = {}
    for name, ref in like.items():
        try:
            arr = _decode(data[name])
        except (KeyError, TypeError, ValueError) as exc:
            raise SearcherStateError(f"rl state: {what} {name!r} is corrupt: {exc}") from None
        if arr.shape != ref.shape:
            raise SearcherStateError(f"rl state: {what} {name!r} has shape {arr.shape}, "
                                     f"expected {ref.shape}")
        out[name] = arr
    return out


# --- the searcher ---------------------------------------------------------------------------


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _check_float(name: str, value: Any, ok: bool, rule: str) -> float:
    if not ok:
        raise ValueError(f"{name} must be {rule}, got {value!r}")
    return float(value)


def _is_number(value: Any) -> bool:
    return (not isinstance(value, bool) and isinstance(value, (int, float, np.number))
            and math.isfinite(value))


class RLSearcher(Searcher):
    """AutoGluon's RL controller: a recurrent policy over the space, trained with REINFORCE.

    Options (each checked here; a bad one raises ValueError naming it):
    `controller_batch_size` (int >= 1) finished trials per update, `controller_lr` (> 0) the
    Adam step size, `ema_baseline_decay` (in [0, 1)) the baseline's decay, `hidden_size`
    (int >= 1) the recurrent state's size, `real_bins` (int >= 2) the number of values a `Real`
    (or a large `Int`) is discretised into.

    `suggest` always returns a configuration (the policy never runs out).
    """

    kind = "rl"
    version = 1

    def __init__(self, space: Space, seed: int | None = None, controller_batch_size: int = 1,
                 controller_lr: float = 1e-3, ema_baseline_decay: float = 0.95,
                 hidden_size: int = 32, real_bins: int = 16):
        super().__init__(space, seed)
        self.controller_batch_size = _check_int("controller_batch_size",
                                                controller_batch_size, 1)
        self.controller_lr = _check_float("controller_lr", controller_lr,
                                          _is_number(controller_lr) and controller_lr > 0,
                                          "a finite number > 0")
        self.ema_baseline_decay = _check_float(
            "ema_baseline_decay", ema_baseline_decay,
            _is_number(ema_baseline_decay) and 0 <= ema_baseline_decay < 1, "in [0, 1)")
        self.hidden_size = _check_int("hidden_size", hidden_size, 1)
        self.real_bins = _check_int("real_bins", real_bins, 2)
        self.values = [action_values(dom, self.real_bins) for dom in space.values()]
        self.n_actions = [len(v) for v in self.values]
        self.params = init_params(self.n_actions, self.hidden_size, self.rng)
        self.adam_m = {k: np.zeros_like(p) for k, p in self.params.items()}
        self.adam_v = {k: np.zeros_like(p) for k, p in self.params.items()}
        self.adam_step = 0
        # Encoded weights and moments, reused until the next learning step changes them.
        self._encoded: tuple[int, dict[str, Any]] | None = None
        self.baseline: float | None = None
        self.pending: dict[int, list[int]] = {}
        self.batch: list[tuple[list[int], float]] = []

    def suggest(self, trial_id: int) -> dict[str, Any]:
        """A configuration sampled from the current policy, remembered under `trial_id`."""
        actions = sample_actions(self.params, self.n_actions, self.rng)
        self.pending[trial_id] = actions
        names = list(self.space)
        return {names[k]: self.values[k][a] for k, a in enumerate(actions)}

    def observe(self, trial_id: int, config: dict[str, Any], score: float | None,
                final: bool = True, time: float | None = None) -> None:
        """Learn from a trial's final result; intermediate results are ignored.

        The trial's actions are those this searcher suggested under `trial_id` (`config` is
        not read); a final result forgets them, and joins the batch when `score` is a finite
        number. A full batch triggers one update of the controller.
        """
        if not final or trial_id not in self.pending:
            return
        actions = self.pending.pop(trial_id)
        if not _is_number(score):
            return
        self.batch.append((actions, float(score)))
        if len(self.batch) >= self.controller_batch_size:
            self._update()

    def greedy_policy(self) -> list[np.ndarray]:
        """Each parameter's action probabilities, given the most likely earlier actions.

        One probability vector per parameter, in the space's order, along the arg-max path;
        for inspection and tests (it draws nothing from the RNG).
        """
        h = self.params["h0"]
        out = []
        for k in range(len(self.n_actions)):
            probs = np.exp(_log_softmax(self.params[f"D{k}"] @ h + self.params[f"c{k}"]))
            out.append(probs)
            if k < len(self.n_actions) - 1:
                a = int(np.argmax(probs))
                h = np.tanh(self.params["W"] @ h + self.params[f"E{k}"][a] + self.params["b"])
        return out

    def _update(self) -> None:
        actions = np.array([a for a, _ in self.batch], dtype=np.int64).reshape(
            len(self.batch), len(self.n_actions))
        scores = np.array([s for _, s in self.batch])
        self.batch = []
        if self.baseline is None:
            self.baseline = float(scores[0])
        advantages = scores - self.baseline
        for s in scores:
            self.baseline = (self.ema_baseline_decay * self.baseline
                             + (1.0 - self.ema_baseline_decay) * float(s))
        _, grads = log_prob_and_grad(self.params, actions, advantages / len(scores))
        self.adam_step += 1
        adam_ascent(self.params, grads, self.adam_m, self.adam_v, self.adam_step,
                    self.controller_lr)

    def _options(self) -> dict[str, Any]:
        return {"controller_batch_size": self.controller_batch_size,
                "controller_lr": self.controller_lr,
                "ema_baseline_decay": self.ema_baseline_decay,
                "hidden_size": self.hidden_size, "real_bins": self.real_bins,
                "n_actions": self.n_actions}

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state; loading it into a searcher built alike restores it exactly."""
        state = super().state_dict()
        if self._encoded is None or self._encoded[0] != self.adam_step:
            self._encoded = (self.adam_step, {
                "params": _encode_all(self.params),
                "adam_m": _encode_all(self.adam_m),
                "adam_v": _encode_all(self.adam_v),
            })
        state.update({
            "options": self._options(),
            **self._encoded[1],
            "adam_step": self.adam_step,
            "baseline": self.baseline,
            "pending": [[tid, acts] for tid, acts in self.pending.items()],
            "batch": [[acts, score] for acts, score in self.batch],
        })
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict()`; SearcherStateError when it is of another kind, version,
        set of options or controller shape (this searcher is then left unchanged)."""
        if state.get("kind") != self.kind or state.get("v") != self.version:
            super().load_state_dict(state)
        if state.get("options") != self._options():
            raise SearcherStateError(f"rl state: options {state.get('options')!r} differ "
                                     f"from this searcher's {self._options()!r}")
        params = _decode_all(state.get("params"), self.params, "weights")
        adam_m = _decode_all(state.get("adam_m"), self.params, "Adam moments")
        adam_v = _decode_all(state.get("adam_v"), self.params, "Adam moments")
        try:
            adam_step = int(state["adam_step"])
            baseline = None if state["baseline"] is None else float(state["baseline"])
            pending = {int(tid): [int(a) for a in acts] for tid, acts in state["pending"]}
            batch = [([int(a) for a in acts], float(score)) for acts, score in state["batch"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise SearcherStateError(f"rl state is corrupt: {exc!r}") from None
        super().load_state_dict(state)
        self.params, self.adam_m, self.adam_v = params, adam_m, adam_v
        self.adam_step, self.baseline = adam_step, baseline
        self._encoded = None
        self.pending, self.batch = pending, batch
