"""Bookkeeping overhead against the peers: many no-op trials, and the sustained report rate.

    python benchmarks/overhead.py [--trials 500] [--daemon-trials 500] [--optuna-trials 100]
                                  [--ray-trials 20] [--throughput-seconds 10] [--lag 0.005]
                                  [--skip overhead,daemon,dask,optuna,optuna-seq,ray,floor,
                                          nosync,throughput]

1. Overhead. N no-op trials of up to 10 reports each (x ~ U(0, 1); report e of 10 is
   {"epoch": e, "accuracy": x * e / 10}), successive halving stopping them (one bracket,
   grace period 1, reduction factor 3, max_t 10), 2 trials at a time:

   - tuned in-process: `HyperbandScheduler` (type stopping); each trial a forked process,
     each report stored with its decision (SQLite WAL, synchronous=FULL) before the trial
     hears it;
   - tuned through the daemon: `tuned serve` on a fresh state directory, the same
     experiment submitted as a spec (each trial forked by the experiment's template process);
   - tuned via Dask: the daemon's spec with ``executor = "dask"``, submitted to a fresh
     `tuned serve --dask-scheduler-file F` connected to a local cluster started for the row
     (`dask scheduler` and 2 `dask worker --nthreads 1 --no-nanny`): each trial a Dask task
     whose trial is forked by the worker's template process and reports to the daemon over
     TCP; when Dask is installed (`pip install -e '.[dask]'`), skipped with a message
     otherwise;
   - Optuna with SQLite storage (`optuna.storages.RDBStorage`, SQLite's default
     synchronous=FULL, rollback journal), `SuccessiveHalvingPruner`, `n_jobs=2` (threads in
     one process, no isolation), and the same sequentially (`n_jobs=1`);
   - Ray Tune with `ASHAScheduler` and default settings (`max_concurrent_trials=2`), when Ray
     is installed (`pip install -e '.[ray]'`); skipped with a message otherwise.

   For each: trials/s and reports/s over the run's wall time (tuned in-process: `run()`;
   the daemon and Dask: the store's first trial created to last trial ended; Optuna:
   `optimize()`; Ray: `Tuner.fit()`, `ray.init()` excluded), the report round trip (the call
   in the trial, to its return) p50 and p99, and the peak memory of the process tree: every
   0.1 s the sum over the measured process and all its descendants (the daemon, its template
   and the trials; for Dask also the scheduler and the workers, their templates and trials;
   the Python process and its trials; Ray's driver, raylet, GCS and workers) of VmRSS and of
   Pss (/proc/PID/smaps_rollup: pages shared by forked processes counted once), the peak of
   each sum. The last column is how many times tuned in-process's trials/s the row's is
   (from this run).

2. Report throughput: 2 trials (FIFO, tuned in-process and through the daemon) calling
   `reporter()` as fast as they can for --throughput-seconds, with report_lag 0 (each call
   waits for its answer) and with report_lag --lag (5 ms: calls go on before their
   answers): durable reports/s sustained (reports answered, over the span from the first
   send to the last answer), the time from each report's send to its answer (p50, p99,
   max; as the trial saw it, at its next call or its final flush) and the calls' own time.
   Beside them, the floor: the same 2 trials (forked processes, the same lag rules, the
   same timing files) sending report lines over Unix sockets to one process that writes
   every line it read to a preallocated file with one fdatasync per batch and answers;
   what any durable report service pays on this machine's disk and scheduler. And tuned
   without fsync: tuned in-process with its store reopened ``durable=False``
   (synchronous=OFF): not durable and held to no target, it shows what the engine's own
   work costs, without the disk.

Each peer runs in a fresh interpreter (a child of this script, which samples its memory);
the trials write their round trips to files (one os.write per report, the same cost in
every peer). The targets: tuned >= 100 trials/s and >= 4x Optuna+SQLite (2 threads); under
a report lag, >= 5,000 durable reports/s sustained with a reporter() call p99 <= 2 ms (the
time a training loop loses per report). The time from a report's send to its durable answer
is a property of the disk: printed beside the floor's, as a ratio to it, with no target.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from typing import Any

from served import ServedDaemon

HERE = os.path.abspath(__file__)
TIMES_ENV = "TUNED_OVERHEAD_TIMES"
MAX_T, GRACE, ETA = 10, 1, 3
TARGET_TRIALS_S, TARGET_RATIO, TARGET_REPORTS_S, TARGET_P99_MS = 100.0, 4.0, 5000.0, 2.0
NOSYNC = "tuned, no fsync"
DASK = "tuned via Dask (2 local workers)"
TARGET_DASK_RATIO = 20.0  # the Dask row's trials/s against Ray Tune with ASHA's

ENTRY_SOURCE = '''"""A no-op trial for benchmarks/overhead.py: 10 reports, or reports for S s."""
import os
import time


def _log(folder, suffix=".txt"):
    return os.open(os.path.join(folder, f"{os.getpid()}-{time.monotonic_ns()}{suffix}"),
                   os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)


def _acknowledged(reporter, since, sent, fd):
    """Log "<when seen> <send to answer seen>" for the reports answered since `since`."""
    now, upto = time.monotonic(), reporter.acknowledged
    if upto > since:
        os.write(fd, "".join(f"{now!r} {now - sent.pop(s)!r}\\n"
                             for s in range(since + 1, upto + 1)).encode())
    return upto


def report_for(seconds, reporter, x, fd):
    """Report as fast as possible for `seconds`: each call's time to `fd`, and each report's
    time from its send to its answer (seen at the next call, or at the final flush) to a
    .ack file beside it."""
    acks = _log(os.environ["TUNED_OVERHEAD_TIMES"], ".ack")
    try:
        end, e, acked, sent = time.monotonic() + seconds, 0, reporter.acknowledged, {}
        while time.monotonic() < end:
            e += 1
            t = sent[e] = time.monotonic()
            reporter(epoch=e, accuracy=x)
            u = time.monotonic()
            os.write(fd, f"{u!r} {u - t!r}\\n".encode())
            acked = _acknowledged(reporter, acked, sent, acks)
        reporter.flush()
        _acknowledged(reporter, acked, sent, acks)
    finally:
        os.close(acks)


def train(args, reporter):
    fd = _log(os.environ["TUNED_OVERHEAD_TIMES"])
    try:
        if args.get("seconds"):
            return report_for(args.seconds, reporter, args.x, fd)
        for e in range(1, 11):
            t = time.monotonic()
            try:
                reporter(epoch=e, accuracy=args.x * e / 10)
            finally:
                u = time.monotonic()
                os.write(fd, f"{u!r} {u - t!r}\\n".encode())
    finally:
        os.close(fd)
'''


# -- the round trips the trials wrote ---------------------------------------------------------


def read_times(folder: str, suffix: str = ".txt") -> tuple[list[float], float]:
    """(round trips in seconds, span from the first call to the last return), from the
    files named *`suffix` (.ack: from each report's send to its answer)."""
    rtts, first, last = [], float("inf"), float("-inf")
    for name in os.listdir(folder):
        if not name.endswith(suffix):
            continue
        with open(os.path.join(folder, name), encoding="ascii") as f:
            for line in f:
                end, rtt = map(float, line.split())
                rtts.append(rtt)
                first, last = min(first, end - rtt), max(last, end)
    return rtts, last - first


def timed_writer(folder: str) -> Any:
    """For the peers' trials: a function that appends one round trip to this trial's file."""
    fd = os.open(os.path.join(folder, f"{os.getpid()}-{threading.get_ident()}-"
                                      f"{time.monotonic_ns()}.txt"),
                 os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def write(start: float) -> None:
        end = time.monotonic()
        os.write(fd, f"{end!r} {end - start!r}\n".encode())

    write.close = lambda: os.close(fd)  # type: ignore[attr-defined]
    return write


# -- memory of a process tree -----------------------------------------------------------------


def _children(pid: int) -> list[int] | None:
    """The children of `pid`, from /proc/PID/task/*/children (a few reads, however many
    processes the machine runs); None where the kernel lacks that file."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    out: list[int] = []
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                out += map(int, f.read().split())
        except FileNotFoundError:
            if not os.path.exists(f"/proc/{pid}/task/{tid}"):
                continue  # the thread ended
            return None
        except OSError:
            continue
    return out


def _descendants_by_scan(root: int) -> list[int]:
    """`root` and its descendants, from the parent pid of every process in /proc."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(b")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def _descendants(root: int) -> list[int]:
    """`root` and its descendants."""
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        kids = _children(pid)
        if kids is None:
            return _descendants_by_scan(root)
        out.append(pid)
        todo += kids
    return out


def _rss_pss_kb(pid: int) -> tuple[int, int]:
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


def _yield_cpu() -> None:
    """Put the calling thread under SCHED_IDLE, so that it runs only when the measured
    processes leave a CPU free: on a 2-core machine a sample (a few ms of CPU) would
    otherwise delay their reports."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        pass


class TreeMemory:
    """Samples the summed VmRSS and Pss of `roots` and their descendants every `interval`
    seconds in a thread; `peak_mb` is (peak RSS, peak PSS) in MB."""

    def __init__(self, *roots: int, interval: float = 0.1):
        self.roots, self.interval = roots, interval
        self.peak = (0, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        _yield_cpu()
        while not self._stop.is_set():
            sums = [_rss_pss_kb(p) for root in self.roots for p in _descendants(root)]
            rss, pss = sum(s[0] for s in sums), sum(s[1] for s in sums)
            self.peak = (max(self.peak[0], rss), max(self.peak[1], pss))
            self._stop.wait(self.interval)

    def stop(self) -> tuple[float, float]:
        self._stop.set()
        self._thread.join()
        return self.peak[0] / 1024, self.peak[1] / 1024


# -- the peers, each in a child interpreter (`--child NAME`) -----------------------------------


def child_tuned(n: int, times: str, seconds: float, lag: float = 0.0,
                durable: bool = True) -> dict[str, Any]:
    """tuned in-process: Hyperband stopping over n trials, or (seconds > 0) FIFO with 2
    trials reporting for `seconds`; `lag`: the spec's report_lag. `durable=False`: the
    store reopened with ``durable=False`` (synchronous=OFF, no group-commit hold), to show
    what the engine's own work costs without the disk."""
    sys.path.insert(0, times + "-entry")
    import overhead_entry

    import tuned as ag

    os.environ[TIMES_ENV] = times
    with tempfile.TemporaryDirectory(prefix="tuned-overhead-") as d:
        common = dict(resource={"num_cpus": 1}, reward_attr="accuracy", time_attr="epoch",
                      checkpoint=os.path.join(d, "tuned.db"), seed=0, max_concurrent=2,
                      report_lag=lag)
        if seconds:
            fn = ag.args(x=ag.space.Real(0.5, 0.6), seconds=seconds)(overhead_entry.train)
            sched = ag.scheduler.FIFOScheduler(fn, num_trials=2, **common)
            if not durable:
                from tuned.store.database import Store
                sched.store.close()
                sched.store = Store(common["checkpoint"], durable=False)
        else:
            fn = ag.args(x=ag.space.Real(0, 1), epochs=MAX_T)(overhead_entry.train)
            sched = ag.scheduler.HyperbandScheduler(fn, num_trials=n, grace_period=GRACE,
                                                    reduction_factor=ETA, **common)
        start = time.perf_counter()
        sched.run()
        wall = time.perf_counter() - start
        counts = sched.store.count_trials(sched.experiment.id)
    return {"wall": wall, "trials": sum(counts.values()), "states": counts}


FLOOR_WINDOW = 8  # as tuned.trial.reporter.WINDOW
FLOOR_LOG_BYTES = 4 << 20


def _floor_client(sock: socket.socket, times: str, seconds: float, lag: float) -> None:
    """A trial of the floor: report lines as fast as it can for `seconds`, as a tuned
    trial's reporter would (lag 0: wait for each answer; else wait only while FLOOR_WINDOW
    are unanswered or the oldest was sent `lag` ago); the same timing files as the trials."""
    calls = os.open(os.path.join(times, f"{os.getpid()}.txt"), os.O_WRONLY | os.O_CREAT, 0o644)
    acks = os.open(os.path.join(times, f"{os.getpid()}.ack"), os.O_WRONLY | os.O_CREAT, 0o644)
    unanswered: list[float] = []
    buffer = b""

    def take(block: bool) -> None:
        nonlocal buffer
        sock.setblocking(block)
        try:
            buffer += sock.recv(65536)
        except BlockingIOError:
            return
        now, lines = time.monotonic(), buffer.count(b"\n")
        buffer = buffer[buffer.rfind(b"\n") + 1:]
        os.write(acks, "".join(f"{now!r} {now - t!r}\n" for t in unanswered[:lines]).encode())
        del unanswered[:lines]

    end, seq = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        seq += 1
        t = time.monotonic()
        if unanswered:
            take(False)
        unanswered.append(t)
        sock.sendall(b'{"seq":%d,"metrics":{"epoch":%d,"accuracy":0.5}}\n' % (seq, seq))
        while unanswered and (lag <= 0 or len(unanswered) >= FLOOR_WINDOW
                              or time.monotonic() - unanswered[0] >= lag):
            take(True)
        u = time.monotonic()
        os.write(calls, f"{u!r} {u - t!r}\n".encode())
    while unanswered:
        take(True)


def child_floor(times: str, seconds: float, lag: float) -> dict[str, Any]:
    """The floor for a durable report on this machine: 2 forked trials send report lines over
    Unix sockets to one process that writes every line it has read to a preallocated file,
    fdatasyncs it and answers each line. No JSON parsing, no database, no decisions."""
    log = os.open(os.path.join(times, "floor.log"), os.O_RDWR | os.O_CREAT, 0o644)
    os.write(log, b"\0" * FLOOR_LOG_BYTES)
    os.fsync(log)
    ends, pids = [], []
    for _ in range(2):
        mine, theirs = socket.socketpair()
        pid = os.fork()
        if pid == 0:
            mine.close()
            code = 0
            try:
                _floor_client(theirs, times, seconds, lag)
            except BaseException:
                traceback.print_exc()
                code = 1
            os._exit(code)
        theirs.close()
        ends.append(mine)
        pids.append(pid)
    selector = selectors.DefaultSelector()
    for end in ends:
        selector.register(end, selectors.EVENT_READ, [b""])
    offset, start = 0, time.perf_counter()
    while selector.get_map():
        answers, data = [], []
        for key, _ in selector.select():
            chunk = key.fileobj.recv(65536)
            if not chunk:
                selector.unregister(key.fileobj)
                continue
            pending = key.data[0] + chunk
            whole = pending[:pending.rfind(b"\n") + 1]
            key.data[0] = pending[len(whole):]
            if whole:
                data.append(whole)
                answers.append((key.fileobj, b"ok\n" * whole.count(b"\n")))
        if data:
            blob = b"".join(data)
            if offset + len(blob) > FLOOR_LOG_BYTES:
                offset = 0
            os.pwrite(log, blob, offset)
            offset += len(blob)
            os.fdatasync(log)
        for end, answer in answers:
            end.sendall(answer)
    wall = time.perf_counter() - start
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    os.close(log)
    if any(codes):
        raise RuntimeError(f"a floor trial failed (exit codes {codes}): its row would be short")
    return {"wall": wall, "trials": 2}


def child_optuna(n: int, times: str, jobs: int) -> dict[str, Any]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def objective(trial: Any) -> float:
        x = trial.suggest_float("x", 0.0, 1.0)
        write = timed_writer(times)
        try:
            for e in range(1, MAX_T + 1):
                t = time.monotonic()
                trial.report(x * e / MAX_T, e)
                pruned = trial.should_prune()
                write(t)
                if pruned:
                    raise optuna.TrialPruned()
        finally:
            write.close()
        return x

    with tempfile.TemporaryDirectory(prefix="optuna-overhead-") as d:
        study = optuna.create_study(
            storage=f"sqlite:///{os.path.join(d, 'optuna.db')}", direction="maximize",
            sampler=optuna.samplers.RandomSampler(seed=0),
            pruner=optuna.pruners.SuccessiveHalvingPruner(
                min_resource=GRACE, reduction_factor=ETA))
        start = time.perf_counter()
        study.optimize(objective, n_trials=n, n_jobs=jobs)
        wall = time.perf_counter() - start
    return {"wall": wall, "trials": len(study.trials)}


def child_ray(n: int, times: str) -> dict[str, Any]:
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    def trainable(config: dict[str, Any]) -> None:
        write = timed_writer(config["times"])
        for e in range(1, MAX_T + 1):
            t = time.monotonic()
            tune.report({"epoch": e, "accuracy": config["x"] * e / MAX_T})
            write(t)

    start = time.perf_counter()
    ray.init(log_to_driver=False)
    init = time.perf_counter() - start
    with tempfile.TemporaryDirectory(prefix="ray-overhead-") as d:
        tuner = tune.Tuner(
            trainable, param_space={"x": tune.uniform(0.0, 1.0), "times": times},
            tune_config=tune.TuneConfig(
                metric="accuracy", mode="max", num_samples=n, max_concurrent_trials=2,
                scheduler=ASHAScheduler(time_attr="epoch", max_t=MAX_T, grace_period=GRACE,
                                        reduction_factor=ETA)),
            run_config=tune.RunConfig(storage_path=d, verbose=0))
        start = time.perf_counter()
        results = tuner.fit()
        wall = time.perf_counter() - start
    ray.shutdown()
    return {"wall": wall, "trials": len(results), "init": init}


def run_child(argv: list[str], env: dict[str, str] | None = None) -> tuple[dict, float, float]:
    """Run this script as `--child ...`; its JSON result and its tree's peak RSS and PSS."""
    proc = subprocess.Popen([sys.executable, HERE, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    memory = TreeMemory(proc.pid)
    out, err = proc.communicate()
    rss, pss = memory.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}):\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1]), rss, pss


# -- the daemon -------------------------------------------------------------------------------


class Daemon(ServedDaemon):
    """`tuned serve` on a fresh state directory, its trials writing round trips to `times`;
    the memory of its process tree (and of the `cluster`'s, when it runs its trials on one)
    sampled until `stop`."""

    def __init__(self, folder: str, times: str, cluster: LocalDask | None = None):
        args = ["--dask-scheduler-file", cluster.scheduler_file] if cluster else []
        super().__init__(folder, {TIMES_ENV: times}, args)
        self.memory = TreeMemory(self.proc.pid, *(cluster.pids if cluster else []))

    def run(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        """Submit `spec`, wait for its end; wall time and trial count from the store."""
        _, state = self.submit_and_wait(name, json.dumps(dict(spec, name=name)), self.folder)
        if state["state"] != "COMPLETED":
            raise RuntimeError(f"experiment {name} ended {state}")
        db = sqlite3.connect(f"file:{os.path.join(self.state, 'tuned.db')}?mode=ro", uri=True)
        try:
            first, last, count = db.execute(
                "SELECT MIN(t.created), MAX(t.ended), COUNT(*) FROM trials t "
                "JOIN experiments e ON e.id = t.experiment_id WHERE e.name = ?",
                (name,)).fetchone()
        finally:
            db.close()
        return {"wall": last - first, "trials": count, "states": state["trials"]}

    def stop(self) -> tuple[float, float]:  # type: ignore[override]
        """Stop the daemon; the peak RSS and PSS of its tree."""
        super().stop()
        return self.memory.stop()


class LocalDask:
    """A local Dask cluster for the Dask row: `dask scheduler` and `workers` `dask worker`
    processes (``--nthreads 1 --no-nanny``; no GPU resource: the trials ask for none), each in
    its own session with its log in `folder`, `env` added to their environment (the trials,
    forked by a template process of the worker, inherit it). The constructor returns once the
    scheduler counts every worker; `close` SIGKILLs every process group started here and the
    workers' templates' (each in a session of its own) and reaps them."""

    def __init__(self, folder: str, env: dict[str, str], workers: int = 2,
                 timeout: float = 60.0):
        from distributed import Client

        self.folder = folder
        self.procs: list[subprocess.Popen] = []
        self.scheduler_file = os.path.join(folder, "scheduler.json")
        self.env = dict(os.environ, **env)
        try:
            self._spawn("scheduler", ["scheduler", "--host", "127.0.0.1", "--port", "0",
                                      "--no-dashboard", "--scheduler-file", self.scheduler_file])
            self._until(self._written, timeout)
            names = {f"w{i}" for i in range(workers)}
            for name in sorted(names):
                self._spawn(name, ["worker", "--scheduler-file", self.scheduler_file,
                                   "--nthreads", "1", "--no-nanny", "--name", name,
                                   "--local-directory", os.path.join(folder, name)])
            with Client(scheduler_file=self.scheduler_file, timeout=timeout) as client:
                self._until(lambda: names <= {w["name"] for w in client.scheduler_info(
                    n_workers=-1)["workers"].values()}, timeout)
        except BaseException:
            self.close()
            raise

    def _spawn(self, name: str, args: list[str]) -> None:
        with open(os.path.join(self.folder, f"{name}.log"), "wb") as log:
            self.procs.append(subprocess.Popen(
                [os.path.join(os.path.dirname(sys.executable), "dask"), *args], env=self.env,
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True))

    def _until(self, predicate: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if any(p.poll() is not None for p in self.procs) or time.monotonic() > deadline:
                raise RuntimeError(f"the Dask cluster did not come up (logs in {self.folder})")
            time.sleep(0.05)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def _written(self) -> bool:
        try:  # the scheduler writes its file in place: there, but maybe not whole yet
            with open(self.scheduler_file, encoding="utf-8") as f:
                return bool(json.load(f)["address"])
        except (OSError, ValueError, KeyError):
            return False

    def close(self) -> None:
        groups = set()
        for pid in (p for proc in self.procs for p in _descendants(proc.pid)):
            try:
                groups.add(os.getpgid(pid))
            except ProcessLookupError:
                pass
        for group in groups:
            try:
                os.killpg(group, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for proc in self.procs:
            proc.wait()


def daemon_spec(n: int, seconds: float, lag: float = 0.0) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "entry": "overhead_entry.py:train", "searcher": "random", "seed": 0, "report_lag": lag,
        "reward_attr": "accuracy", "time_attr": "epoch", "max_concurrent": 2,
        "resources": {"num_cpus": 1, "num_gpus": 0},
        "space": {"x": {"type": "real", "lower": 0.0, "upper": 1.0}}}
    if seconds:
        return dict(spec, scheduler="fifo", num_trials=2,
                    space={"x": {"type": "real", "lower": 0.5, "upper": 0.6}},
                    constants={"seconds": seconds})
    return dict(spec, scheduler="hyperband", num_trials=n,
                scheduler_options={"max_t": MAX_T, "grace_period": GRACE,
                                   "reduction_factor": ETA})


# -- the whole run ----------------------------------------------------------------------------


class Row(dict):
    """One peer's figures: name, n, isolation, durable, trials_s, reports_s, p50, p99, rss,
    pss (and the result's extras)."""


def _row(name: str, result: dict[str, Any], times: str, rss: float, pss: float,
         isolated: str, durable: str) -> Row:
    rtts, _ = read_times(times)
    ms = sorted(r * 1e3 for r in rtts)
    return Row(name=name, n=result["trials"], isolation=isolated, durable=durable,
               trials_s=result["trials"] / result["wall"], reports_s=len(rtts) / result["wall"],
               p50=statistics.median(ms), p99=statistics.quantiles(ms, n=100)[-1],
               rss=rss, pss=pss, wall=result["wall"], reports=len(rtts),
               extra=result)


def _fresh(folder: str, name: str) -> str:
    path = os.path.join(folder, name)
    os.makedirs(path)
    return path


def measure_overhead(cli: argparse.Namespace, folder: str) -> list[Row]:
    rows: list[Row] = []
    entry_env = dict(os.environ)
    print(f"  tuned in-process: {cli.trials} trials ...", flush=True)
    times = _fresh(folder, "tuned")
    shutil.copytree(os.path.join(folder, "entry"), times + "-entry")
    result, rss, pss = run_child(["--child", "tuned", "--n", str(cli.trials), "--times", times,
                                  "--lag", "0"],
                                 entry_env)
    rows.append(_row("tuned in-process", result, times, rss, pss, "process", "yes"))
    if "daemon" not in cli.skip:
        print(f"  tuned daemon: {cli.daemon_trials} trials ...", flush=True)
        times = _fresh(folder, "daemon")
        daemon = Daemon(os.path.join(folder, "entry"), times)
        try:
            result = daemon.run("overhead", daemon_spec(cli.daemon_trials, 0))
        finally:
            rss, pss = daemon.stop()
        rows.append(_row("tuned daemon", result, times, rss, pss, "process", "yes"))
    if "dask" not in cli.skip:
        try:
            import distributed  # noqa: F401
        except ImportError:
            print(f"  {DASK}: skipped, Dask is not installed (pip install -e '.[dask]')")
        else:
            print(f"  {DASK}: {cli.daemon_trials} trials ...", flush=True)
            rows.append(measure_dask(cli.daemon_trials, folder))
    for key, jobs, label in (("optuna", 2, "Optuna+SQLite, 2 threads"),
                             ("optuna-seq", 1, "Optuna+SQLite, sequential")):
        if key in cli.skip:
            continue
        print(f"  {label}: {cli.optuna_trials} trials ...", flush=True)
        times = _fresh(folder, key)
        result, rss, pss = run_child(["--child", "optuna", "--n", str(cli.optuna_trials),
                                      "--times", times, "--jobs", str(jobs)])
        isolation = "none (threads)" if jobs > 1 else "none"
        rows.append(_row(label, result, times, rss, pss, isolation, "yes"))
    if "ray" not in cli.skip:
        try:
            import ray  # noqa: F401
        except ImportError:
            print("  Ray Tune: skipped, Ray is not installed (pip install -e '.[ray]')")
        else:
            print(f"  Ray Tune + ASHA: {cli.ray_trials} trials ...", flush=True)
            times = _fresh(folder, "ray")
            result, rss, pss = run_child(["--child", "ray", "--n", str(cli.ray_trials),
                                          "--times", times])
            rows.append(_row("Ray Tune + ASHA", result, times, rss, pss, "process (actors)",
                             "no"))
    return rows


def measure_dask(n: int, folder: str) -> Row:
    """The daemon row's experiment with ``executor = "dask"``: a fresh daemon (and state
    directory) connected to a fresh local cluster of 2 workers, whose trials (forked by each
    worker's template process) write their round trips to the row's folder."""
    times = _fresh(folder, "dask")
    entry = _fresh(folder, "dask-entry")  # not "entry": the daemon row's state is there
    shutil.copy(os.path.join(folder, "entry", "overhead_entry.py"), entry)
    cluster = LocalDask(_fresh(folder, "dask-cluster"), {TIMES_ENV: times})
    try:
        daemon = Daemon(entry, times, cluster)
        try:
            result = daemon.run("overhead", dict(daemon_spec(n, 0), executor="dask"))
        finally:
            rss, pss = daemon.stop()
    finally:
        cluster.close()
    return _row(DASK, result, times, rss, pss, "process", "yes")


def measure_throughput(cli: argparse.Namespace, folder: str) -> list[Row]:
    rows: list[Row] = []
    s = cli.throughput_seconds
    for lag in dict.fromkeys((0.0, cli.lag)):  # --lag 0: one row each
        label = f"report_lag {lag * 1e3:g} ms"
        print(f"  throughput, tuned in-process, {label}: 2 trials x {s:g} s ...", flush=True)
        times = _fresh(folder, f"tp-tuned-{lag}")
        shutil.copytree(os.path.join(folder, "entry"), times + "-entry")
        _, rss, pss = run_child(["--child", "tuned", "--times", times, "--seconds", str(s),
                                 "--lag", str(lag)])
        rows.append(_throughput_row("tuned in-process", lag, times, rss, pss))
        if "nosync" not in cli.skip:
            print(f"  throughput, tuned without fsync, {label}: 2 trials x {s:g} s ...",
                  flush=True)
            times = _fresh(folder, f"tp-nosync-{lag}")
            shutil.copytree(os.path.join(folder, "entry"), times + "-entry")
            _, rss, pss = run_child(["--child", "tuned-nosync", "--times", times, "--seconds",
                                     str(s), "--lag", str(lag)])
            rows.append(_throughput_row(NOSYNC, lag, times, rss, pss))
        if "floor" not in cli.skip:
            print(f"  throughput, floor, {label}: 2 trials x {s:g} s ...", flush=True)
            times = _fresh(folder, f"tp-floor-{lag}")
            _, rss, pss = run_child(["--child", "floor", "--times", times, "--seconds", str(s),
                                     "--lag", str(lag)])
            rows.append(_throughput_row("floor", lag, times, rss, pss))
        if "daemon" in cli.skip:
            continue
        print(f"  throughput, tuned daemon, {label}: 2 trials x {s:g} s ...", flush=True)
        times = _fresh(folder, f"tp-daemon-{lag}")
        daemon = Daemon(os.path.join(folder, "entry"), times)
        try:
            daemon.run(f"throughput-{lag * 1e3:g}ms", daemon_spec(2, s, lag))
        finally:
            rss, pss = daemon.stop()
        rows.append(_throughput_row("tuned daemon", lag, times, rss, pss))
    return rows


def _throughput_row(name: str, lag: float, times: str, rss: float, pss: float) -> Row:
    """Durable reports/s over the span from the first send to the last answer, the
    latency from each send to its answer, and the calls' own time."""
    acks, span = read_times(times, ".ack")
    calls, _ = read_times(times, ".txt")
    ms = sorted(r * 1e3 for r in acks)
    call_ms = sorted(r * 1e3 for r in calls)
    return Row(name=name, lag=lag, reports=len(acks), span=span, reports_s=len(acks) / span,
               p50=statistics.median(ms), p99=statistics.quantiles(ms, n=100)[-1],
               max=ms[-1], call_p50=statistics.median(call_ms),
               call_p99=statistics.quantiles(call_ms, n=100)[-1], rss=rss, pss=pss)


def print_overhead(rows: list[Row]) -> None:
    base = rows[0]["trials_s"]
    print(f"\nOverhead: no-op trials of up to {MAX_T} reports, successive halving (grace "
          f"{GRACE}, reduction {ETA}), 2 at a time")
    head = (f"  {'':<33}{'N':>5} {'isolation':<17}{'durable':<8}{'trials/s':>9}"
            f"{'reports/s':>10}{'rtt p50':>9}{'rtt p99':>9}{'peak RSS':>10}{'peak PSS':>10}"
            f"{'tuned/x':>9}")
    print(head)
    print(f"  {'':<33}{'':>5} {'':<17}{'':<8}{'':>9}{'':>10}{'ms':>9}{'ms':>9}{'MB':>10}"
          f"{'MB':>10}")
    for r in rows:
        print(f"  {r['name']:<33}{r['n']:>5} {r['isolation']:<17}{r['durable']:<8}"
              f"{r['trials_s']:>9.1f}{_rate(r['reports_s']):>10}{r['p50']:>9.3f}{r['p99']:>9.3f}"
              f"{r['rss']:>10.0f}{r['pss']:>10.0f}{base / r['trials_s']:>9.1f}")
    print("  N: trials of the row; durable: each report on disk before the trial goes on; "
          "peak RSS / PSS: the\n  process tree's summed VmRSS (pages shared by forked "
          "processes counted in each) / Pss\n  (counted once), peak of samples every 0.1 s; "
          "tuned/x: tuned in-process trials/s over the row's")
    for r in rows:
        if "init" in r["extra"]:
            print(f"  ({r['name']}: ray.init() took {r['extra']['init']:.1f} s, not counted)")


def _rate(value: float) -> str:
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def print_throughput(rows: list[Row], floor: tuple[float, float]) -> None:
    print("\nReport throughput: 2 trials calling reporter() as fast as they can "
          "(FIFO, durable: synchronous=FULL)")
    print(f"  (fdatasync of 4 KiB just before: {floor[0]:.3f} ms median, {floor[1]:.3f} ms p99; "
          f"with each trial waiting for its answer,\n  2 reports per commit at most: <= "
          f"{2000 / floor[0]:.0f}/s; every answer waits for at least one fdatasync)")
    print(f"  {'':<18}{'report_lag':>11}{'reports':>9}{'seconds':>9}{'reports/s':>10}"
          f"{'ack p50':>9}{'ack p99':>9}{'/ floor':>8}{'ack max':>9}{'call p50':>9}"
          f"{'call p99':>9}{'peak RSS':>10}{'peak PSS':>10}")
    print(f"  {'':<18}{'ms':>11}{'':>9}{'':>9}{'':>10}{'ms':>9}{'ms':>9}{'':>8}{'ms':>9}"
          f"{'ms':>9}{'ms':>9}{'MB':>10}{'MB':>10}")
    floors = floor_p99(rows)
    for r in rows:
        ratio = r["p99"] / floors[r["lag"]] if floors.get(r["lag"]) else float("nan")
        print(f"  {r['name']:<18}{r['lag'] * 1e3:>11g}{r['reports']:>9}{r['span']:>9.2f}"
              f"{r['reports_s']:>10.0f}{r['p50']:>9.3f}{r['p99']:>9.3f}{ratio:>8.2f}"
              f"{r['max']:>9.3f}{r['call_p50']:>9.3f}{r['call_p99']:>9.3f}{r['rss']:>10.0f}"
              f"{r['pss']:>10.0f}")
    print("  reports/s: reports answered (stored with their decision, on disk) over the span "
          "from the first\n  send to the last answer; ack: from a report's send to its "
          "answer, as the trial saw it (at its\n  next call, or its final flush); / floor: "
          "its ack p99 over the floor's at the same lag (the\n  floor is what the disk and "
          "the scheduler alone give); call: the time reporter() took. With\n  report_lag 0 "
          "every call waits for its answer; with a lag, a call returns once its report is\n"
          "  sent (tuned.trial.reporter).\n  floor: the same 2 trials' lines over Unix "
          "sockets to a process that only appends what it\n  read to a preallocated file, "
          "fdatasyncs it and answers (no JSON, no database, no decisions):\n  what a "
          "durable report costs on this machine, under the same load.\n"
          f"  {NOSYNC}: tuned in-process with its store opened durable=False "
          "(synchronous=OFF, so\n  no group-commit hold either): not durable, held to no "
          "target; what the engine's own work\n  costs, without the disk.")


def print_targets(overhead: list[Row], throughput: list[Row]) -> None:
    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    print("\nTargets:")
    tuned = [r for r in overhead if r["name"].startswith("tuned") and r["name"] != DASK]
    for r in tuned:
        print(f"  {verdict(r['trials_s'] >= TARGET_TRIALS_S)}  {r['name']}: "
              f"{r['trials_s']:.1f} trials/s (>= {TARGET_TRIALS_S:g})")
    optuna = [r for r in overhead if r["name"] == "Optuna+SQLite, 2 threads"]
    for r in tuned if optuna else []:
        ratio = r["trials_s"] / optuna[0]["trials_s"]
        print(f"  {verdict(ratio >= TARGET_RATIO)}  {r['name']} / Optuna+SQLite "
              f"(2 threads): {ratio:.1f}x (>= {TARGET_RATIO:g}x)")
    ray = [r for r in overhead if r["name"].startswith("Ray")]
    daemon = [r for r in overhead if r["name"] == "tuned daemon"]
    for r in (r for r in overhead if r["name"] == DASK):
        if ray:  # the target: trials on a cluster, against Ray Tune with ASHA
            ratio = r["trials_s"] / ray[0]["trials_s"]
            print(f"  {verdict(ratio >= TARGET_DASK_RATIO)}  {r['name']} / {ray[0]['name']}: "
                  f"{ratio:.1f}x (>= {TARGET_DASK_RATIO:g}x)")
        else:
            print(f"  info  {r['name']}: {r['trials_s']:.1f} trials/s (Ray Tune not run: "
                  f"no target to judge; >= {TARGET_DASK_RATIO:g}x Ray's trials/s when it is)")
        if daemon:
            print(f"  info  {r['name']}: {r['trials_s'] / daemon[0]['trials_s']:.2f}x the "
                  "local daemon's trials/s")
    floors = floor_p99(throughput)
    for r in (r for r in throughput if r["name"] in ("tuned in-process", "tuned daemon")):
        name = f"{r['name']}, report_lag {r['lag'] * 1e3:g} ms"
        if r["lag"] > 0:  # the target: what a training loop loses per reporter() call
            print(f"  {verdict(r['reports_s'] >= TARGET_REPORTS_S)}  {name}: "
                  f"{r['reports_s']:.0f} durable reports/s sustained (>= {TARGET_REPORTS_S:g})")
            print(f"  {verdict(r['call_p99'] <= TARGET_P99_MS)}  {name}: reporter() call p99 "
                  f"{r['call_p99']:.3f} ms (<= {TARGET_P99_MS:g} ms)")
        floor = floors.get(r["lag"])
        against = f", {r['p99'] / floor:.2f}x the floor's {floor:.3f} ms" if floor else ""
        print(f"  info  {name}: send to durable answer p99 {r['p99']:.3f} ms{against} "
              "(a property of the disk; no target)")


def floor_p99(rows: list[Row]) -> dict[float, float]:
    """The floor's send-to-answer p99 (ms) at each report lag of `rows`."""
    return {r["lag"]: r["p99"] for r in rows if r["name"] == "floor"}


def fsync_ms(folder: str, n: int = 200) -> tuple[float, float]:
    """(median, p99) ms of a 4 KiB overwrite + fdatasync in `folder` (the disk's floor for
    one durable commit)."""
    path = os.path.join(folder, "fsync-probe")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"\0" * (1 << 20))
        os.fsync(fd)
        times = []
        for i in range(n):
            os.pwrite(fd, b"x" * 4096, (i % 64) * 4096)
            t = time.perf_counter()
            os.fdatasync(fd)
            times.append(time.perf_counter() - t)
    finally:
        os.close(fd)
        os.unlink(path)
    return (statistics.median(times) * 1e3,
            statistics.quantiles(times, n=100)[-1] * 1e3)


def child_main(cli: argparse.Namespace) -> None:
    if cli.child in ("tuned", "tuned-nosync"):
        result = child_tuned(cli.n, cli.times, cli.seconds, cli.lag,
                             durable=cli.child == "tuned")
    elif cli.child == "floor":
        result = child_floor(cli.times, cli.seconds, cli.lag)
    elif cli.child == "optuna":
        result = child_optuna(cli.n, cli.times, cli.jobs)
    else:
        result = child_ray(cli.n, cli.times)
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=500, help="tuned in-process trials")
    parser.add_argument("--daemon-trials", type=int, default=500,
                        help="trials via the daemon, and via Dask")
    parser.add_argument("--optuna-trials", type=int, default=100, help="Optuna's trials")
    parser.add_argument("--ray-trials", type=int, default=20, help="Ray Tune's trials")
    parser.add_argument("--throughput-seconds", type=float, default=10.0,
                        help="seconds of reporting per trial in the throughput test")
    parser.add_argument("--lag", type=float, default=0.005,
                        help="the report_lag (seconds) of the throughput test's lagged rows")
    parser.add_argument("--skip", default="",
                        help="comma-separated: overhead (the whole no-op trial table), daemon, "
                             "dask, optuna, optuna-seq, ray, floor, nosync, throughput")
    parser.add_argument("--child", choices=("tuned", "tuned-nosync", "floor", "optuna", "ray"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--times", help=argparse.SUPPRESS)
    parser.add_argument("--jobs", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=0.0, help=argparse.SUPPRESS)
    cli = parser.parse_args()
    if cli.child:
        return child_main(cli)
    cli.skip = {s for s in cli.skip.split(",") if s}

    folder = tempfile.mkdtemp(prefix="tuned-overhead-")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
    print(f"machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}; "
          "fdatasync of 4 KiB here: {:.3f} ms median, {:.3f} ms p99".format(*fsync_ms(folder)))
    try:
        entry = _fresh(folder, "entry")
        with open(os.path.join(entry, "overhead_entry.py"), "w", encoding="utf-8") as f:
            f.write(ENTRY_SOURCE)
        overhead = [] if "overhead" in cli.skip else measure_overhead(cli, folder)
        floor = fsync_ms(folder)
        throughput = [] if "throughput" in cli.skip else measure_throughput(cli, folder)
        if overhead:
            print_overhead(overhead)
        if throughput:
            print_throughput(throughput, floor)
        print_targets(overhead, throughput)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
