"""The tutorial end to end, and the engine's per-trial costs.

    python benchmarks/tutorial.py [--repeat N]

Prints:
- wall time of the whole tutorial (examples/search_algorithms.py), and of each experiment
  (FIFO 20x10 epochs, Hyperband 100, random 300, RL 300), median of N runs;
- trial launch overhead: from the engine deciding to launch a trial to the training function
  starting in its forked process (store insert, fork, process group, log redirection);
- reporter() round trip: from the call in the trial to its return, the report stored durably
  (synchronous=FULL) with its decision before the answer;
- the same fsync-bound floor measured on this disk, for scale.

The original system (AutoGluon, the tutorial's printed output) shows 19 s for the RL run.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TUTORIAL = os.path.join(HERE, "..", "examples", "search_algorithms.py")
SECTION = re.compile(r"^== (.+?) \((\d+\.\d+) s\)$")


def run_tutorial() -> dict[str, float]:
    """Seconds per experiment and in total, from the tutorial script's section stamps."""
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, TUTORIAL, "--out", out], capture_output=True,
                              text=True, check=True)
        total = time.perf_counter() - start
    stamps = [(m.group(1), float(m.group(2))) for line in proc.stdout.splitlines()
              if (m := SECTION.match(line))]
    times = {name.split(":")[0]: stamps[i + 1][1] - t for i, (name, t) in enumerate(stamps[:-1])}
    times["whole tutorial (process wall time)"] = total
    return times


def engine_costs(trials: int, reports: int, slots: int) -> tuple[list[float], list[float]]:
    """(launch overheads, report round trips) in seconds from an in-process FIFO run with
    `slots` trials at a time."""
    import tuned as ag
    from tuned.engine import engine

    launches: dict[int, float] = {}
    original = engine.Engine._launch

    def timed_launch(self, trial):
        launches[trial.number] = time.perf_counter()
        return original(self, trial)

    engine.Engine._launch = timed_launch

    @ag.args(x=ag.space.Real(0, 1), n=reports)
    def fn(args, reporter):
        started = time.perf_counter()
        rtt = 0.0
        for i in range(args.n):
            t = time.perf_counter()
            reporter(epoch=i + 1, accuracy=args.x, started=started, rtt=rtt)
            rtt = time.perf_counter() - t
        print(f"last_rtt {rtt}")

    try:
        with tempfile.TemporaryDirectory() as d:
            s = ag.scheduler.FIFOScheduler(fn, resource={"num_cpus": 1}, num_trials=trials,
                                           checkpoint=os.path.join(d, "t.db"), seed=0,
                                           max_concurrent=slots)
            s.run()
            history = s.training_history
    finally:
        engine.Engine._launch = original
    overheads = [h[0]["started"] - launches[n] for n, h in history.items()]
    rtts = [r["rtt"] for h in history.values() for r in h[1:]]
    return overheads, rtts


def commit_floor(n: int = 500) -> float:
    """Median seconds of a bare SQLite commit of one report row (WAL, synchronous=FULL)."""
    import sqlite3

    with tempfile.TemporaryDirectory(dir=HERE) as d:
        c = sqlite3.connect(os.path.join(d, "f.db"), isolation_level=None)
        c.execute("PRAGMA journal_mode=WAL")
        c.execute("PRAGMA synchronous=FULL")
        c.execute("CREATE TABLE r (t INTEGER, s INTEGER, m TEXT, PRIMARY KEY (t, s))")
        times = []
        for i in range(n):
            t = time.perf_counter()
            c.execute("BEGIN IMMEDIATE")
            c.execute("INSERT INTO r VALUES (1, ?, '{\"accuracy\": 0.5}')", (i,))
            c.execute("COMMIT")
            times.append(time.perf_counter() - t)
        c.close()
    return statistics.median(times)


def fsync_floor(n: int = 300) -> float:
    """Median seconds of one small write + fsync in this folder's file system."""
    with tempfile.NamedTemporaryFile(dir=HERE) as f:
        times = []
        for _ in range(n):
            os.write(f.fileno(), b"x" * 64)
            t = time.perf_counter()
            os.fsync(f.fileno())
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="tutorial runs (median)")
    parser.add_argument("--trials", type=int, default=200, help="trials for engine costs")
    cli = parser.parse_args()

    print(f"machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    print(f"fsync floor on this disk: {fsync_floor() * 1e3:.3f} ms median")
    runs = [run_tutorial() for _ in range(cli.repeat)]
    print(f"\nThe tutorial, median of {cli.repeat} run(s) (seconds):")
    for name in runs[0]:
        values = [r[name] for r in runs]
        print(f"  {name:<40} {statistics.median(values):7.2f}   "
              f"(runs: {', '.join(f'{v:.2f}' for v in values)})")
    print("  original system, RL 300 trials (tutorial's output)      19.00")

    q = statistics.quantiles
    print(f"\nEngine costs ({cli.trials} trials x 10 reports):")
    print(f"  bare SQLite commit of one row (the floor)       {commit_floor() * 1e3:6.3f} ms")
    for slots in (1, 2):
        overheads, rtts = engine_costs(cli.trials, 10, slots)
        print(f"  {slots} slot(s): trial launch overhead   median "
              f"{statistics.median(overheads) * 1e3:6.2f} ms   p90 "
              f"{q(overheads, n=10)[-1] * 1e3:6.2f} ms")
        print(f"  {slots} slot(s): reporter() round trip   median "
              f"{statistics.median(rtts) * 1e3:6.3f} ms   p99 {q(rtts, n=100)[-1] * 1e3:6.3f} ms"
              "   (durable: synchronous=FULL)")


if __name__ == "__main__":
    main()
