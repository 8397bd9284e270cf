"""The daemon at scale: tunectl latency against the size of the store, and the footprint.

    python benchmarks/daemon.py [--sizes 1000,10000,100000] [--reports-per-trial 50]
                                [--repeat 15] [--quick] [--state-dir D] [--idle-seconds 5]
                                [--op-budget 10] [--no-dumps] [--baseline DIR]

The defaults are the issue's scale point: 100,000 trials with 5,000,000 reports (and 1,000
and 10,000 trials to judge the growth). A 5M-report store takes about 0.5 GB: the script
checks the free space first and builds in a temporary folder it deletes at the end.

For each size N it builds a state directory of N finished trials (COMPLETED or STOPPED, with
last_seq/last_reward/score set) of R reports each (metrics {"epoch": e, "accuracy": a}),
spread over four experiments, half of them in the one the per-experiment ops ask about
(EXP), with configurations from a random searcher whose state (every configuration it
suggested) is stored as the engine stores it. Trials go through the Store API (add_trial,
claim_trial, finish_trial, save_searcher_state) and reports through executemany, one
transaction per 10,000 trials, durable only the last. Then it starts `tuned serve` on it
and prints:

- build time and DB bytes per report;
- the daemon's start-up time (until the socket answers);
- median and p90 wall time of whole `tunectl` processes as a user runs them (status,
  status EXP, best EXP, trials EXP and curves EXP with their default page: the last 50
  trials, the 20 best curves; output to /dev/null), beside `python -c pass`,
  `tunectl --version` (the client's own start-up, no request) and a stdlib-only client
  (json + socket) making the status and best requests, for scale; the processes run in
  interleaved rounds, so that a moment of load elsewhere slows every row alike. Where
  this environment writes no bytecode (PYTHONDONTWRITEBYTECODE) status and best run again
  with a bytecode cache, as after a usual install; with --baseline DIR they run again with
  DIR/tuned (another version of the package) first on PYTHONPATH. Notes say what an
  editable install's finder costs every interpreter start;
- the same requests in-process through `tuned.daemon.control.ControlClient` (connect, request,
  answer: the daemon's latency without Python start-up), with each answer's size, plus a
  page from the middle (--offset N/4) and, unless --no-dumps, the whole listings
  (`trials --all`, `curves --all`), whose answers grow with the store by nature;
- how each op grows: the exponent k of time ~ N^k from the smallest to the largest size
  and between the two largest (0: flat, 1: linear);
- at each size: the daemon's RSS (VmRSS) idle after start and after the ops, and the CPU
  time (utime + stime) and wake-ups it used over --idle-seconds idle seconds;
- "targets": tunectl status and best <= 150 ms at 100,000 trials (the largest size when
  100,000 is not measured), the default trials/curves flat (k <= 0.2), idle CPU ~0,
  RSS <= 80 MB; PASS or FAIL with the value.

An op that fails (an error exit, a timeout: e.g. a client of another version that lacks an
option) is shown as failed with its reason and left out of the later rounds. With
--state-dir D the stores are built in D/n<N> and kept; one this script completed with the
same N and R is reused. An op slower than --op-budget seconds (default 10) in all gets
fewer runs (at least 3), marked '*'.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import Any

BIN = os.path.dirname(os.path.abspath(sys.executable))
TUNED = os.path.join(BIN, "tuned")
TUNECTL = os.path.join(BIN, "tunectl")
EXP = "bench-main"
OTHERS = ("bench-b", "bench-c", "bench-d")
CHUNK = 10_000  # trials per build transaction
MARKER = "benchmark-store"  # in each store this script builds: "building" or "complete N R"
TARGET_MS = 150.0
TARGET_RSS_MB = 80.0
TARGET_IDLE_CPU = 0.01  # of one CPU: "about nothing"
TARGET_FLAT_K = 0.2  # growth exponent of the default trials/curves pages: flat (log n at most)
PAGE_OPS = ("trials EXP", "curves EXP")  # the default pages whose growth is a target
BYTES_PER_REPORT = 110  # about what a report takes in the file (for the free-space check)


# -- building a store ------------------------------------------------------------------------


def _spec(name: str, seed: int) -> dict[str, Any]:
    from tuned.core.space import Real, Space
    from tuned.experiment.spec import ExperimentSpec

    space = Space({"lr": Real(1e-3, 1e-2, log=True), "wd": Real(1e-3, 1e-2)})
    return ExperimentSpec.from_dict({
        "name": name, "space": space,
        "entry": "examples/toy_functions.py:train_fn", "num_trials": 1_000_000,
        "reward_attr": "accuracy", "time_attr": "epoch", "seed": seed}).to_dict()


def _split(trials: int) -> dict[str, int]:
    """Half the trials in EXP, the rest over the others."""
    main = trials // 2
    rest = trials - main
    counts = {EXP: main}
    for i, name in enumerate(OTHERS):
        counts[name] = rest // len(OTHERS) + (1 if i < rest % len(OTHERS) else 0)
    return counts


def build(path: str, trials: int, reports: int, seed: int = 0) -> float:
    """Write the store at `path`; return the seconds it took.

    Configurations come from each experiment's random searcher, whose state (it remembers
    every configuration it suggested) is stored as the engine stores it.
    """
    from tuned.core.decisions import Decision, TrialState
    from tuned.core.searchers import make_searcher
    from tuned.experiment.spec import ExperimentSpec
    from tuned.store.database import Store

    rng = random.Random(seed)
    start = time.perf_counter()
    store = Store(path)
    plan = []
    for i, (name, n) in enumerate(_split(trials).items()):
        spec = _spec(name, seed + i)
        space = ExperimentSpec.from_dict(spec).space
        plan.append((store.create_experiment(name, spec).id, n,
                     make_searcher("random", space, seed=seed + i)))
    report_sql = ("INSERT INTO reports (trial_id, seq, time_value, reward, metrics, decision, "
                  "created) VALUES (?, ?, ?, ?, ?, ?, ?)")
    last_sql = ("UPDATE trials SET last_seq = ?, last_time = ?, last_reward = ?, score = ? "
                "WHERE id = ?")
    pid = os.getpid()
    written = 0
    for exp_id, count, searcher in plan:
        for lo in range(0, count, CHUNK):
            hi = min(count, lo + CHUNK)
            written += hi - lo
            with store.transaction(durable=written == trials):
                rows, lasts, ends = [], [], []
                now = time.time()
                for number in range(lo, hi):
                    tid = store.add_trial(exp_id, number, searcher.suggest(number), 0)
                    store.claim_trial(tid, pid)
                    top, rate = rng.uniform(0.5, 0.99), rng.uniform(0.2, 1.0)
                    acc = 0.0
                    for e in range(1, reports + 1):
                        acc = top * (1 - math.exp(-rate * e))
                        rows.append((tid, e, float(e), acc,
                                     f'{{"epoch":{e},"accuracy":{acc!r}}}', "continue", now))
                    stopped = rng.random() < 0.3
                    if stopped and reports:
                        rows[-1] = rows[-1][:5] + (Decision.STOP.value, now)
                    lasts.append((reports, float(reports), acc if reports else None,
                                  acc if reports else None, tid))
                    ends.append((tid, TrialState.STOPPED if stopped else TrialState.COMPLETED))
                store.conn.executemany(report_sql, rows)
                store.conn.executemany(last_sql, lasts)
                for tid, state in ends:
                    store.finish_trial(tid, state)
                store.save_searcher_state(exp_id, searcher.state_dict())
    for exp_id, _, _ in plan:
        store.set_experiment_state(exp_id, "COMPLETED")
    store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    return time.perf_counter() - start


def page_stats(path: str) -> tuple[int | None, int]:
    """(bytes of the reports table's pages (dbstat; None where SQLite lacks it), bytes of
    free pages in the file)."""
    import sqlite3

    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        free = (conn.execute("PRAGMA freelist_count").fetchone()[0]
                * conn.execute("PRAGMA page_size").fetchone()[0])
        try:
            reports = conn.execute(
                "SELECT SUM(pgsize) FROM dbstat WHERE name = 'reports'").fetchone()[0]
        except sqlite3.Error:
            reports = None
        return reports, free
    finally:
        conn.close()


# -- the daemon ------------------------------------------------------------------------------


class Daemon:
    """`tuned serve` in a subprocess of its own session; `stop()` always ends it."""

    def __init__(self, state_dir: str, socket_path: str, log_path: str):
        self.socket_path = socket_path
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.state_dir = state_dir

    def start(self, timeout: float = 120.0) -> float:
        """Start it; return the seconds until the socket answers hello."""
        from tuned.daemon.control import ControlClient, ControlError

        start = time.perf_counter()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [TUNED, "serve", "--state-dir", self.state_dir, "--socket", self.socket_path,
                 "--log-level", "WARNING"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tuned serve exited with {self.proc.returncode}:\n"
                                   + self.log_tail())
            try:
                with ControlClient(self.socket_path, timeout=5) as client:
                    client.hello()
                return time.perf_counter() - start
            except ControlError:
                pass
            if time.perf_counter() - start > timeout:
                raise RuntimeError(f"tuned serve did not answer within {timeout}s:\n"
                                   + self.log_tail())
            time.sleep(0.01)

    def log_tail(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return "".join(f.readlines()[-20:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (every thread)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wakeups(pid: int) -> int:
    """Voluntary context switches of every thread: how often it went to sleep."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total


# -- measuring -------------------------------------------------------------------------------


class Failed(list):
    """The runs of an op that failed: the times of the runs before, and why."""

    def __init__(self, times: list[float], reason: str):
        super().__init__(times)
        self.reason = reason


def timed_runs(fn, repeat: int, budget: float) -> list[float]:
    """Seconds of each of `repeat` calls, after one call not counted (warm-up); fewer (but at
    least min(3, repeat)) when the calls have used `budget` seconds; `Failed` when a call
    raised."""
    return timed_rounds({"": fn}, repeat, budget)[""]


def timed_rounds(fns: dict[str, Any], repeat: int, budget: float) -> dict[str, list[float]]:
    """Like `timed_runs` for several calls at once, interleaved: one warm-up round, then
    `repeat` rounds of one call each, so that a machine busier at some moment slows every
    call alike. A call that has used `budget` seconds leaves the rounds once it has
    min(3, repeat) runs; one that raises leaves them at once, its times a `Failed`."""
    times: dict[str, list[float]] = {label: [] for label in fns}
    spent = {label: 0.0 for label in fns}
    for round_ in range(repeat + 1):
        for label, fn in fns.items():
            done = times[label]
            if isinstance(done, Failed) or (
                    len(done) >= min(3, repeat) and spent[label] >= budget):
                continue
            t = time.perf_counter()
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - shown in the table, not fatal
                times[label] = Failed(done, f"{type(exc).__name__}: {exc}"[:300])
                continue
            elapsed = time.perf_counter() - t
            spent[label] += elapsed
            if round_:  # round 0 is the warm-up
                done.append(elapsed)
    return times


# A client with nothing but the standard library: what a tunectl that imported neither numpy
# nor sqlite_utils (through `import tuned`) would cost, for scale.
STDLIB_CLIENT = """import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(json.dumps(dict(v=1, op=sys.argv[2], **json.loads(sys.argv[3]))).encode() + b"\\n")
parts = []
while not parts or not parts[-1].endswith(b"\\n"):
    data = s.recv(1 << 16)
    if not data:
        break
    parts.append(data)
assert json.loads(b"".join(parts))["ok"]
"""


Op = tuple[str, list[str], dict[str, str] | None]  # label, argv, environment (None: ours)


def process_ops(socket_path: str, work: str, baseline: str | None) -> list[Op]:
    """The whole-process rows: for scale, tunectl as installed, and tunectl with a bytecode
    cache when this environment writes none (see `bytecode_note`); with `baseline`, the
    status and best rows again with that folder's `tuned` first on PYTHONPATH."""
    ctl = [TUNECTL, "--socket", socket_path]
    ops: list[Op] = [
        ("python -c pass", [sys.executable, "-c", "pass"], None),
        ("tunectl --version", [TUNECTL, "--version"], None),
        ("stdlib client: status", [sys.executable, "-c", STDLIB_CLIENT, socket_path,
                                   "status", "{}"], None),
        ("stdlib client: best EXP", [sys.executable, "-c", STDLIB_CLIENT, socket_path,
                                     "best", json.dumps({"experiment": EXP})], None),
        ("tunectl status", ctl + ["status"], None),
        ("tunectl status EXP", ctl + ["status", EXP], None),
        ("tunectl best EXP", ctl + ["best", EXP], None),
        ("tunectl trials EXP", ctl + ["trials", EXP], None),
        ("tunectl curves EXP", ctl + ["curves", EXP], None),
    ]
    if bytecode_note() is not None:
        cached = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        cached["PYTHONPYCACHEPREFIX"] = os.path.join(work, "pycache")
        ops += [("tunectl status, bytecode cached", ctl + ["status"], cached),
                ("tunectl best EXP, bytecode cached", ctl + ["best", EXP], cached)]
    if baseline:
        env = dict(os.environ, PYTHONPATH=os.path.abspath(baseline))
        ops += [("tunectl status [baseline]", ctl + ["status"], env),
                ("tunectl best EXP [baseline]", ctl + ["best", EXP], env)]
    return ops


def bytecode_note() -> str | None:
    """Why tunectl compiles tuned's modules at every start here, or None when it does not:
    this environment writes no bytecode (PYTHONDONTWRITEBYTECODE) and tuned/ holds none."""
    if not os.environ.get("PYTHONDONTWRITEBYTECODE"):
        return None
    import tuned

    cache = os.path.join(os.path.dirname(tuned.__file__), "__pycache__")
    if os.path.isdir(cache) and any(n.startswith("cli.") for n in os.listdir(cache)):
        return None
    return ("PYTHONDONTWRITEBYTECODE is set and tuned/ has no __pycache__, so every tunectl "
            "start compiles tuned's modules from source; the 'bytecode cached' rows ran with "
            "a bytecode cache (PYTHONPYCACHEPREFIX), as after a usual install")


def editable_finder_ms(runs: int = 5) -> float | None:
    """About how many ms of each interpreter start go to importing the finder that an
    editable install (pip install -e, as the Makefile installs) puts in a .pth file (median
    of `python -X importtime -c pass`); None without one."""
    found = []
    for _ in range(runs):
        err = subprocess.run([sys.executable, "-X", "importtime", "-c", "pass"],
                             capture_output=True, text=True).stderr
        found.append(sum(int(line.split("|")[1]) for line in err.splitlines()
                         if line.startswith("import time:")
                         and line.split("|")[2].strip().startswith("__editable__")))
    return statistics.median(found) / 1e3 if any(found) else None


def client_ops(n: int, dumps: bool) -> list[tuple[str, str, dict[str, Any]]]:
    """The in-process requests: what tunectl sends for status, best and the default pages
    (the last 50 trials, the 20 best curves: tuned.cli.PAGE and TOP_CURVES), a page from
    the middle, and with `dumps` the whole listings (--all)."""
    middle = _split(n)[EXP] // 4
    ops: list[tuple[str, str, dict[str, Any]]] = [
        ("status", "status", {}),
        ("status EXP", "status", {"experiment": EXP}),
        ("best EXP", "best", {"experiment": EXP}),
        ("trials EXP", "trials", {"experiment": EXP, "limit": 50, "offset": -50}),
        ("trials EXP, page at 1/4", "trials",
         {"experiment": EXP, "limit": 50, "offset": middle}),
        ("curves EXP", "curves", {"experiment": EXP, "top": 20}),
        ("curves EXP --metric epoch", "curves",
         {"experiment": EXP, "top": 20, "metric": "epoch"}),
    ]
    if dumps:
        ops += [("trials EXP --all", "trials", {"experiment": EXP}),
                ("curves EXP --all", "curves", {"experiment": EXP})]
    return ops


def run_process(argv: list[str], env: dict[str, str] | None = None) -> None:
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {proc.returncode}: "
                           f"{proc.stderr.decode(errors='replace').strip()}")


def client_request(socket_path: str, op: str, args: dict[str, Any]) -> dict[str, Any]:
    """One request on a fresh connection, as tunectl makes it."""
    from tuned.daemon.control import ControlClient

    with ControlClient(socket_path, timeout=120) as client:
        return client.request(op, **args)


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return None


def _write(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")


def prepare_store(n: int, cli, work: str) -> tuple[str, dict[str, Any]]:
    """(the state directory of size `n`, its figures): built, or reused from --state-dir."""
    out: dict[str, Any] = {"n": n, "exp_trials": _split(n)[EXP]}
    state_dir = os.path.join(cli.state_dir or work, f"n{n}")
    db = os.path.join(state_dir, "tuned.db")
    marker = os.path.join(state_dir, MARKER)
    wanted = f"complete {n} {cli.reports_per_trial}"
    if cli.state_dir and _read(marker) == wanted:
        out["build_s"] = None
        print(f"  N={n:,}: reusing {state_dir}", flush=True)
    else:
        if os.path.exists(state_dir):
            if _read(marker) is None:
                raise SystemExit(f"{state_dir} exists and was not made by this benchmark "
                                 f"(no {MARKER}); not touching it")
            shutil.rmtree(state_dir)
        os.makedirs(state_dir, mode=0o700)
        _write(marker, "building")  # an interrupted build is never reused
        print(f"  N={n:,}: building {n:,} trials x {cli.reports_per_trial} reports ...",
              end="", flush=True)
        out["build_s"] = build(db, n, cli.reports_per_trial)
        _write(marker, wanted)
        print(f" {out['build_s']:.1f} s", flush=True)
    out["reports"] = n * cli.reports_per_trial
    out["db_bytes"] = os.path.getsize(db)
    out["reports_bytes"], out["free_bytes"] = page_stats(db)
    return state_dir, out


def measure_size(n: int, cli, work: str, sock_dir: str) -> dict[str, Any]:
    """Every figure of size `n`: the store's, then the daemon's on it."""
    state_dir, out = prepare_store(n, cli, work)
    socket_path = os.path.join(sock_dir, f"n{n}.sock")
    daemon = Daemon(state_dir, socket_path, os.path.join(work, f"daemon-n{n}.log"))
    try:
        out["start_s"] = daemon.start()
        time.sleep(1.0)
        out["rss_start_mb"] = rss_mb(daemon.pid)
        ops = process_ops(socket_path, work, cli.baseline)
        out["process"] = timed_rounds(
            {label: (lambda a=argv, e=env: run_process(a, e)) for label, argv, env in ops},
            cli.repeat, cli.op_budget)
        out["client"], out["answer_bytes"] = {}, {}
        for label, op, args in client_ops(n, not cli.no_dumps):
            out["client"][label] = timed_runs(
                lambda o=op, a=args, lb=label: _sized_request(socket_path, o, a, lb, out),
                cli.repeat, cli.op_budget)
        time.sleep(3.0)  # the daemon gives memory back 2 s after a large answer
        out["rss_after_mb"] = rss_mb(daemon.pid)
        out.update(idle_footprint(daemon.pid, cli.idle_seconds))
    finally:
        daemon.stop()
    return out


def _sized_request(socket_path: str, op: str, args: dict[str, Any], label: str,
                   out: dict[str, Any]) -> None:
    """`client_request`, noting the answer's JSON size in out["answer_bytes"][label]."""
    answer = client_request(socket_path, op, args)
    if label not in out["answer_bytes"]:
        out["answer_bytes"][label] = len(json.dumps(answer, separators=(",", ":")))


def idle_footprint(pid: int, seconds: float) -> dict[str, float]:
    """CPU seconds and wake-ups per second of process `pid` over `seconds` idle seconds."""
    cpu0, wake0, t0 = cpu_seconds(pid), wakeups(pid), time.perf_counter()
    time.sleep(seconds)
    elapsed = time.perf_counter() - t0
    return {"idle_cpu_s": cpu_seconds(pid) - cpu0, "idle_s": elapsed,
            "idle_wakeups_per_s": (wakeups(pid) - wake0) / elapsed}


# -- printing --------------------------------------------------------------------------------


def p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10)[-1] if len(values) > 1 else values[0]


def cell(values: list[float], repeat: int) -> str:
    """'median / p90' in ms; '*' when fewer than `repeat` runs fitted the op's budget;
    'failed (k)' for an op that failed (see the notes below the table, k)."""
    if isinstance(values, Failed):
        return "failed"
    mark = "*" if len(values) < repeat else " "
    return f"{statistics.median(values) * 1e3:8.1f} /{p90(values) * 1e3:7.1f}{mark}"


def fmt_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def exponent(a: dict[str, Any], b: dict[str, Any], group: str, label: str) -> float | None:
    """k in time ~ N^k between results `a` and `b` (None when either has no time)."""
    va, vb = a[group].get(label), b[group].get(label)
    if not va or not vb or isinstance(va, Failed) or isinstance(vb, Failed):
        return None
    ta, tb = statistics.median(va), statistics.median(vb)
    if ta <= 0 or tb <= 0 or a["n"] == b["n"]:
        return None
    return math.log(tb / ta) / math.log(b["n"] / a["n"])


def growth(results: list[dict[str, Any]], group: str, label: str) -> str:
    """'k_all k_last': the exponent k of time ~ N^k from the smallest to the largest size,
    and between the two largest (0: flat, 1: linear); '-' where not measured."""
    if len(results) < 2:
        return f"{'-':>6}{'-':>6}"
    ks = (exponent(results[0], results[-1], group, label),
          exponent(results[-2], results[-1], group, label))
    return "".join(f"{'-':>6}" if k is None else f"{k:6.2f}" for k in ks)


def print_ops(results: list[dict[str, Any]], group: str, repeat: int) -> None:
    """One row per op of `group` ("process" or "client"), a column per size, the growth,
    then the reasons of the ops that failed."""
    head = "".join(f"{'N=' + format(r['n'], ','):>18}" for r in results)
    print(f"  {'':<34}{head}{'k all':>6}{'k last':>7}")
    failures = []
    for label in results[0][group]:
        cells = "".join(f"{cell(r[group][label], repeat):>18}" for r in results)
        print(f"  {label:<34}{cells}{growth(results, group, label)}")
        failures += [(label, r["n"], r[group][label].reason) for r in results
                     if isinstance(r[group][label], Failed)]
    for label, n, reason in failures:
        print(f"  failed: {label} at N={n:,}: " + textwrap.shorten(reason, 160))


def print_startup_notes(cli) -> None:
    """What every process row pays for this installation and environment."""
    finder = editable_finder_ms()
    notes = [bytecode_note()]
    if finder is not None:
        notes.append(f"site: the finder of the editable install (pip install -e, as the "
                     f"Makefile installs) takes about {finder:.0f} ms of every interpreter "
                     "start, python -c pass included (python -X importtime); a regular "
                     "install has none")
    for note in filter(None, notes):
        print("  " + textwrap.fill(note, 94, subsequent_indent="    "))
    if cli.baseline:
        print(f"  [baseline]: {os.path.abspath(cli.baseline)}/tuned first on PYTHONPATH "
              "(both sides' clients against this daemon)")


def print_tables(results: list[dict[str, Any]], cli) -> None:
    w = 18
    head = "".join(f"{'N=' + format(r['n'], ','):>{w}}" for r in results)
    print(f"\nStores ({cli.reports_per_trial} reports per trial; EXP = {EXP}, half the trials):")
    print(f"  {'':<34}{head}")
    rows = [
        ("trials in EXP", lambda r: f"{r['exp_trials']:,}"),
        ("reports", lambda r: f"{r['reports']:,}"),
        ("build time", lambda r: "reused" if r["build_s"] is None else f"{r['build_s']:.2f} s"),
        ("build rate (reports/s)", lambda r: "-" if r["build_s"] is None
         else f"{r['reports'] / r['build_s']:,.0f}"),
        ("DB file", lambda r: fmt_bytes(r["db_bytes"])),
        ("DB bytes per report (whole file)", lambda r: f"{r['db_bytes'] / r['reports']:.0f}"),
        ("  reports table only (dbstat)", lambda r: "-" if r["reports_bytes"] is None
         else f"{r['reports_bytes'] / r['reports']:.0f}"),
        ("  free pages in the file", lambda r: fmt_bytes(r["free_bytes"])),
        ("daemon start until it answers", lambda r: f"{r['start_s'] * 1e3:.0f} ms"),
    ]
    for name, fn in rows:
        print(f"  {name:<34}" + "".join(f"{fn(r):>{w}}" for r in results))

    print(f"\nWhole processes, ms (median / p90 of {cli.repeat}, interleaved; output to "
          "/dev/null):")
    print_ops(results, "process", cli.repeat)
    print_startup_notes(cli)

    print(f"\nIn-process ControlClient, ms (connect + request + answer; median / p90 of "
          f"{cli.repeat}):")
    print_ops(results, "client", cli.repeat)
    print("  answer size (JSON bytes)")
    for label in results[0]["client"]:
        print(f"    {label:<32}" + "".join(
            f"{fmt_bytes(r['answer_bytes'][label]) if label in r['answer_bytes'] else '-':>18}"
            for r in results))
    print("  k all, k last: time ~ N^k from the smallest to the largest size, and between "
          "the two largest (0: independent of N, 1: linear)")
    short = sorted({len(v) for r in results for g in ("process", "client")
                    for v in r[g].values() if len(v) < cli.repeat and not isinstance(v, Failed)})
    if short:
        print(f"  *: fewer runs ({', '.join(map(str, short))}) within --op-budget "
              f"{cli.op_budget:g} s")
    print_footprint(results)
    print_targets(results)


def print_footprint(results: list[dict[str, Any]]) -> None:
    """The daemon's RSS and idle CPU at each size."""
    head = "".join(f"{'N=' + format(r['n'], ','):>18}" for r in results)
    print(f"\nDaemon footprint:\n  {'':<34}{head}")
    rows = [
        ("RSS idle after start (MB)", lambda r: f"{r['rss_start_mb']:.1f}"),
        ("RSS idle after the ops (MB)", lambda r: f"{r['rss_after_mb']:.1f}"),
        ("CPU while idle (ms in s)", lambda r: f"{r['idle_cpu_s'] * 1e3:.0f} in "
                                               f"{r['idle_s']:.0f}"),
        ("wake-ups while idle (/s)", lambda r: f"{r['idle_wakeups_per_s']:.1f}"),
    ]
    for name, fn in rows:
        print(f"  {name:<34}" + "".join(f"{fn(r):>18}" for r in results))


def print_targets(results: list[dict[str, Any]]) -> None:
    """PASS or FAIL for each target, with the value."""
    big = results[-1]
    target = next((r for r in results if r["n"] == 100_000), big)
    print(f"\nTargets (N={target['n']:,}" + ("" if target["n"] == 100_000
                                          else "; 100,000 not measured") + "):")

    def line(ok: bool, text: str) -> None:
        print(f"  {'PASS' if ok else 'FAIL'}  {text}")

    for label in ("tunectl status", "tunectl best EXP"):
        values = target["process"][label]
        m = statistics.median(values) * 1e3 if values else float("nan")
        line(m <= TARGET_MS, f"{label:<22} median {m:6.1f} ms   (<= {TARGET_MS:.0f} ms)")
    for label in PAGE_OPS:
        k = exponent(results[0], big, "client", label)
        line(k is not None and k <= TARGET_FLAT_K,
             f"{label + ' (default)':<22} k = {'-' if k is None else f'{k:.2f}':>5}"
             f"        (flat: <= {TARGET_FLAT_K:g}, in-process)")
    share = big["idle_cpu_s"] / big["idle_s"]
    line(share <= TARGET_IDLE_CPU, f"{'idle daemon CPU':<22} {share:11.2%}      "
         f"(~0: <= {TARGET_IDLE_CPU:.0%} of one CPU)")
    for key, name in (("rss_start_mb", "RSS idle after start"),
                      ("rss_after_mb", "RSS idle after the ops")):
        line(big[key] <= TARGET_RSS_MB,
             f"{name:<22} {big[key]:8.1f} MB   (<= {TARGET_RSS_MB:.0f} MB)")


def check_space(folder: str, sizes: list[int], reports: int) -> None:
    """Exit with a message when `folder`'s file system has not room for the stores (with a
    margin of a half), before anything is built."""
    need = int(sum(sizes) * max(reports, 1) * BYTES_PER_REPORT * 1.5)
    folder = os.path.abspath(folder)
    while not os.path.isdir(folder):  # the nearest folder that exists
        folder = os.path.dirname(folder)
    free = shutil.disk_usage(folder).free
    if free < need:
        sys.exit(f"{folder}: {fmt_bytes(free)} free, the stores need about {fmt_bytes(need)}")


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000",
                        help="trials per store, comma-separated")
    parser.add_argument("--reports-per-trial", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=15, help="runs per op (median, p90)")
    parser.add_argument("--quick", action="store_true", help="sizes 1000,10000")
    parser.add_argument("--state-dir", default=None,
                        help="build (or reuse) the stores in D/n<N> and keep them")
    parser.add_argument("--idle-seconds", type=float, default=5.0,
                        help="idle seconds over which the daemon's CPU is measured, per size")
    parser.add_argument("--no-dumps", action="store_true",
                        help="leave out the whole listings (trials --all, curves --all)")
    parser.add_argument("--baseline", default=None, metavar="DIR",
                        help="also time tunectl status and best with DIR first on PYTHONPATH "
                             "(DIR/tuned: another version, e.g. `git archive HEAD tuned | "
                             "tar -x -C DIR`), interleaved with the rows of this one")
    parser.add_argument("--op-budget", type=float, default=10.0,
                        help="seconds per op and size after which fewer runs suffice "
                             "(at least 3)")
    cli = parser.parse_args()
    sizes = [1000, 10000] if cli.quick else sorted({int(s) for s in cli.sizes.split(",")})
    if cli.repeat < 1 or cli.reports_per_trial < 0 or not sizes or min(sizes) < 1:
        parser.error("--repeat and sizes must be >= 1, --reports-per-trial >= 0")
    for exe in (TUNED, TUNECTL):
        if not os.access(exe, os.X_OK):
            sys.exit(f"{exe} is missing: install the package (pip install -e .) in the "
                     "Python running this script")

    # SIGTERM cleans up like Ctrl-C.
    signal.signal(signal.SIGTERM, _interrupt)
    check_space(cli.state_dir or tempfile.gettempdir(), sizes, cli.reports_per_trial)
    work = tempfile.mkdtemp(prefix="tuned-bench-")
    sock_dir = tempfile.mkdtemp(prefix="tdb-", dir="/tmp")  # 0700, short: sun_path <= 107
    print(f"machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}; "
          f"stores in {cli.state_dir or work}")
    results = []
    started = time.perf_counter()
    try:
        for n in sizes:
            results.append(measure_size(n, cli, work, sock_dir))
        print_tables(results, cli)
        print(f"\n(this benchmark took {time.perf_counter() - started:.0f} s)")
    except KeyboardInterrupt:
        print("\ninterrupted; cleaning up", file=sys.stderr)
        sys.exit(130)
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
