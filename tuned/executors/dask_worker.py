"""The Dask worker's side of tuned's Dask executor (`tuned.executors.dask_executor`).

What runs on a worker:

- `TunedWorkerPlugin` (registered by the daemon on every worker, present and future): the
  host's GPUs found once with NVML (``TUNED_FAKE_GPUS`` in tests, `tuned.executors.gpus`),
  handed to its trials by UUID; one template process per experiment (``python -m
  tuned.trial.template FD --worker``: it imports the entry once and forks each trial in
  about a millisecond, against some 240 ms for a fresh interpreter); the runs it holds.
- `run_trial(job)`: one Dask task per launch. It connects to the daemon's report listener,
  has the template fork the trial with that connection as its report channel and a pipe as
  its output, says hello for it (run id, secret, host, worker, pid, start time, GPUs) and
  closes its own copy: the daemon stores the claim and sends the trial its order on that
  same connection; the trial then talks to the daemon directly. The task forwards the
  trial's output to the daemon's log of it and returns its exit status.
- Over TLS (``job["tls"]``: ``tuned serve --tls-cert``), a TLS session cannot be handed to
  another process, so the trial connects itself: the template forks it with a ``connect``
  instruction (the listener's address, the worker's TLS files, the hello's fields but its
  pid and start time) and only its output pipe; the trial connects, wraps the connection in
  TLS, says its hello with its own pid and start time and reads its order
  (`tuned.trial.child.spare_main`). The worker's TLS files are those of Dask's config
  (`tls_files`), which ``TUNED_TLS_CA``, ``TUNED_TLS_CERT`` and ``TUNED_TLS_KEY`` in the
  worker's environment override; the log connection is TLS too.
- `signal_run` and `describe` run through `Client.run` (in the worker's event loop, so
  they are served while every thread runs a trial).

A trial is in its own session, a child of the template, which it dies with (SIGKILL, as
`PR_SET_PDEATHSIG` binds it); the template watches the worker process (a pidfd) and, once
it is gone, kills every trial's process group and leaves. A worker that dies takes its
trials with it: nothing holds its GPUs after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
from collections import deque
from typing import Any

from distributed import get_worker
from distributed.diagnostics.plugin import WorkerPlugin

from tuned.executors.gpus import make_provider
from tuned.protocol.channel import TLS_CA_ENV, TLS_CERT_ENV, TLS_KEY_ENV, hello_line
from tuned.protocol.tcp import TlsFiles, client_context, connect
from tuned.trial.identity import process_start_time

PLUGIN_NAME = "tuned"
READY_TIMEOUT = 120.0
LOG_CHUNK = 1 << 16


class TemplateFailed(RuntimeError):
    """The worker's template could not load the experiment's entry, or died."""


class DaemonUnreachable(RuntimeError):
    """The task could not connect to the daemon's report listener."""


class _Template:
    """The worker's client of one template process: `fork` a trial, `wait` for its exit.
    Thread-safe: each Dask task thread forks and waits for its own trial."""

    def __init__(self, experiment: dict[str, Any], log_path: str):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # The trials' TLS files are in their order's environment when (and only when) their
        # daemon speaks TLS: the worker's own settings of them do not reach the trials.
        env = {k: v for k, v in os.environ.items()
               if k not in (TLS_CA_ENV, TLS_CERT_ENV, TLS_KEY_ENV)}
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tuned.trial.template", str(theirs.fileno()), "--worker"],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True, env=env)
        theirs.close()
        self.ctl = ours
        self.ctl.send(json.dumps(experiment).encode())
        self.ctl.settimeout(READY_TIMEOUT)
        try:
            data = self.ctl.recv(1 << 20)
        except TimeoutError:
            data = b""
        finally:
            self.ctl.settimeout(None)
        answer = json.loads(data) if data else {"op": "error",
                                                "message": "the template did not answer"}
        if answer.get("op") != "ready":
            self.close()
            raise TemplateFailed(answer.get("message", "the template died"))
        self.described = {"space": answer.get("space"), "constants": answer.get("constants")}
        self._done = threading.Condition()
        self._asked: deque[list[Any]] = deque()  # forks asked for, oldest first: [pid]
        self._exits: dict[int, int | None] = {}
        self.alive = True
        threading.Thread(target=self._read, name="tuned-template", daemon=True).start()

    def fork(self, fds: list[int], connect: dict[str, Any] | None = None) -> int:
        """A new trial process, waiting on `fds[0]` for its order (output to `fds[1]`); with
        `connect` (`tuned.trial.child.spare_main`'s), one that connects to the daemon itself
        and says its hello (output to `fds[0]`, the only fd)."""
        slot: list[Any] = []
        request = b'{"op":"fork"}' if connect is None else \
            json.dumps({"op": "fork", "connect": connect}).encode()
        with self._done:  # asked for and sent in one go: the template forks in that order
            if not self.alive:
                raise TemplateFailed("the template died")
            self._asked.append(slot)
            socket.send_fds(self.ctl, [request], fds)
            if not self._done.wait_for(lambda: slot or not self.alive, timeout=READY_TIMEOUT):
                raise TemplateFailed("the template did not fork in time")
        if not slot:
            raise TemplateFailed("the template died")
        return slot[0]

    def wait(self, pid: int) -> int | None:
        """The exit code of trial `pid` once it ended (None if the template died first)."""
        with self._done:
            self._done.wait_for(lambda: pid in self._exits or not self.alive)
            return self._exits.pop(pid, None)

    def _read(self) -> None:
        while True:
            try:
                data = self.ctl.recv(1 << 20)
            except OSError:
                data = b""
            with self._done:
                if not data:
                    self.alive = False
                    self._done.notify_all()
                    return
                body = json.loads(data)
                if body.get("op") == "forked" and self._asked:
                    self._asked.popleft().append(body["pid"])
                elif body.get("op") == "exited":
                    self._exits[body["pid"]] = body.get("code")
                self._done.notify_all()

    def close(self) -> None:
        """End the template (its trials die with it)."""
        with contextlib.suppress(OSError):
            self.ctl.close()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


class TunedWorkerPlugin(WorkerPlugin):
    """tuned's state on one Dask worker: its GPUs, its templates, the runs it holds."""

    name = PLUGIN_NAME
    # A restarted daemon registers it again: the scheduler keeps the one the workers have
    # (replacing it would tear down its templates, and with them the running trials).
    idempotent = True

    def setup(self, worker: Any) -> None:
        """On the worker (the plugin travels pickled, so its state is made here)."""
        self.worker = worker
        self.templates: dict[str, _Template] = {}
        self.runs: dict[str, tuple[int, int | None]] = {}
        self.lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        provider = make_provider()
        try:
            self.gpus = [g.uuid for g in provider.gpus()]
        finally:
            provider.close()
        self.free = list(self.gpus)

    def teardown(self, worker: Any) -> None:
        """The worker closes (its scheduler is gone, say): nothing is ended here. A trial
        that runs goes on reporting to its daemon; its template ends it, and leaves, once
        the worker's process is gone."""

    # -- templates ----------------------------------------------------------------------

    def template(self, experiment: dict[str, Any]) -> _Template:
        """The running template of `experiment` (started now if it has none); TemplateFailed
        when its entry cannot be loaded here."""
        key = hashlib.sha256(json.dumps(experiment, sort_keys=True).encode()).hexdigest()[:16]
        with self.lock:
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:
            found = self.templates.get(key)
            if found is not None and found.alive:
                return found
            folder = os.path.join(self.worker.local_directory, "tuned")
            os.makedirs(folder, exist_ok=True)
            name = experiment.get("name") or key
            started = _Template(experiment, os.path.join(folder, f"{name}.template.log"))
            self.templates[key] = started
            return started

    # -- GPUs ---------------------------------------------------------------------------

    def take_gpus(self, count: int) -> list[str]:
        """`count` of this host's GPUs, by UUID (fewer if it has fewer free: Dask's GPU
        resource is what bounds the trials a worker runs)."""
        with self.lock:
            taken, self.free = self.free[:count], self.free[count:]
        return taken

    def give_gpus(self, gpus: list[str]) -> None:
        with self.lock:
            self.free += [g for g in gpus if g not in self.free]


def _plugin() -> TunedWorkerPlugin:
    worker = get_worker()
    plugin = worker.plugins.get(PLUGIN_NAME)
    if plugin is None:  # a worker that joined before the plugin was registered
        plugin = TunedWorkerPlugin()
        plugin.setup(worker)
        worker.plugins[PLUGIN_NAME] = plugin
    return plugin


# -- the task -------------------------------------------------------------------------------


def tls_files() -> TlsFiles:
    """This worker's TLS files: the CA file and the worker's certificate and key of Dask's
    config (``distributed.comm.tls.ca-file``, ``distributed.comm.tls.worker.cert``,
    ``distributed.comm.tls.worker.key``; the key may be in the certificate's file), each
    overridden by ``TUNED_TLS_CA``, ``TUNED_TLS_CERT`` and ``TUNED_TLS_KEY`` in the
    worker's environment. ValueError naming what is missing."""
    import dask

    def setting(env: str, key: str) -> str | None:
        value = os.environ.get(env) or dask.config.get(key, None)
        return os.path.abspath(str(value)) if value else None

    ca = setting(TLS_CA_ENV, "distributed.comm.tls.ca-file")
    cert = setting(TLS_CERT_ENV, "distributed.comm.tls.worker.cert")
    key = setting(TLS_KEY_ENV, "distributed.comm.tls.worker.key")
    missing = [what for what, value in (
        (f"no CA file (distributed.comm.tls.ca-file or {TLS_CA_ENV})", ca),
        (f"no certificate (distributed.comm.tls.worker.cert or {TLS_CERT_ENV})", cert))
        if value is None]
    if missing:
        raise ValueError(f"the worker has {' and '.join(missing)}")
    assert ca is not None and cert is not None
    return TlsFiles(ca, cert, key)


def _worker_tls() -> tuple[TlsFiles, ssl.SSLContext]:
    """This worker's TLS files (`tls_files`) and a client context made of them; ValueError
    saying what is missing or cannot be loaded."""
    files = tls_files()
    try:
        return files, client_context(files)
    except OSError as exc:  # ssl.SSLError too
        raise ValueError(f"the worker's TLS files {files.ca}, {files.cert}"
                         f"{', ' + files.key if files.key else ''}: {exc}") from None


def run_trial(job: dict[str, Any]) -> dict[str, Any]:
    """One launch of a trial on this worker (the Dask task; see the module docstring).
    `job`: ``run``, ``token``, ``address`` (the daemon's listener), ``experiment`` (what the
    template loads), ``num_gpus``, ``patience`` (seconds to reach the daemon), ``tls``
    (whether the listener speaks TLS). Returns ``{"code": exit code or None, "host",
    "worker", "pid"}``, or with ``"error"`` when the trial could not start here (``"tls:
    ..."`` when this worker has no TLS files that load)."""
    plugin = _plugin()
    where = {"host": socket.gethostname(), "worker": plugin.worker.address}
    tls: tuple[TlsFiles, ssl.SSLContext] | None = None
    if job.get("tls"):
        try:
            tls = _worker_tls()
        except ValueError as exc:
            return {**where, "code": None, "error": f"tls: {exc}"}
    try:
        template = plugin.template(job["experiment"])
    except TemplateFailed as exc:
        return {**where, "code": None, "error": f"entry: {exc}"}
    gpus = plugin.take_gpus(int(job.get("num_gpus") or 0))
    # The log connection first: the daemon has it before the trial can end, and reads it
    # to its end before it takes the trial's end (nothing the trial printed comes too late).
    log_sock = _log_connection(job, None if tls is None else tls[1])
    try:
        out_r, out_w = os.pipe()
        try:
            if tls is None:
                pid = _fork_plain(plugin, template, job, gpus, where, out_w)
            else:
                pid = _fork_connecting(plugin, template, job, gpus, where, out_w, tls[0])
        except (DaemonUnreachable, TemplateFailed) as exc:
            os.close(out_r)
            if log_sock is not None:
                log_sock.close()
            return {**where, "code": None, "error": str(exc)}
        finally:
            os.close(out_w)
        forwarder = threading.Thread(target=forward_output, name="tuned-log", daemon=True,
                                     args=(out_r, job, None if tls is None else tls[1],
                                           log_sock))
        forwarder.start()
        code = template.wait(pid)
        forwarder.join(timeout=10.0)
        return {**where, "code": code, "pid": pid}
    finally:
        plugin.give_gpus(gpus)
        with plugin.lock:
            plugin.runs.pop(job["run"], None)


def _forked(plugin: TunedWorkerPlugin, pid: int, run: str) -> int | None:
    """Note trial `pid` as run `run` of this worker (for `signal_run`); its start time."""
    start = process_start_time(pid)
    with plugin.lock:
        plugin.runs[run] = (pid, start)
    return start


def _fork_plain(plugin: TunedWorkerPlugin, template: _Template, job: dict[str, Any],
                gpus: list[str], where: dict[str, str], out_w: int) -> int:
    """Plain TCP: connect to the listener, have the template fork the trial with that
    connection as its channel, and say its hello for it (then close this copy); its pid.
    DaemonUnreachable, TemplateFailed."""
    try:
        sock = connect(job["address"], float(job.get("patience", 60.0)))
    except OSError as exc:
        raise DaemonUnreachable(f"daemon unreachable: {exc}") from None
    try:
        sock.settimeout(None)  # the trial's channel blocks, as a local trial's does
        pid = template.fork([sock.fileno(), out_w])
        start = _forked(plugin, pid, job["run"])
        try:
            sock.sendall(hello_line(op="hello", run=job["run"], token=job["token"], pid=pid,
                                    start=start, gpus=gpus, **where))
        except OSError:
            pass  # the trial finds its channel closed and asks to be taken back
    finally:
        sock.close()
    return pid


def _fork_connecting(plugin: TunedWorkerPlugin, template: _Template, job: dict[str, Any],
                     gpus: list[str], where: dict[str, str], out_w: int,
                     files: TlsFiles) -> int:
    """TLS: have the template fork a trial that connects to the listener itself, over TLS
    with `files`, and says its own hello (`tuned.trial.child.spare_main`); its pid.
    TemplateFailed."""
    hello = {"op": "hello", "run": job["run"], "token": job["token"], "gpus": gpus, **where,
             "tls": files.to_dict()}
    connect = {"address": job["address"], "patience": float(job.get("patience", 60.0)),
               "tls": files.to_dict(), "hello": hello}
    pid = template.fork([out_w], connect=connect)
    _forked(plugin, pid, job["run"])
    return pid


def forward_output(fd: int, job: dict[str, Any], context: ssl.SSLContext | None = None,
                   sock: socket.socket | None = None) -> None:
    """Send what the trial writes to `fd` (its stdout and stderr) to the daemon's log of it,
    over a log connection of its own (``{"op": "log"}``; TLS with `context`; `sock` if one
    is open already), connecting again when the daemon comes back; until the trial and
    everything it started closed the pipe, then close it. What was in flight when a daemon
    died may be missing from its log."""
    try:
        while True:
            data = os.read(fd, LOG_CHUNK)
            if not data:
                return
            for _ in range(2):
                if sock is None:
                    sock = _log_connection(job, context)
                if sock is None:
                    break
                try:
                    sock.sendall(data)
                    break
                except OSError:
                    sock.close()
                    sock = None
    finally:
        os.close(fd)
        if sock is not None:
            sock.close()


def _log_connection(job: dict[str, Any],
                    context: ssl.SSLContext | None = None) -> socket.socket | None:
    """A log connection of run ``job["run"]`` (TLS with `context`), or None."""
    try:
        sock = connect(job["address"], 5.0, context)
        sock.sendall(hello_line(op="log", run=job["run"], token=job["token"]))
        return sock
    except OSError:
        return None


# -- through Client.run -------------------------------------------------------------------


def signal_run(run: str, signum: int, dask_worker: Any = None) -> bool:
    """Send `signum` to the process group of run `run` on this worker, if that very process
    still runs; whether it did."""
    plugin = (dask_worker.plugins if dask_worker is not None else get_worker().plugins).get(
        PLUGIN_NAME)
    if plugin is None:
        return False
    with plugin.lock:
        found = plugin.runs.get(run)
    if found is None:
        return False
    pid, start = found
    if start is None or process_start_time(pid) != start:
        return False
    try:
        os.killpg(pid, signum)
    except (ProcessLookupError, PermissionError):
        return False
    return True


async def describe(experiment: dict[str, Any], dask_worker: Any = None) -> dict[str, Any]:
    """Load `experiment`'s entry in this worker's template (started now, so the first trial
    finds it ready): ``{"space", "constants"}`` as the template describes the entry, or
    ``{"error": why}`` when it cannot be imported here."""
    worker = dask_worker if dask_worker is not None else get_worker()
    plugin = worker.plugins.get(PLUGIN_NAME)
    if plugin is None:
        plugin = TunedWorkerPlugin()
        plugin.setup(worker)
        worker.plugins[PLUGIN_NAME] = plugin
    try:
        template = await asyncio.to_thread(plugin.template, experiment)
    except TemplateFailed as exc:
        return {"error": str(exc)}
    return dict(template.described)


def runs_here(dask_worker: Any = None) -> dict[str, Any]:
    """What this worker holds for tuned: its GPUs (all, free) and its runs."""
    plugin = (dask_worker.plugins if dask_worker is not None else {}).get(PLUGIN_NAME)
    if plugin is None:
        return {"gpus": [], "free": [], "runs": []}
    with plugin.lock:
        return {"gpus": list(plugin.gpus), "free": list(plugin.free),
                "runs": sorted(plugin.runs)}
