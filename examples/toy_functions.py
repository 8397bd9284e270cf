"""The tutorial's toy training functions as an importable module.

Daemon specs name them as ``examples/toy_functions.py:train_fn`` (or, with ``examples`` on
the path, ``toy_functions:rl_simulation``); the in-process API can import them too.
"""

import numpy as np

import tuned


@tuned.args(
    lr=tuned.space.Real(1e-3, 1e-2, log=True),
    wd=tuned.space.Real(1e-3, 1e-2),
    epochs=10)
def train_fn(args, reporter):
    """The tutorial's dummy training: accuracy rises noisily with the epochs."""
    for e in range(args.epochs):
        dummy_accuracy = 1 - np.power(1.8, -np.random.uniform(e, 2 * e))
        reporter(epoch=e + 1, accuracy=dummy_accuracy, lr=args.lr, wd=args.wd)


def gaussian2d(x, y, x0, y0, xalpha, yalpha, A):
    return A * np.exp(-((x - x0) / xalpha) ** 2 - ((y - y0) / yalpha) ** 2)


def reward_surface() -> np.ndarray:
    """The tutorial's reward: a mixture of two gaussians on a 100 x 100 grid, Z[y][x]."""
    x, y = np.linspace(0, 99, 100), np.linspace(0, 99, 100)
    X, Y = np.meshgrid(x, y)
    Z = np.zeros(X.shape)
    for p in [(20, 70, 35, 40, 1), (80, 40, 20, 20, 0.7)]:
        Z += gaussian2d(X, Y, *p)
    return Z


Z = reward_surface()


@tuned.args(
    x=tuned.space.Categorical(*list(range(100))),
    y=tuned.space.Categorical(*list(range(100))),
)
def rl_simulation(args, reporter):
    """One report: the reward at (x, y)."""
    reporter(accuracy=Z[args.y][args.x])
