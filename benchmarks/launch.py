"""Trial launch latency: from the moment a trial is launched to the first line of its function.

    python benchmarks/launch.py [--launches 100] [--daemon-trials 50] [--entry-imports MOD,...]
                                [--methods fork,spawn] [--pause 0.02] [--no-daemon]

The training function (a file written to a temporary folder) reads CLOCK_MONOTONIC as its
first statement and reports that value; CLOCK_MONOTONIC is one clock for every process of
the machine, so it compares with the benchmark's own reading taken just before the launch.
With --entry-imports the entry file imports those modules first (numpy, say), as a real
training script would; that import is the user's own cost, paid once by the template with
"fork" and by every trial with "spawn". (--entry-imports numpy.random also shows what a
forked trial costs when the template has numpy.random loaded: tuned.trial.worker seeds numpy's
global generator in every trial, and numpy >= 2 imports numpy.random on that first use,
after the fork, unless something imported it before.)

Three measurements:

1. Executor: a `tuned.executors.template.TemplateExecutor` (the daemon's executor: a template
   process that imported the entry forks each trial) driven directly, one trial at a time,
   for each start method; and, for reference, the in-process API's executor (a fork server
   forked from the calling process, `ForkServerExecutor`) with a spare forked ahead.
   Per launch: `launch()` itself (for the template: asking
   the template to fork and hearing back its pid), and launch to the function's first line.
   Each trial reports once, is answered "continue", returns, and is reaped; --pause seconds
   pass before the next launch.
2. The entry's import time in a fresh interpreter (what "fork" saves each trial and "spawn"
   pays each time), and `python -c pass` for scale.
3. Through a running daemon (`tuned serve`, one trial at a time, max_concurrent = 1): submit
   to the first trial's function (the template's start included), and trial turnaround:
   from the moment a trial's report was answered (it then returns and exits) to the first
   line of the next trial's function: the trial's end, the daemon's bookkeeping and the
   next launch.

Prints median, p90, min and max in milliseconds, and the target: fork launch <= 10 ms median
beyond the user's import time (which "fork" does not pay per trial).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from served import ServedDaemon

ENTRY_FILE = "launch_entry.py"
TIMES_ENV = "TUNED_LAUNCH_TIMES"
TARGET_MS = 10.0

ENTRY_SOURCE = '''"""Reports when it starts (CLOCK_MONOTONIC), then returns."""
import os
import time
{imports}

def train(args, reporter):
    started = time.monotonic()
    reporter(started=started, accuracy=1.0)
    answered = time.monotonic()
    path = os.environ.get("{env}")
    if path:
        with open(path, "a") as f:
            f.write(f"{{started!r}} {{answered!r}}\\n")
'''


def write_entry(folder: str, imports: list[str]) -> str:
    """Write the entry file into `folder`; return its "file.py:function" entry."""
    lines = "\n".join(f"import {m}  # noqa: F401" for m in imports)
    with open(os.path.join(folder, ENTRY_FILE), "w", encoding="utf-8") as f:
        f.write(ENTRY_SOURCE.format(imports=lines, env=TIMES_ENV))
    return f"{ENTRY_FILE}:train"


# -- 1. executors ----------------------------------------------------------------------------


class Launch(NamedTuple):
    """One launch: seconds spent in `launch()`, and from the launch to the function's start."""

    call: float
    start: float


def _follow(executor: Any, trial_id: int, deadline: float) -> float:
    """Answer the trial's report, wait for its exit; return the `started` it reported."""
    from tuned.protocol.channel import Exited, Message

    started = None
    while time.monotonic() < deadline:
        for event in executor.poll(1.0):
            if isinstance(event, Message) and event.body is None:
                raise RuntimeError(f"trial {trial_id}: {event.error}")
            if isinstance(event, Message) and "seq" in event.body:
                started = float(event.body["metrics"]["started"])
                executor.send(trial_id, {"seq": event.body["seq"], "decision": "continue"})
            elif isinstance(event, Exited):
                if event.code != 0 or started is None:
                    raise RuntimeError(f"trial {trial_id} exited with {event.code} "
                                       "without reporting (see its log)")
                return started
    raise RuntimeError(f"trial {trial_id} did not finish in time")


def run_launches(executor: Any, count: int, pause: float, logs: str,
                 before: Callable[[], None] = lambda: None) -> list[Launch]:
    """Launch `count` trials one after the other (plus one not counted, a warm-up)."""
    from tuned.engine.executor import TrialOrder

    launches = []
    for i in range(count + 1):
        before()
        time.sleep(pause)
        order = TrialOrder(i, i, 1, {"x": 0.5}, i, log_path=os.path.join(logs, f"trial-{i}.log"))
        t0 = time.monotonic()
        executor.launch(order)
        t1 = time.monotonic()
        started = _follow(executor, i, t1 + 120)
        if i:
            launches.append(Launch(t1 - t0, started - t0))
    return launches


def measure_template(entry: str, folder: str, method: str, count: int, pause: float,
                     spare: bool = False) -> list[Launch]:
    """Launches by a TemplateExecutor with `start_method` = `method`. With `spare`, a child
    is forked ahead of each launch (`spares = 1`, `prepare()`), as the daemon and the
    in-process engine do while an experiment may still launch trials."""
    from tuned.executors.template import TemplateExecutor

    logs = tempfile.mkdtemp(prefix=f"{method}-", dir=folder)
    executor = TemplateExecutor(entry, folder, {}, os.path.join(logs, "template.log"),
                                start_method=method)
    executor.spares = 1 if spare else 0
    try:
        return run_launches(executor, count, pause, logs,
                            before=executor.prepare if spare else lambda: None)
    finally:
        executor.shutdown()
        executor.close()


def measure_local(entry: str, folder: str, count: int, pause: float) -> list[Launch]:
    """Launches by the in-process API's executor (a fork server forked from this process)
    with a spare forked beforehand, as the engine asks for one while it waits."""
    from tuned.executors.template import ForkServerExecutor
    from tuned.experiment.files import resolve_entry
    from tuned.trial.worker import make_runner

    fn, _, constants = resolve_entry(entry, folder)
    logs = tempfile.mkdtemp(prefix="local-", dir=folder)
    executor = ForkServerExecutor(make_runner(fn, constants), spares=1)
    try:
        return run_launches(executor, count, pause, logs, before=executor.prepare)
    finally:
        executor.shutdown()
        executor.close()


# -- 2. import times -------------------------------------------------------------------------

IMPORT_PROBE = """import importlib.util, sys, time
t = time.perf_counter()
spec = importlib.util.spec_from_file_location("launch_entry", sys.argv[1])
spec.loader.exec_module(importlib.util.module_from_spec(spec))
print(time.perf_counter() - t)
"""


def entry_import_seconds(folder: str, runs: int) -> list[float]:
    """The entry file's import time in fresh interpreters (the user's own cost)."""
    path = os.path.join(folder, ENTRY_FILE)
    return [float(subprocess.run([sys.executable, "-c", IMPORT_PROBE, path], check=True,
                                 capture_output=True, text=True).stdout)
            for _ in range(runs)]


# What `python -m tuned.trial.template --trial` imports before the entry (see that module).
SPAWN_IMPORTS = ("import tuned.trial.template, tuned.experiment.files, tuned.trial.worker, "
                 "numpy.random")


def process_seconds(argv: list[str], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(argv, check=True)
        times.append(time.perf_counter() - t)
    return times


# -- 3. through the daemon -------------------------------------------------------------------


def spec_text(name: str, entry: str, trials: int, method: str) -> str:
    return json.dumps({
        "name": name, "entry": entry, "num_trials": trials, "max_concurrent": 1,
        "start_method": method, "searcher": "random", "scheduler": "fifo", "seed": 0,
        "reward_attr": "accuracy", "time_attr": "started",
        "space": {"x": {"type": "real", "lower": 0.0, "upper": 1.0}}})


class DaemonRun(ServedDaemon):
    """`tuned serve` on a fresh state directory, its trials writing their times to a file."""

    def __init__(self, folder: str):
        self.times = os.path.join(folder, "times.txt")
        super().__init__(folder, {TIMES_ENV: self.times})

    def experiment(self, name: str, entry: str, folder: str, trials: int,
                   method: str) -> dict[str, Any]:
        """Submit, wait for the end; the submit's duration and the trials' times."""
        if os.path.exists(self.times):
            os.unlink(self.times)
        began = time.monotonic()
        submitted, state = self.submit_and_wait(name, spec_text(name, entry, trials, method),
                                                folder)
        if state["state"] != "COMPLETED" or state["trials"].get("COMPLETED") != trials:
            raise RuntimeError(f"experiment {name} ended {state}")
        with open(self.times, encoding="utf-8") as f:
            rows = sorted(tuple(map(float, line.split())) for line in f)
        return {"submit": submitted, "first": rows[0][0] - began,
                "turnaround": [b[0] - a[1] for a, b in itertools.pairwise(rows)]}


# -- printing --------------------------------------------------------------------------------


def stats(values: list[float]) -> str:
    """'median  p90  min  max' in ms."""
    ms = sorted(v * 1e3 for v in values)
    p90 = statistics.quantiles(ms, n=10)[-1] if len(ms) > 1 else ms[0]
    return (f"{statistics.median(ms):9.2f} {p90:9.2f} {ms[0]:9.2f} {ms[-1]:9.2f}"
            f"   (n={len(ms)})")


def row(label: str, values: list[float]) -> None:
    print(f"  {label:<50}{stats(values)}")


def header(title: str) -> None:
    print(f"\n{title}")
    print(f"  {'':<50}{'median':>9} {'p90':>9} {'min':>9} {'max':>9}   ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launches", type=int, default=100,
                        help="launches per executor and start method")
    parser.add_argument("--daemon-trials", type=int, default=50,
                        help="trials per experiment through the daemon (0: skip)")
    parser.add_argument("--methods", default="fork,spawn", help="start methods to measure")
    parser.add_argument("--entry-imports", default="",
                        help="modules the entry file imports first, comma-separated")
    parser.add_argument("--pause", type=float, default=0.02,
                        help="seconds between one trial's exit and the next launch")
    parser.add_argument("--spawn-launches", type=int, default=None,
                        help="launches for 'spawn' (default: --launches)")
    cli = parser.parse_args()
    methods = [m for m in cli.methods.split(",") if m]
    imports = [m for m in cli.entry_imports.split(",") if m]
    if cli.launches < 2 or any(m not in ("fork", "spawn") for m in methods):
        parser.error("--launches >= 2; --methods from fork, spawn")

    folder = tempfile.mkdtemp(prefix="tuned-launch-")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
    print(f"machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}; "
          f"entry imports: {', '.join(imports) or 'nothing but os, time'}")
    try:
        entry = write_entry(folder, imports)
        results: dict[str, list[Launch]] = {}
        for method in methods:
            n = cli.spawn_launches if method == "spawn" and cli.spawn_launches else cli.launches
            print(f"  template executor, {method}: {n} launches ...", flush=True)
            results[method] = measure_template(entry, folder, method, n, cli.pause)
        if "fork" in methods:
            print(f"  template executor, fork, spare forked ahead: {cli.launches} launches ...",
                  flush=True)
            results["fork+spare"] = measure_template(entry, folder, "fork", cli.launches,
                                                     cli.pause, spare=True)
        print(f"  in-process fork server (spare forked ahead): {cli.launches} launches ...",
              flush=True)
        results["local"] = measure_local(entry, folder, cli.launches, cli.pause)
        user = entry_import_seconds(folder, 11)
        bare = process_seconds([sys.executable, "-c", "pass"], 11)
        spawned = process_seconds([sys.executable, "-c", SPAWN_IMPORTS], 11)
        daemon = {}
        if cli.daemon_trials > 1:
            run = DaemonRun(folder)
            try:
                for method in methods:
                    print(f"  daemon, {method}: {cli.daemon_trials} trials ...", flush=True)
                    daemon[method] = run.experiment(f"launch-{method}", entry, folder,
                                                    cli.daemon_trials, method)
            finally:
                run.stop()
        report(results, user, bare, spawned, daemon)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def report(results: dict[str, list[Launch]], user: list[float], bare: list[float],
           spawned: list[float], daemon: dict[str, dict[str, Any]]) -> None:
    header("Executor, launch to the function's first line (one trial at a time):")
    names = {"fork": "template, fork (as the daemon launches)",
             "spawn": "template, spawn (as the daemon launches)",
             "fork+spare": "template, fork, a child forked ahead (as the daemon keeps one)",
             "local": "in-process fork server, a spare forked ahead"}
    for key, launches in results.items():
        print(f"  {names[key]}")
        row("  launch to the function's first line", [x.start for x in launches])
        row("  of which launch() itself", [x.call for x in launches])
    header("For scale (fresh interpreters):")
    row("the entry's import (the user's own cost)", user)
    row("python -c pass", bare)
    row("python: tuned's imports in a spawned trial", spawned)
    if daemon:
        header("Through the daemon (max_concurrent = 1):")
        for method, d in daemon.items():
            print(f"  {method}: submit answered after {d['submit'] * 1e3:.0f} ms (the template "
                  f"loaded the entry); first trial's function started "
                  f"{d['first'] * 1e3:.0f} ms after the submit")
            row(f"{method}: report answered -> next trial's first line", d["turnaround"])
    if "fork" in results:
        m = statistics.median(x.start for x in results["fork"]) * 1e3
        print(f"\nTarget: {'PASS' if m <= TARGET_MS else 'FAIL'}  fork launch to first line "
              f"median {m:.2f} ms (<= {TARGET_MS:g} ms beyond the user's import, which the "
              "template paid once)")


if __name__ == "__main__":
    main()
