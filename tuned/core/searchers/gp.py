"""A Gaussian process in numpy: Matérn 5/2 ARD kernel, MAP hyperparameters, posterior, EI.

The model (Rasmussen and Williams, "Gaussian Processes for Machine Learning", 2006, ch. 2, 4
and 5)::

    f ~ GP(0, k),  y_i = f(x_i) + eps_i,  eps_i ~ N(0, noise)
    k(x, x') = signal * (1 + sqrt(5) r + 5/3 r^2) * exp(-sqrt(5) r),
    r^2 = sum_k (x_k - x'_k)^2 / ls_k^2

with inputs in the unit cube and outputs standardised by the caller. The hyperparameters
travel as one vector ``theta = [log ls_1 .. log ls_D, log signal, log noise]``; they are fitted
by minimising the negative log marginal likelihood plus a weak Gaussian prior on each log
value (a MAP estimate, which keeps the fit sane with few points), with the analytic gradient,
by L-BFGS (Nocedal and Wright, "Numerical Optimization", 2006, alg. 7.4/7.5) from several
starts. The bounds `BOUNDS_*` hold through a logistic reparametrisation, so that the optimiser
itself is unconstrained.

Everything here is a deterministic function of its arguments (no RNG, no global state).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

__all__ = ["GPError", "Posterior", "bounds", "default_theta", "fit_theta", "kernel",
           "log_expected_improvement", "neg_log_posterior", "normal_cdf"]

SQRT5 = math.sqrt(5.0)
LOG_2PI = math.log(2.0 * math.pi)

#: Bounds (not logs) of each length scale, the signal variance and the noise variance.
BOUNDS_LS = (0.01, 100.0)
BOUNDS_SIGNAL = (0.01, 100.0)
BOUNDS_NOISE = (1e-6, 1.0)
#: Gaussian priors on the log hyperparameters: (mean of the log, standard deviation).
PRIOR_LS = (math.log(0.5), 1.5)
PRIOR_SIGNAL = (0.0, 1.0)
PRIOR_NOISE = (math.log(1e-2), 2.0)
#: Diagonal jitter tried, relative to the signal variance, when a Cholesky factorisation
#: fails; the first is 0.
JITTERS = (0.0, 1e-9, 1e-7, 1e-5, 1e-3)


class GPError(ArithmeticError):
    """The kernel matrix is not positive definite even with the largest jitter."""


def bounds(dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper bounds of `theta` (logs) for `dim` inputs."""
    lo = [math.log(BOUNDS_LS[0])] * dim + [math.log(BOUNDS_SIGNAL[0]),
                                           math.log(BOUNDS_NOISE[0])]
    hi = [math.log(BOUNDS_LS[1])] * dim + [math.log(BOUNDS_SIGNAL[1]),
                                           math.log(BOUNDS_NOISE[1])]
    return np.array(lo), np.array(hi)


def default_theta(dim: int) -> np.ndarray:
    """The prior means: the usual first start of a fit."""
    return np.array([PRIOR_LS[0]] * dim + [PRIOR_SIGNAL[0], PRIOR_NOISE[0]])


def _prior(dim: int) -> tuple[np.ndarray, np.ndarray]:
    mean = default_theta(dim)
    sd = np.array([PRIOR_LS[1]] * dim + [PRIOR_SIGNAL[1], PRIOR_NOISE[1]])
    return mean, sd


def _split(theta: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(length scales, signal variance, noise variance) of `theta`."""
    return np.exp(theta[:-2]), math.exp(theta[-2]), math.exp(theta[-1])


def _scaled_sqdist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances between the rows of `a` and `b`, never negative."""
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d, 0.0)


def kernel(x1: np.ndarray, x2: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """The noise-free Matérn 5/2 ARD kernel matrix between the rows of `x1` and `x2`."""
    ls, signal, _ = _split(theta)
    r = np.sqrt(_scaled_sqdist(x1 / ls, x2 / ls))
    return signal * (1.0 + SQRT5 * r + (5.0 / 3.0) * r * r) * np.exp(-SQRT5 * r)


def _cholesky(k: np.ndarray, signal: float) -> np.ndarray:
    """The lower Cholesky factor of `k`, adding the smallest jitter of `JITTERS` that works.

    Raises GPError when none does (or `k` holds a non-finite value).
    """
    if not np.all(np.isfinite(k)):
        raise GPError("kernel matrix has non-finite entries")
    eye = np.eye(k.shape[0])
    for jitter in JITTERS:
        try:
            return np.linalg.cholesky(k + (jitter * signal) * eye if jitter else k)
        except np.linalg.LinAlgError:
            continue
    raise GPError("kernel matrix is not positive definite, even with jitter")


def _inverse_from_cholesky(chol: np.ndarray) -> np.ndarray:
    inv_l = np.linalg.inv(chol)
    return inv_l.T @ inv_l


def neg_log_posterior(theta: np.ndarray, x: np.ndarray, y: np.ndarray,
                      prior: bool = True) -> tuple[float, np.ndarray]:
    """The negative log marginal likelihood of `y` at `x` (plus the negative log prior of
    `theta` up to a constant, when `prior`), and its gradient with respect to `theta`.

    Raises GPError when the kernel matrix cannot be factorised.
    """
    n, dim = x.shape
    ls, signal, noise = _split(theta)
    xs = x / ls
    r = np.sqrt(_scaled_sqdist(xs, xs))
    e = np.exp(-SQRT5 * r)
    k_f = signal * (1.0 + SQRT5 * r + (5.0 / 3.0) * r * r) * e
    chol = _cholesky(k_f + noise * np.eye(n), signal)
    k_inv = _inverse_from_cholesky(chol)
    alpha = k_inv @ y
    value = 0.5 * float(y @ alpha) + float(np.log(np.diag(chol)).sum()) + 0.5 * n * LOG_2PI
    # d value / d theta_j = -1/2 sum_ij W_ij dK_ij / d theta_j,  W = alpha alpha^T - K^-1.
    w = np.outer(alpha, alpha) - k_inv
    grad = np.empty(dim + 2)
    # dK / d log ls_k = (5/3) signal (1 + sqrt5 r) exp(-sqrt5 r) (x_ik - x_jk)^2 / ls_k^2.
    m = w * ((5.0 / 3.0) * signal * (1.0 + SQRT5 * r) * e)
    rows = m.sum(1)
    grad[:dim] = -(rows @ (xs * xs) - (xs * (m @ xs)).sum(0))
    grad[dim] = -0.5 * float((w * k_f).sum())
    grad[dim + 1] = -0.5 * noise * float(np.trace(w))
    if prior:
        mean, sd = _prior(dim)
        z = (theta - mean) / sd
        value += 0.5 * float(z @ z)
        grad += z / sd
    return value, grad


# --- L-BFGS ---------------------------------------------------------------------------------


def lbfgs(fun: Callable[[np.ndarray], tuple[float, np.ndarray]], u0: np.ndarray,
          max_iter: int = 50, memory: int = 8, gtol: float = 1e-3,
          ftol: float = 1e-4) -> tuple[np.ndarray, float]:
    """Minimise `fun` (value and gradient) from `u0` with L-BFGS and a backtracking Armijo
    line search; return the best point seen and its value.

    `fun` may return a non-finite value (the line search then backs off); if the value at
    `u0` is not finite, `(u0, inf)` is returned. Stops after `max_iter` iterations, when the
    largest gradient component is below `gtol`, or when an iteration improves the value by
    less than `ftol` relative.
    """
    u = np.array(u0, dtype=float)
    f, g = fun(u)
    if not math.isfinite(f) or not np.all(np.isfinite(g)):
        return u, math.inf
    s_hist: list[np.ndarray] = []
    y_hist: list[np.ndarray] = []
    for it in range(max_iter):
        if float(np.max(np.abs(g))) < gtol:
            break
        d = -_two_loop(g, s_hist, y_hist)
        slope = float(g @ d)
        if slope >= 0:  # not a descent direction: restart from steepest descent
            s_hist.clear()
            y_hist.clear()
            d, slope = -g, -float(g @ g)
        step = 1.0 if s_hist else min(1.0, 1.0 / max(float(np.max(np.abs(g))), 1e-12))
        for _ in range(30):
            u_new = u + step * d
            f_new, g_new = fun(u_new)
            if (math.isfinite(f_new) and np.all(np.isfinite(g_new))
                    and f_new <= f + 1e-4 * step * slope):
                break
            step *= 0.5
        else:
            break
        s, yv = u_new - u, g_new - g
        if float(s @ yv) > 1e-10:
            s_hist.append(s)
            y_hist.append(yv)
            if len(s_hist) > memory:
                s_hist.pop(0)
                y_hist.pop(0)
        done = f - f_new <= ftol * max(1.0, abs(f))
        u, f, g = u_new, f_new, g_new
        if done and it > 0:
            break
    return u, f


def _two_loop(g: np.ndarray, s_hist: list[np.ndarray], y_hist: list[np.ndarray]) -> np.ndarray:
    """The L-BFGS approximation of the inverse Hessian applied to `g`."""
    q = g.copy()
    alphas = []
    for s, yv in zip(reversed(s_hist), reversed(y_hist), strict=True):
        rho = 1.0 / float(yv @ s)
        a = rho * float(s @ q)
        alphas.append((rho, a))
        q -= a * yv
    if s_hist:
        q *= float(s_hist[-1] @ y_hist[-1]) / float(y_hist[-1] @ y_hist[-1])
    for (s, yv), (rho, a) in zip(zip(s_hist, y_hist, strict=True), reversed(alphas),
                                 strict=True):
        b = rho * float(yv @ q)
        q += (a - b) * s
    return q


def _to_free(theta: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    p = np.clip((theta - lo) / (hi - lo), 1e-6, 1.0 - 1e-6)
    return np.log(p / (1.0 - p))


def _from_free(u: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """theta within the bounds, and d theta / d u."""
    p = 1.0 / (1.0 + np.exp(-np.clip(u, -50.0, 50.0)))
    return lo + (hi - lo) * p, (hi - lo) * p * (1.0 - p)


def fit_theta(x: np.ndarray, y: np.ndarray, starts: list[np.ndarray],
              max_iter: int = 40) -> np.ndarray:
    """The MAP hyperparameters for data `(x, y)`: the best of an L-BFGS run from each start.

    Starts are clipped into the bounds; the result lies within them. When no start gives a
    finite objective the first start (clipped) is returned.
    """
    lo, hi = bounds(x.shape[1])

    def objective(u: np.ndarray) -> tuple[float, np.ndarray]:
        theta, dtheta = _from_free(u, lo, hi)
        try:
            value, grad = neg_log_posterior(theta, x, y)
        except GPError:
            return math.inf, np.zeros_like(u)
        return value, grad * dtheta

    best_u, best_f = _to_free(np.asarray(starts[0], dtype=float), lo, hi), math.inf
    for start in starts:
        u, f = lbfgs(objective, _to_free(np.asarray(start, dtype=float), lo, hi), max_iter)
        if f < best_f:
            best_u, best_f = u, f
    return _from_free(best_u, lo, hi)[0]


# --- the posterior -------------------------------------------------------------------------


class Posterior:
    """The GP posterior given data `(x, y)` and hyperparameters `theta`.

    `predict` gives the mean and the variance of the latent f (no noise). `with_pending`
    conditions on fantasised observations at pending points. Raises GPError (from the
    constructor) when the kernel matrix cannot be factorised.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, theta: np.ndarray):
        self.x, self.y, self.theta = x, y, np.asarray(theta, dtype=float)
        _, self.signal, self.noise = _split(self.theta)
        k = kernel(x, x, self.theta) + self.noise * np.eye(len(x))
        self.k_inv = _inverse_from_cholesky(_cholesky(k, self.signal))
        self.alpha = self.k_inv @ y
        # Fantasy conditioning (see `with_pending`): none until set.
        self._pending: np.ndarray | None = None
        self._pending_gain: np.ndarray | None = None
        self._pending_shift: np.ndarray | None = None
        self._pending_cov_inv: np.ndarray | None = None

    def _base(self, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Mean, variance and ``k(xs, x) K^-1`` before any fantasies."""
        k_s = kernel(xs, self.x, self.theta)
        mean = k_s @ self.alpha
        b = k_s @ self.k_inv
        var = self.signal - (b * k_s).sum(1)
        return mean, var, b

    def with_pending(self, pending: np.ndarray, values: np.ndarray) -> None:
        """Condition later predictions on noisy observations `values` at `pending` (rows).

        Equivalent to refitting the posterior with the pending points added to the data
        (same hyperparameters); ``values = mean(pending)`` is the kriging believer (the mean
        does not change, the variance shrinks near the pending points), a lower value a
        constant liar. An empty `pending` removes the conditioning.
        """
        if len(pending) == 0:
            self._pending = None
            return
        mean_p, _, b_p = self._base(pending)
        cov_pp = kernel(pending, pending, self.theta) - b_p @ kernel(self.x, pending, self.theta)
        a = cov_pp + self.noise * np.eye(len(pending))
        a_inv = _inverse_from_cholesky(_cholesky(0.5 * (a + a.T), self.signal))
        self._pending = pending
        self._pending_cov_inv = a_inv
        self._pending_gain = b_p
        self._pending_shift = a_inv @ (np.asarray(values, dtype=float) - mean_p)

    def predict(self, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean and latent variance (at least 1e-12 * signal) at the rows of `xs`,
        conditioned on the pending points (`with_pending`) if any."""
        mean, var, b = self._base(xs)
        if self._pending is not None:
            assert self._pending_cov_inv is not None and self._pending_shift is not None
            c = kernel(xs, self._pending, self.theta) - b @ kernel(self.x, self._pending,
                                                                    self.theta)
            mean = mean + c @ self._pending_shift
            var = var - ((c @ self._pending_cov_inv) * c).sum(1)
        return mean, np.maximum(var, 1e-12 * self.signal)


# --- expected improvement ------------------------------------------------------------------

# Numerical Recipes' erfc approximation (fractional error below 1.2e-7 everywhere):
# erfc(x) = t exp(-x^2 + P(t)), t = 1 / (1 + x/2), x >= 0.
_ERFC_COEFFS = (-1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806, 0.27886807,
                -1.13520398, 1.48851587, -0.82215223, 0.17087277)


def _erfc_poly(t: np.ndarray) -> np.ndarray:
    p = np.zeros_like(t)
    for c in reversed(_ERFC_COEFFS):
        p = p * t + c
    return p


def normal_cdf(z: np.ndarray) -> np.ndarray:
    """The standard normal CDF, elementwise, to about 1e-7 relative."""
    z = np.asarray(z, dtype=float)
    x = np.abs(z) / math.sqrt(2.0)
    t = 1.0 / (1.0 + 0.5 * x)
    half_erfc = 0.5 * t * np.exp(-x * x + _erfc_poly(t))
    return np.where(z < 0, half_erfc, 1.0 - half_erfc)


def log_expected_improvement(mean: np.ndarray, var: np.ndarray, best: float) -> np.ndarray:
    """log E[max(f - best, 0)] for f ~ N(mean, var), elementwise, finite for every input.

    With z = (mean - best) / sd: EI = sd * h(z), h(z) = phi(z) + z Phi(z). For z < 0 it is
    computed as phi(z) * (1 - |z| R(|z|)), R the Mills ratio (taken from the erfc
    approximation, so nothing underflows), and by its asymptotic series for z < -25, where
    that difference loses its digits.
    """
    sd = np.sqrt(var)
    z = (mean - best) / sd
    log_phi = -0.5 * z * z - 0.5 * LOG_2PI
    az = np.abs(z)
    t = 1.0 / (1.0 + 0.5 * az / math.sqrt(2.0))
    mills = 0.5 * t * np.exp(_erfc_poly(t)) * math.sqrt(2.0 * math.pi)  # Phi(-|z|) / phi(z)
    with np.errstate(divide="ignore", invalid="ignore"):
        neg = 1.0 - az * mills
        inv2 = 1.0 / np.maximum(z * z, 1.0)
        series = inv2 * (1.0 - 3.0 * inv2 + 15.0 * inv2 * inv2)
        neg = np.where(z < -25.0, series, neg)
        pos = np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi) + z * normal_cdf(z)
        log_h = np.where(z < 0, log_phi + np.log(np.maximum(neg, 1e-300)),
                         np.log(np.maximum(pos, 1e-300)))
    return np.log(sd) + log_h
