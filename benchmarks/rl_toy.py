"""The tutorial's toy problem: RL searcher against random search, offline (no engine).

The reward is the tutorial's mixture of two gaussians on a 100 x 100 grid; x and y are each a
`Categorical` of 0..99 and a trial's reward is ``Z[y][x]``. Each run has 300 trials with two
in flight at a time (suggest two, then repeatedly observe the oldest and suggest a new one),
the RL searcher with the tutorial's ``controller_batch_size=4, controller_lr=5e-3``.

Prints, per seed, the best reward and the mean reward of the last 100 trials of both searchers,
then their medians, how many seeds reach 0.98, and the per-call timings (suggest and observe
averaged over 400 trials, observe including the updates). Usage:
``python benchmarks/rl_toy.py [seeds]`` (20 seeds by default).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections import deque

import numpy as np

from tuned.core.searchers.rl import RLSearcher
from tuned.core.space import Categorical, Space

TRIALS = 300
IN_FLIGHT = 2


def reward_grid() -> np.ndarray:
    """The tutorial's Z: Z[y][x] for x, y in 0..99."""
    x, y = np.linspace(0, 99, 100), np.linspace(0, 99, 100)
    xs, ys = np.meshgrid(x, y)
    z = np.zeros(xs.shape)
    for x0, y0, xalpha, yalpha, amp in [(20, 70, 35, 40, 1), (80, 40, 20, 20, 0.7)]:
        z += amp * np.exp(-((xs - x0) / xalpha) ** 2 - ((ys - y0) / yalpha) ** 2)
    return z


def toy_space() -> Space:
    return Space({"x": Categorical(*range(100)), "y": Categorical(*range(100))})


def run_rl(z: np.ndarray, seed: int, **options: float) -> tuple[list[float], RLSearcher]:
    """The rewards of one RL run, in the order the trials finished, and the searcher."""
    searcher = RLSearcher(toy_space(), seed=seed, controller_batch_size=4,
                          controller_lr=5e-3, **options)
    flight: deque[tuple[int, dict]] = deque()
    rewards: list[float] = []
    next_id = 0
    while len(rewards) < TRIALS:
        while len(flight) < IN_FLIGHT and next_id < TRIALS:
            flight.append((next_id, searcher.suggest(next_id)))
            next_id += 1
        trial_id, config = flight.popleft()
        score = float(z[config["y"]][config["x"]])
        searcher.observe(trial_id, config, score, final=True)
        rewards.append(score)
    return rewards, searcher


def run_random(z: np.ndarray, seed: int) -> list[float]:
    """The rewards of 300 configurations sampled uniformly from the same space."""
    rng = np.random.default_rng(seed)
    space = toy_space()
    return [float(z[c["y"]][c["x"]]) for c in (space.sample(rng) for _ in range(TRIALS))]


def timings(z: np.ndarray) -> dict[str, float]:
    """Mean microseconds of suggest, observe (including updates) and state_dict + json.dumps."""
    searcher = RLSearcher(toy_space(), seed=0, controller_batch_size=4, controller_lr=5e-3)
    t_suggest = t_observe = 0.0
    n = 400
    for i in range(n):
        t0 = time.perf_counter()
        config = searcher.suggest(i)
        t1 = time.perf_counter()
        searcher.observe(i, config, float(z[config["y"]][config["x"]]))
        t2 = time.perf_counter()
        t_suggest += t1 - t0
        t_observe += t2 - t1
    t0 = time.perf_counter()
    for _ in range(20):
        text = json.dumps(searcher.state_dict())
    t_state = (time.perf_counter() - t0) / 20
    t0 = time.perf_counter()
    for _ in range(20):
        searcher.load_state_dict(json.loads(text))
    t_load = (time.perf_counter() - t0) / 20
    return {"suggest_us": t_suggest / n * 1e6, "observe_us": t_observe / n * 1e6,
            "state_dict+dumps_ms": t_state * 1e3, "loads+load_state_dict_ms": t_load * 1e3,
            "state_kib": len(text) / 1024}


def main(seeds: int = 20) -> None:
    z = reward_grid()
    rows = []
    print(f"{'seed':>4} {'rl best':>8} {'rl last100':>10} {'rnd best':>8} {'rnd last100':>11}")
    for seed in range(seeds):
        rl, _ = run_rl(z, seed)
        rnd = run_random(z, seed)
        row = (max(rl), statistics.mean(rl[-100:]), max(rnd), statistics.mean(rnd[-100:]))
        rows.append(row)
        print(f"{seed:>4} {row[0]:8.4f} {row[1]:10.4f} {row[2]:8.4f} {row[3]:11.4f}")
    med = [statistics.median(col) for col in zip(*rows, strict=True)]
    print(f"{'med':>4} {med[0]:8.4f} {med[1]:10.4f} {med[2]:8.4f} {med[3]:11.4f}")
    ok_rl = sum(r[0] >= 0.98 for r in rows)
    ok_random = sum(r[2] >= 0.98 for r in rows)
    ok_mean = sum(r[1] > r[3] for r in rows)
    print(f"best >= 0.98 in {ok_rl}/{seeds} seeds for rl, {ok_random}/{seeds} for random; "
          f"rl last-100 mean > random's in {ok_mean}/{seeds} seeds")
    print("timings:", {k: round(v, 2) for k, v in timings(z).items()})


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20)
