"""Trials on a Dask cluster (tuned/executors/dask_executor.py), with real processes: a `dask
scheduler` and two `dask worker`s on 127.0.0.1 (tests/dask_cluster.py), a real daemon, real
trials forked on the workers, SIGKILL to workers, to the daemon and to the scheduler, and raw
TCP connections to the report listener; the same over TLS, with certificates the `openssl`
command makes for each test (a CA, the daemon's and a worker's certificates, and another CA
with a certificate of its own). Fake only the GPUs (TUNED_FAKE_GPUS on the workers)."""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import ssl
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
from dask_cluster import DaskCluster  # `make test` installs the dask extra
from helpers import Daemon, cli, wait_until, write_spec

from tuned.daemon.listener import check_hello


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _module(tmp_path: Path, epochs: int, step: float) -> Path:
    """A training function that keeps a checkpoint after every report, resumes from it,
    and prints its pid and GPUs to its log."""
    module = tmp_path / "remote_trial.py"
    module.write_text(textwrap.dedent(f"""
        import os, time
        import tuned

        @tuned.args(x=tuned.space.Real(0, 1), epochs={epochs}, step={step})
        def train(args, reporter):
            first = reporter.resume_from or 0
            gpus = os.environ.get("CUDA_VISIBLE_DEVICES", "")
            print(f"trial pid {{os.getpid()}} gpus {{gpus}} from {{first}}", flush=True)
            for e in range(first, args.epochs):
                time.sleep(args.step)
                reporter(epoch=e + 1, accuracy=args.x * (e + 1), gpus=gpus, pid=os.getpid())
                reporter.save_checkpoint({{"epoch": e + 1}})
    """))
    return module


def _spec(tmp_path: Path, name: str, module: Path, trials: int, extra: str = "") -> str:
    return write_spec(tmp_path, name, f"""
        name = "{name}"
        entry = "{module}:train"
        executor = "dask"
        num_trials = {trials}
        max_concurrent = 2
        num_gpus = 1
        seed = 7
        {extra}
    """)


@pytest.fixture
def cluster(tmp_path):
    with DaskCluster(tmp_path / "cluster") as c:
        c.start(workers=2, gpus_per_worker=1, env={"TUNED_FAKE_GPUS": "GPU-fake-a"})
        yield c


@pytest.fixture
def daemon(tmp_path, cluster):
    d = Daemon(tmp_path)
    d.start(args=("--dask-scheduler-file", cluster.scheduler_file))
    yield d
    d.close()


def _rows(d: Daemon, sql: str, *args) -> list[tuple]:
    with d.db() as c:
        return c.execute(sql, args).fetchall()


def _reports_exactly_once(d: Daemon) -> None:
    """Every trial's stored reports are 1..last_seq, each once (the primary key forbids a
    double; a gap would be a lost report)."""
    for tid, last in _rows(d, "SELECT id, last_seq FROM trials"):
        seqs = [s for (s,) in _rows(d, "SELECT seq FROM reports WHERE trial_id = ? "
                                       "ORDER BY seq", tid)]
        assert seqs == list(range(1, last + 1)), (tid, seqs)


def _everything_accounted_for(d: Daemon, name: str, trials: int, pids: set[int]) -> None:
    states = dict(_rows(d, "SELECT state, COUNT(*) FROM trials GROUP BY state"))
    assert sum(states.values()) == trials and states.get("COMPLETED") == trials, \
        (states, _rows(d, "SELECT number, attempt, error FROM trials"), d.log()[-3000:])
    _reports_exactly_once(d)
    wait_until(lambda: not [p for p in pids if _alive(p)], 10, "the trial processes' end")
    best = d.json("best", name)
    assert best["trial"] is not None and best["reward"] is not None


def _nothing_published(cluster: DaskCluster) -> None:
    """Every run's task unpublished once its trial's end is stored (wait: it is batched)."""
    from distributed import Client

    with Client(scheduler_file=cluster.scheduler_file, timeout=10) as client:
        wait_until(lambda: not [n for n in client.list_datasets() if str(n).startswith("tuned-")],
                   10, lambda: f"the runs unpublished: {client.list_datasets()}")


def _remote_pids(d: Daemon) -> set[int]:
    return {pid for (pid,) in _rows(d, "SELECT pid FROM trials WHERE host IS NOT NULL "
                                       "AND pid IS NOT NULL")}


def test_trials_run_on_the_workers_with_their_host_gpus_and_logs(tmp_path, cluster, daemon):
    module = _module(tmp_path, epochs=3, step=0.01)
    out = daemon.ctl("submit", _spec(tmp_path, "remote", module, trials=6))
    assert out.returncode == 0, out.stderr
    daemon.wait_state("remote", ("COMPLETED",), timeout=60)
    trials = daemon.json("trials", "remote")["trials"]
    status = daemon.json("status")
    workers = {w["address"]: w for w in status["cluster"]["workers"]}
    assert status["cluster"]["reachable"] is True and len(workers) == 2
    assert {t["worker"] for t in trials} <= set(workers) and all(t["host"] for t in trials)
    for t in trials:
        log = (daemon.state / "logs" / "remote" / f"trial-{t['trial']}.log").read_text()
        assert "gpus GPU-fake-a from 0" in log, log  # its host's GPU, its output forwarded
    assert "Dask cluster" in daemon.ctl("status").stdout
    assert "Dask worker" in daemon.ctl("trials", "remote").stdout
    _reports_exactly_once(daemon)


def test_a_dask_spec_is_refused_by_a_daemon_without_a_cluster(tmp_path):
    (tmp_path / "plain").mkdir()
    d = Daemon(tmp_path / "plain")
    d.start()
    try:
        out = d.ctl("submit", _spec(tmp_path, "nowhere", _module(tmp_path, 1, 0), 1))
        assert out.returncode != 0 and "executor" in out.stderr and "--dask" in out.stderr
    finally:
        d.close()


def test_an_entry_the_workers_cannot_import_is_refused_at_submit(tmp_path, daemon):
    spec = _spec(tmp_path, "broken", tmp_path / "missing.py", 1)
    out = daemon.ctl("submit", spec)
    assert out.returncode != 0 and "entry" in out.stderr and "Dask worker" in out.stderr
    assert daemon.json("status")["experiments"] == []


def test_a_worker_killed_mid_trial_takes_its_trial_down_and_it_runs_again(
        tmp_path, cluster, daemon):
    module = _module(tmp_path, epochs=12, step=0.15)
    assert daemon.ctl("submit", _spec(tmp_path, "w", module, trials=2)).returncode == 0
    placed = wait_until(lambda: _rows(daemon, "SELECT id, pid, worker FROM trials WHERE "
                                      "state = 'RUNNING' AND last_seq >= 3"), 30,
                        "a trial with 3 reports")
    tid, pid, worker = placed[0]
    name = next(n for n, w in _worker_names(daemon).items() if w == worker)
    pids = _remote_pids(daemon)
    cluster.kill_worker(name)
    wait_until(lambda: not _alive(pid), 10, "the trial's death with its worker")
    daemon.wait_state("w", ("COMPLETED",), timeout=90)
    attempt, last_seq, worker_after = _rows(
        daemon, "SELECT attempt, last_seq, worker FROM trials WHERE id = ?", tid)[0]
    assert attempt == 2 and last_seq == 12 and worker_after != worker
    log = (daemon.state / "logs" / "w" / f"trial-{_number(daemon, tid)}.log").read_text()
    starts = [int(n) for n in re.findall(r"from (\d+)", log)]
    assert starts[0] == 0 and len(starts) == 2 and starts[1] >= 3, log  # from its checkpoint
    _everything_accounted_for(daemon, "w", 2, pids | _remote_pids(daemon))


def _worker_names(d: Daemon) -> dict[str, str]:
    return {w["name"]: w["address"] for w in d.json("status")["cluster"]["workers"]}


def _number(d: Daemon, tid: int) -> int:
    return _rows(d, "SELECT number FROM trials WHERE id = ?", tid)[0][0]


def test_a_daemon_killed_mid_trial_adopts_its_remote_trials_after_a_restart(
        tmp_path, cluster, daemon):
    module = _module(tmp_path, epochs=15, step=0.1)
    assert daemon.ctl("submit", _spec(tmp_path, "a", module, trials=2)).returncode == 0
    wait_until(lambda: len(_rows(daemon, "SELECT id FROM trials WHERE state = 'RUNNING' "
                                 "AND last_seq >= 2")) == 2, 30, "two trials running")
    pids = _remote_pids(daemon)
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait()
    time.sleep(0.5)
    assert all(_alive(p) for p in pids)  # the trials outlive their daemon
    daemon.start(args=("--dask-scheduler-file", cluster.scheduler_file))
    daemon.wait_state("a", ("COMPLETED",), timeout=60)
    attempts = [a for (a,) in _rows(daemon, "SELECT attempt FROM trials")]
    assert attempts == [1, 1], (attempts, daemon.log()[-2000:])  # adopted: nothing reran
    _everything_accounted_for(daemon, "a", 2, pids)
    _nothing_published(cluster)


def test_trials_whose_daemon_stays_away_exit_and_run_again_when_it_is_back(
        tmp_path, cluster, daemon):
    module = _module(tmp_path, epochs=40, step=0.1)
    spec = _spec(tmp_path, "away", module, trials=2, extra="report_timeout = 2")
    assert daemon.ctl("submit", spec).returncode == 0
    wait_until(lambda: len(_rows(daemon, "SELECT id FROM trials WHERE state = 'RUNNING' "
                                 "AND last_seq >= 2")) == 2, 30, "two trials running")
    pids = _remote_pids(daemon)
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait()
    # Past the adopt timeout (report_timeout, 2 s) the trials give up, and their tasks end:
    # the workers hold none of our runs (and no GPU) any more.
    wait_until(lambda: not [p for p in pids if _alive(p)], 20, "the orphaned trials' exit")
    from distributed import Client

    with Client(scheduler_file=cluster.scheduler_file, timeout=10) as client:
        wait_until(lambda: not any(client.processing().values()), 10, "the tasks' end")
    daemon.start(args=("--dask-scheduler-file", cluster.scheduler_file))
    daemon.wait_state("away", ("COMPLETED",), timeout=90)
    attempts = sorted(a for (a,) in _rows(daemon, "SELECT attempt FROM trials"))
    assert attempts == [2, 2]
    _everything_accounted_for(daemon, "away", 2, pids | _remote_pids(daemon))


def test_kill_and_stop_end_remote_trials_on_their_hosts(tmp_path, cluster, daemon):
    module = _module(tmp_path, epochs=400, step=0.1)
    assert daemon.ctl("submit", _spec(tmp_path, "k", module, trials=3)).returncode == 0
    running = wait_until(lambda: _rows(daemon, "SELECT number, pid FROM trials WHERE "
                                       "state = 'RUNNING' AND last_seq >= 1"), 30, "a trial")
    number, pid = running[0]
    assert daemon.ctl("kill", "k", str(number)).returncode == 0
    wait_until(lambda: not _alive(pid), 10, "the killed trial's end on its worker")
    wait_until(lambda: _rows(daemon, "SELECT state, error FROM trials WHERE number = ?",
                             number)[0][0] == "FAILED", 10, "the killed trial's end")
    pids = _remote_pids(daemon) | {pid}
    assert daemon.ctl("stop", "k").returncode == 0
    daemon.wait_state("k", ("STOPPED",), timeout=20)
    wait_until(lambda: not [p for p in pids if _alive(p)], 15, "every trial's end")
    from distributed import Client

    with Client(scheduler_file=cluster.scheduler_file, timeout=10) as client:
        wait_until(lambda: not any(client.processing().values()), 10,
                   "Dask's GPUs given back (no task of ours left)")
    assert not _rows(daemon, "SELECT id FROM trials WHERE state = 'RUNNING'")


def test_a_lost_scheduler_is_reported_and_the_search_goes_on_when_it_is_back(
        tmp_path, cluster, daemon):
    module = _module(tmp_path, epochs=10, step=0.1)
    assert daemon.ctl("submit", _spec(tmp_path, "s", module, trials=6)).returncode == 0
    wait_until(lambda: _rows(daemon, "SELECT id FROM trials WHERE state = 'RUNNING' "
                             "AND last_seq >= 2"), 30, "a trial running")
    pids = _remote_pids(daemon)
    cluster.kill_scheduler()
    wait_until(lambda: daemon.json("status")["cluster"]["reachable"] is False, 15,
               "status saying the cluster is unreachable")
    assert "UNREACHABLE" in daemon.ctl("status").stdout
    cluster.restart_scheduler()
    daemon.wait_state("s", ("COMPLETED",), timeout=120)
    _everything_accounted_for(daemon, "s", 6, pids | _remote_pids(daemon))


def test_a_worker_and_the_daemon_killed_in_one_run_lose_nothing(tmp_path, cluster, daemon):
    module = _module(tmp_path, epochs=8, step=0.1)
    assert daemon.ctl("submit", _spec(tmp_path, "both", module, trials=8)).returncode == 0
    wait_until(lambda: _rows(daemon, "SELECT id FROM trials WHERE state = 'RUNNING' "
                             "AND last_seq >= 2"), 30, "a trial running")
    pids = _remote_pids(daemon)
    cluster.kill_worker("w0")
    cluster.add_worker("w2")
    time.sleep(0.5)
    pids |= _remote_pids(daemon)
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait()
    daemon.start(args=("--dask-scheduler-file", cluster.scheduler_file))
    daemon.wait_state("both", ("COMPLETED",), timeout=120)
    _everything_accounted_for(daemon, "both", 8, pids | _remote_pids(daemon))
    _nothing_published(cluster)


# -- the report listener ------------------------------------------------------------------


def _listener(d: Daemon) -> tuple[str, int]:
    host, _, port = d.json("status")["cluster"]["listener"].rpartition(":")
    return host, int(port)


def _refusal(address: tuple[str, int], data: bytes) -> dict:
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(data)
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    return json.loads(answer)


def test_the_listener_refuses_bad_tokens_stale_runs_junk_and_oversized_lines(
        tmp_path, cluster, daemon):
    module = _module(tmp_path, epochs=400, step=0.1)
    assert daemon.ctl("submit", _spec(tmp_path, "l", module, trials=1)).returncode == 0
    wait_until(lambda: _rows(daemon, "SELECT id FROM trials WHERE state = 'RUNNING' "
                             "AND last_seq >= 1"), 30, "a trial running")
    (tid, run, host, pid, start), = _rows(
        daemon, "SELECT id, run, host, pid, pid_start FROM trials WHERE state = 'RUNNING'")
    address = _listener(daemon)
    good = {"run": run, "host": "elsewhere", "worker": "tcp://10.0.0.1:1", "pid": 4242,
            "start": 1, "gpus": []}
    frames = {
        "junk": b"\x00\xffnot json at all\n",
        "not an object": b"[1, 2]\n",
        "unknown op": b'{"op": "report", "run": "1-ab", "token": "t"}\n',
        "oversized": b"{" + b" " * 5000,
        "wrong token": (json.dumps({"op": "hello", "token": "guess", **good}) + "\n").encode(),
        "stale run": (json.dumps({"op": "hello", "token": "t", **{**good, "run": f"{tid}-0"}})
                      + "\n").encode(),
        "bad fields": (json.dumps({"op": "hello", "token": "t", **{**good, "pid": "x"}})
                       + "\n").encode(),
        "resume of an unknown run": (json.dumps({"op": "resume", "run": "99999-ab",
                                                 "token": "t", "pid": 1, "start": 1})
                                     + "\n").encode(),
    }
    for what, data in frames.items():
        answer = _refusal(address, data)
        assert answer["ok"] is False and answer["error"]["code"] == "refused", (what, answer)
    with socket.create_connection(address, timeout=10) as silent:  # no hello at all
        silent.settimeout(10)
        assert json.loads(silent.recv(65536))["error"]["message"].startswith("no hello")
    # Nothing stored: the running trial keeps its place, and still reports.
    assert _rows(daemon, "SELECT host, pid, pid_start, run FROM trials WHERE id = ?",
                 tid) == [(host, pid, start, run)]
    seq = _rows(daemon, "SELECT last_seq FROM trials WHERE id = ?", tid)[0][0]
    wait_until(lambda: _rows(daemon, "SELECT last_seq FROM trials WHERE id = ?",
                             tid)[0][0] > seq, 10, "more reports after the junk")
    assert daemon.proc.poll() is None
    assert daemon.ctl("stop", "l").returncode == 0


@pytest.mark.parametrize("hello, problem", [
    ({"op": "hello", "run": "12-ab", "token": "t", "host": "h", "worker": "w", "pid": 3,
      "start": 5, "gpus": ["GPU-a"]}, None),
    ({"op": "resume", "run": "12-ab", "token": "t", "pid": 3, "start": None}, None),
    ({"op": "log", "run": "12-ab", "token": "t"}, None),
    ({"op": "log", "run": "12", "token": "t"}, "bad run"),
    ({"op": "log", "run": "12-ab", "token": ""}, "bad token"),
    ({"op": "resume", "run": "12-ab", "token": "t", "pid": True}, "bad pid"),
    ({"op": "hello", "run": "12-ab", "token": "t", "host": "h", "worker": "w", "pid": 3,
      "gpus": [1]}, "bad gpus"),
    ({"op": "hello", "run": "12-ab", "token": "t", "host": 5, "worker": "w", "pid": 3},
     "bad host"),
])
def test_check_hello_names_the_bad_field(hello, problem):
    found = check_hello(hello)
    assert (found is None) if problem is None else (problem in found)


def test_listen_address_is_checked():
    from tuned.daemon.listener import parse_address

    assert parse_address("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_address("[::1]:8000") == ("::1", 8000)
    for bad in ("nohost", ":80", "h:port", "h:70000"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            parse_address(bad)


def test_dask_cluster_fixture_leaves_no_process(tmp_path):
    with DaskCluster(tmp_path / "c") as c:
        c.start(workers=1)
        pids = list(c.worker_pids.values())
    assert not [p for p in pids if _alive(p)]



def test_the_cluster_pool_counts_worker_threads_and_gpus_and_follows_resizes():
    from tuned.executors.dask_executor import ClusterPool

    pool = ClusterPool()
    assert not pool.admit("a", 1, 0)  # no worker yet
    assert "no worker" in pool.wait_reason("a", str)
    pool.resize(2, 1)
    assert pool.fits_ever(1, 2) is not None and "num_gpus" in pool.fits_ever(1, 2)
    first = pool.take(4, 1, "a")  # num_cpus is the worker's business: one thread a trial
    second = pool.take(0.5, 0, "a")
    assert first is not None and second is not None and pool.take(1, 0, "a") is None
    assert "worker thread" in pool.wait_reason("a", str)
    pool.resize(1, 1)  # a worker left: what runs goes on, nothing more starts
    pool.give(first)
    assert pool.take(1, 0, "b") is None
    pool.give(second)
    assert pool.take(1, 1, "b") is None  # held for "a", which waits longer
    pool.withdraw("a")
    assert pool.take(1, 1, "b") is not None
    held = pool.hold(1, ["GPU-x"])  # an adopted run holds its thread and GPU, even beyond
    assert len(pool.gpus_in_use) == 2 and held.gpus == ["cluster"] and pool.cpus_free == -1


def test_a_daemon_started_without_its_cluster_leaves_the_experiment_waiting(
        tmp_path, cluster, daemon):
    module = _module(tmp_path, epochs=30, step=0.1)
    assert daemon.ctl("submit", _spec(tmp_path, "later", module, trials=2)).returncode == 0
    wait_until(lambda: len(_rows(daemon, "SELECT id FROM trials WHERE state = 'RUNNING' "
                                 "AND last_seq >= 1")) == 2, 30, "two trials running")
    daemon.stop()  # SIGTERM: its trials wait for the next daemon
    daemon.start()  # no --dask
    summary = daemon.json("status", "later")["experiments"][0]
    assert summary["state"] == "RUNNING", summary
    assert "needs a daemon connected to a Dask cluster" in daemon.log()
    daemon.stop()
    daemon.start(args=("--dask-scheduler-file", cluster.scheduler_file))
    daemon.wait_state("later", ("COMPLETED",), timeout=60)
    _reports_exactly_once(daemon)
    assert [a for (a,) in _rows(daemon, "SELECT attempt FROM trials")] == [1, 1]


# -- TLS --------------------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _make_ca(folder: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
             "-subj", f"/CN=tuned test {name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=folder)


def _make_leaf(folder: Path, name: str, ca: str, serial: int) -> None:
    """`name`.pem and `name`.key: a certificate for client and server use, signed by `ca`
    with serial number `serial` (no host name in it: the clients do not check it)."""
    (folder / "leaf.ext").write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth,clientAuth\nsubjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid\n")
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN=tuned test {name}", cwd=folder)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-set_serial", str(serial), "-days", "2", "-out",
             f"{name}.pem", "-extfile", "leaf.ext", cwd=folder)


@pytest.fixture
def certs(tmp_path) -> dict[str, str]:
    """A CA, the daemon's and a worker's certificates signed by it, and an unrelated CA with
    a client certificate of its own (PEM files; made with the openssl command)."""
    assert shutil.which("openssl"), "the TLS tests make their certificates with openssl " \
        "(.ci/run installs it when missing)"
    folder = tmp_path / "certs"
    folder.mkdir()
    _make_ca(folder, "ca")
    _make_leaf(folder, "daemon", "ca", 1)
    _make_leaf(folder, "worker", "ca", 2)
    _make_ca(folder, "other-ca")
    _make_leaf(folder, "stranger", "other-ca", 1)
    return {f"{name}.{ext}": str(folder / f"{name}.{ext}")
            for name in ("ca", "daemon", "worker", "other-ca", "stranger")
            for ext in ("pem", "key")}


def _tls_args(certs: dict[str, str], cluster: DaskCluster) -> tuple[str, ...]:
    return ("--dask-scheduler-file", cluster.scheduler_file, "--tls-cert", certs["daemon.pem"],
            "--tls-key", certs["daemon.key"], "--tls-ca", certs["ca.pem"])


@pytest.fixture
def tls_cluster(tmp_path, certs):
    """The cluster (on tcp://) with the workers' Dask TLS files set: the CA, the worker's
    certificate and key."""
    with DaskCluster(tmp_path / "cluster") as c:
        c.start(workers=2, gpus_per_worker=1, nthreads=1, env={
            "TUNED_FAKE_GPUS": "GPU-fake-a",
            "DASK_DISTRIBUTED__COMM__TLS__CA_FILE": certs["ca.pem"],
            "DASK_DISTRIBUTED__COMM__TLS__WORKER__CERT": certs["worker.pem"],
            "DASK_DISTRIBUTED__COMM__TLS__WORKER__KEY": certs["worker.key"]})
        yield c


@pytest.fixture
def tls_daemon(tmp_path, tls_cluster, certs):
    d = Daemon(tmp_path)
    d.start(args=_tls_args(certs, tls_cluster))
    yield d
    d.close()


def test_trials_report_over_tls_and_programs_resume_their_channel_after_exec(
        tmp_path, tls_daemon):
    module = _module(tmp_path, epochs=3, step=0.01)
    assert tls_daemon.ctl("submit", _spec(tmp_path, "tls", module, trials=4)).returncode == 0
    spawned = _spec(tmp_path, "spawned", module, trials=2, extra='start_method = "spawn"')
    assert tls_daemon.ctl("submit", spawned).returncode == 0
    for name, trials in (("tls", 4), ("spawned", 2)):
        assert tls_daemon.wait_state(name, ("COMPLETED",), timeout=60)["trials"] == \
            {"COMPLETED": trials}
        for t in tls_daemon.json("trials", name)["trials"]:
            assert t["reports"] == 3 and t["worker"], t
            log = (tls_daemon.state / "logs" / name / f"trial-{t['trial']}.log").read_text()
            assert "gpus GPU-fake-a from 0" in log, log  # its output forwarded over TLS
    cluster = tls_daemon.json("status")["cluster"]
    assert cluster["tls"] is True and "over TLS" in tls_daemon.ctl("status").stdout
    # A command trial's program cannot inherit the TLS session: it resumes on its own.
    (tmp_path / "prog.py").write_text(textwrap.dedent("""
        import os
        import tuned.report as report

        print("report fd", os.environ["TUNED_REPORT_FD"], flush=True)
        for epoch in range(1, 4):
            report.report(epoch=epoch, accuracy=report.config()["x"] * epoch)
    """))
    spec = write_spec(tmp_path, "prog", """
        name = "prog"
        command = ["{python}", "prog.py"]
        executor = "dask"
        num_trials = 2
        [space]
        x = {type = "real", lower = 0, upper = 1}
    """)
    assert tls_daemon.ctl("submit", spec).returncode == 0
    assert tls_daemon.wait_state("prog", ("COMPLETED",), timeout=60)["trials"] == \
        {"COMPLETED": 2}
    for t in tls_daemon.json("trials", "prog")["trials"]:
        assert t["reports"] == 3, t
        log = (tls_daemon.state / "logs" / "prog" / f"trial-{t['trial']}.log").read_text()
        assert "report fd -1" in log, log
    _reports_exactly_once(tls_daemon)
    assert "TLS handshake failed" not in tls_daemon.log()


def test_a_daemon_killed_mid_trial_adopts_its_tls_trials_after_a_restart(
        tmp_path, tls_cluster, tls_daemon, certs):
    module = _module(tmp_path, epochs=15, step=0.1)
    assert tls_daemon.ctl("submit", _spec(tmp_path, "a", module, trials=2)).returncode == 0
    wait_until(lambda: len(_rows(tls_daemon, "SELECT id FROM trials WHERE state = 'RUNNING' "
                                 "AND last_seq >= 2")) == 2, 30, "two trials running")
    pids = _remote_pids(tls_daemon)
    tls_daemon.proc.send_signal(signal.SIGKILL)
    tls_daemon.proc.wait()
    time.sleep(0.3)
    assert all(_alive(p) for p in pids)
    tls_daemon.start(args=_tls_args(certs, tls_cluster))
    tls_daemon.wait_state("a", ("COMPLETED",), timeout=60)
    attempts = [a for (a,) in _rows(tls_daemon, "SELECT attempt FROM trials")]
    assert attempts == [1, 1], (attempts, tls_daemon.log()[-2000:])  # resumed over TLS
    assert "reconnected" in tls_daemon.log()
    _everything_accounted_for(tls_daemon, "a", 2, pids)


def _tls_client(certs: dict[str, str], name: str) -> ssl.SSLContext:
    from tuned.protocol.tcp import TlsFiles, client_context

    return client_context(TlsFiles(certs["ca.pem"], certs[f"{name}.pem"], certs[f"{name}.key"]))


def test_the_tls_listener_refuses_plain_tcp_and_certificates_of_another_ca(
        tmp_path, tls_daemon, certs):
    module = _module(tmp_path, epochs=400, step=0.1)
    assert tls_daemon.ctl("submit", _spec(tmp_path, "l", module, trials=1)).returncode == 0
    wait_until(lambda: _rows(tls_daemon, "SELECT id FROM trials WHERE state = 'RUNNING' "
                             "AND last_seq >= 1"), 30, "a trial running")
    (tid, run, host, pid, start), = _rows(
        tls_daemon, "SELECT id, run, host, pid, pid_start FROM trials WHERE state = 'RUNNING'")
    address = _listener(tls_daemon)
    hello = (json.dumps({"op": "hello", "run": run, "token": "guess", "host": "elsewhere",
                         "worker": "tcp://10.0.0.1:1", "pid": 4242, "start": 1, "gpus": []})
             + "\n").encode()
    with socket.create_connection(address, timeout=10) as plain:  # no TLS at all
        plain.sendall(hello)
        try:
            answer = plain.recv(65536)
        except ConnectionResetError:
            answer = b""
        assert answer == b""  # closed, nothing answered in clear text
    stranger = _tls_client(certs, "stranger")  # a certificate of the other CA
    with socket.create_connection(address, timeout=10) as raw, \
            pytest.raises((ssl.SSLError, ConnectionError)):
        with stranger.wrap_socket(raw) as sock:
            sock.sendall(hello)
            if not sock.recv(65536):  # TLS 1.3: the server refuses after the client's end
                raise ConnectionResetError("closed")
    # A client of the cluster's CA is heard, and refused for its wrong token, over TLS.
    with _tls_client(certs, "worker").wrap_socket(
            socket.create_connection(address, timeout=10)) as sock:
        sock.sendall(hello)
        answer = json.loads(sock.recv(65536))
        assert answer["error"]["message"].endswith("wrong token"), answer
    assert _rows(tls_daemon, "SELECT host, pid, pid_start, run FROM trials WHERE id = ?",
                 tid) == [(host, pid, start, run)]
    seq = _rows(tls_daemon, "SELECT last_seq FROM trials WHERE id = ?", tid)[0][0]
    wait_until(lambda: _rows(tls_daemon, "SELECT last_seq FROM trials WHERE id = ?",
                             tid)[0][0] > seq, 10, "more reports after the refusals")
    assert tls_daemon.proc.poll() is None
    assert tls_daemon.log().count("TLS handshake failed") == 2, tls_daemon.log()[-3000:]
    assert tls_daemon.ctl("stop", "l").returncode == 0


def _serve_listener(listener, sel, until, timeout: float = 10.0) -> None:
    """Run `listener`'s side of a daemon loop until `until()`."""
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "the listener did not get there in time"
        for key, _ in sel.select(0.05):
            listener.handle(key)
        listener.sweep()


def test_the_tls_listener_hands_over_every_decrypted_byte_and_refuses_bad_handshakes(certs):
    """In-process: a hello and the lines after it in one TLS record reach `on_hello` whole
    (`rest` holds what TLS had decrypted, which select() would never report); a plain TCP
    client and a certificate of another CA are refused at the handshake, without blocking."""
    import selectors
    import threading

    from tuned.daemon.listener import ReportListener
    from tuned.protocol.tcp import server_context

    heard: list[tuple[dict, bytes]] = []
    socks: list[socket.socket] = []

    def on_hello(sock, hello, rest):
        heard.append((hello, rest))
        socks.append(sock)
        return None

    listener = ReportListener("127.0.0.1", 0, on_hello, ssl_context=server_context(
        certs["daemon.pem"], certs["daemon.key"], certs["ca.pem"]))
    listener.open()
    sel = selectors.DefaultSelector()
    listener.register(sel)
    address = ("127.0.0.1", listener.port)
    lines = b"".join(b'{"seq":%d,"metrics":{"pad":"%s"}}\n' % (i, b"x" * 40)
                     for i in range(1, 120))
    hello = b'{"op":"log","run":"1-ab","token":"t"}\n'

    def client() -> None:
        with _tls_client(certs, "worker").wrap_socket(
                socket.create_connection(address, timeout=10)) as sock:
            sock.sendall(hello + lines)  # < 16 KiB: one TLS record
            sock.recv(1)  # until the test closes its end

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    try:
        _serve_listener(listener, sel, lambda: heard)
        assert heard[0] == ({"op": "log", "run": "1-ab", "token": "t"}, lines)
        refused = listener.refused
        with socket.create_connection(address, timeout=10) as plain:
            plain.sendall(hello)
            _serve_listener(listener, sel, lambda: listener.refused == refused + 1)
        stranger = threading.Thread(target=lambda: _ignore_errors(
            lambda: _tls_client(certs, "stranger").wrap_socket(
                socket.create_connection(address, timeout=10)).recv(1)), daemon=True)
        stranger.start()
        _serve_listener(listener, sel, lambda: listener.refused == refused + 2)
        assert len(heard) == 1 and not listener._pending
    finally:
        for sock in socks:
            sock.close()
        thread.join(5)
        listener.close()
        sel.close()


def _ignore_errors(fn) -> None:
    try:
        fn()
    except OSError:
        pass


def test_tls_flags_go_with_a_cluster_and_with_each_other(tmp_path, certs):
    def serve(*args: str) -> subprocess.CompletedProcess:
        return cli("tuned_main", "serve", "--state-dir", str(tmp_path / "s"), *args,
                   sock=str(tmp_path / "c.sock"))

    cert, key, ca = ("--tls-cert", certs["daemon.pem"]), ("--tls-key", certs["daemon.key"]), \
        ("--tls-ca", certs["ca.pem"])
    dask = ("--dask", "tcp://127.0.0.1:1")
    for args, says in [((*cert, *key), "--tls-cert is for the report listener"),
                       ((*dask, *cert), "--tls-cert needs --tls-key"),
                       ((*dask, *key), "--tls-key needs --tls-cert"),
                       ((*dask, *ca), "--tls-ca needs --tls-cert and --tls-key")]:
        out = serve(*args)
        assert out.returncode == 2 and says in out.stderr, (args, out.stderr)
    out = serve(*dask, *cert, "--tls-key", certs["ca.key"])  # not the certificate's key
    assert out.returncode == 1 and "--tls-cert" in out.stderr, out.stderr
    assert not (tmp_path / "s").exists()  # refused before anything was written


def test_a_worker_takes_its_tls_files_from_dask_config_or_the_environment(monkeypatch):
    import dask

    from tuned.executors.dask_worker import tls_files
    from tuned.protocol.tcp import TlsFiles

    for name in ("TUNED_TLS_CA", "TUNED_TLS_CERT", "TUNED_TLS_KEY"):
        monkeypatch.delenv(name, raising=False)
    with dask.config.set({"distributed.comm.tls.ca-file": None,
                          "distributed.comm.tls.worker.cert": None,
                          "distributed.comm.tls.worker.key": None}):
        with pytest.raises(ValueError, match="no CA file .* and no certificate"):
            tls_files()
    with dask.config.set({"distributed.comm.tls.ca-file": "/c/ca.pem",
                          "distributed.comm.tls.worker.cert": "/c/w.pem",
                          "distributed.comm.tls.worker.key": None}):
        assert tls_files() == TlsFiles("/c/ca.pem", "/c/w.pem", None)
        monkeypatch.setenv("TUNED_TLS_KEY", "/o/w.key")
        monkeypatch.setenv("TUNED_TLS_CA", "/o/ca.pem")
        assert tls_files() == TlsFiles("/o/ca.pem", "/c/w.pem", "/o/w.key")
