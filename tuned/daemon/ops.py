"""The daemon's control ops: one `op_<name>(args)` per request of the control protocol (the
protocol's own table of ops is `OPS`), apart from the loop that runs them, as supervisor
keeps its RPC interface apart from supervisord. `dispatch` is the control server's handler.

An op answers a dict of fields (the server adds ``"v"`` and ``"ok"``), a `Deferred` (answered
later: a submit or resume waits for its entry to load), a `Subscribe` (`watch`) or a `Handoff`
(`adopt`), or raises OpError (or a ProtocolError) with a code of the protocol's table.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from tuned._version import __version__
from tuned.core.lifecycle import BadTransition
from tuned.daemon.control import Deferred, Handoff, Subscribe
from tuned.engine.engine import Engine
from tuned.executors.template import TemplateExecutor
from tuned.experiment.spec import ExperimentSpec, SpecError
from tuned.protocol.control import is_text
from tuned.store import views

log = logging.getLogger("tuned.daemon")


class OpError(Exception):
    """An op that cannot be done: `code` from the protocol's error table."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class Ops:
    """The op handlers of daemon `d`, a `tuned.daemon.daemon.Daemon` (they read and change
    its store, runners and loop; not imported here, which would close a circle)."""

    def __init__(self, d: Any):
        self.d = d

    def dispatch(self, op: str, args: dict[str, Any], conn: Any = None) -> dict[str, Any]:
        """Answer one control request: a dict of fields (the server adds "v" and "ok"), or
        OpError."""
        if op == "adopt":
            return self.op_adopt(conn)
        handler = getattr(self, f"op_{op}", None)
        if handler is None:
            raise OpError("unknown_op", f"unknown op {op!r}; ops: {', '.join(OPS)}")
        return handler(args)

    def op_adopt(self, conn: Any) -> Handoff:
        """A trial of a dead daemon reconnects: the connection becomes its report channel.
        The trial is the one whose process is the peer (pid from SO_PEERCRED; the pid and
        start time were checked when it was adopted)."""
        for exp_id, runner in self.d.runners.items():
            trial_id = runner.engine.awaiting(conn.pid)
            if trial_id is not None:
                number = runner.engine.live[trial_id].trial.number

                def take(sock: socket.socket, rest: bytes, exp_id: int = exp_id,
                         engine: Engine = runner.engine, trial_id: int = trial_id) -> None:
                    events = engine.reconnected(trial_id, sock, rest)
                    self.d.adopted_events.setdefault(exp_id, []).extend(events)

                return Handoff({"experiment": runner.engine.experiment.name,
                                "trial": number}, take)
        raise OpError("not_found", f"no trial of process {conn.pid} waits to be adopted")

    def _experiment(self, args: dict[str, Any]):
        assert self.d.store is not None
        return views.experiment(self.d.store, args.get("experiment"))

    def _runner(self, args: dict[str, Any]) -> Any:
        exp = self._experiment(args)
        runner = self.d.runners.get(exp.id)
        if runner is None or runner.engine.ended is not None:
            ending = "" if runner is None else " (its last trials are ending)"
            raise OpError("conflict", f"experiment {exp.name!r} is {exp.state}, not "
                                      f"running{ending}")
        return runner

    def op_hello(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"server": "tuned", "version": __version__, "pid": os.getpid(),
                "state_dir": self.d.state_dir, "ops": list(OPS)}

    def op_status(self, args: dict[str, Any]) -> dict[str, Any]:
        assert self.d.store is not None
        exps = [self._experiment(args)] if args.get("experiment") else self.d.store.experiments()
        answer = {"experiments": [self._summary(e) for e in exps],
                  "gpus_in_use": self.d.resources.gpus_in_use,
                  "gpus_busy_foreign": self.d.resources.gpus.busy_foreign(),
                  "cpus_free": self.d.resources.cpus_free, "cpus": self.d.resources.cpus_total}
        if self.d.cluster is not None:
            answer["cluster"] = self.d.cluster.describe()
        return answer

    op_experiments = op_status

    def _summary(self, exp) -> dict[str, Any]:
        """One experiment in `status` (`views.summary`), with why it waits, if it does."""
        assert self.d.store is not None
        runner = self.d.runners.get(exp.id)
        waiting = runner.engine.resources.wait_reason(exp.id, self._name_of) \
            if runner is not None else None
        return views.summary(self.d.store, exp, waiting)

    def _name_of(self, experiment_id: Any) -> str:
        runner = self.d.runners.get(experiment_id)
        return repr(runner.engine.experiment.name) if runner else f"experiment {experiment_id}"

    def op_best(self, args: dict[str, Any]) -> dict[str, Any]:
        assert self.d.store is not None
        return views.best(self.d.store, self._experiment(args))

    def op_trials(self, args: dict[str, Any]) -> dict[str, Any]:
        """A page of the experiment's trials (`views.trials_page`): `limit` (default all)
        from `offset` (default 0; negative: counted from the end)."""
        assert self.d.store is not None
        exp = self._experiment(args)
        limit, offset = _count(args, "limit"), _integer(args, "offset") or 0
        self.d.trim_soon()
        return views.trials_page(self.d.store, exp, limit, offset)

    def op_curves(self, args: dict[str, Any]) -> dict[str, Any]:
        """Learning curves of `metric` (`views.curves`), of every trial or the `top`."""
        assert self.d.store is not None
        exp = self._experiment(args)
        top = _count(args, "top")
        self.d.trim_soon()
        return views.curves(self.d.store, exp, args.get("metric"), top)

    def op_progress(self, args: dict[str, Any]) -> dict[str, Any]:
        """The best reward so far against trials and against time (`views.progress`)."""
        assert self.d.store is not None
        return views.progress(self.d.store, self._experiment(args))

    def op_export(self, args: dict[str, Any]) -> dict[str, Any]:
        """A page of the export (`views.export_page`): trials, or with `reports` reports."""
        assert self.d.store is not None
        exp = self._experiment(args)
        self.d.trim_soon()
        return views.export_page(self.d.store, exp, bool(args.get("reports")),
                                 _count(args, "limit"), _count(args, "offset"),
                                 args.get("after"), args.get("columns"))

    def op_submit(self, args: dict[str, Any]) -> Deferred:
        """Answered once the experiment's template has loaded its entry."""
        from tuned.experiment.files import parse_spec_text

        text, filename = args.get("text"), args.get("filename", "spec.toml")
        workdir = args.get("workdir")
        if not isinstance(text, str) or not is_text(text):
            raise OpError("bad_request", "submit needs the spec's 'text'")
        if not isinstance(filename, str) or not is_text(filename) or \
                (workdir is not None and (not isinstance(workdir, str) or not is_text(workdir))):
            raise OpError("bad_request", "submit: 'filename' and 'workdir' must be strings")
        try:
            spec = parse_spec_text(text, filename, workdir)
        except SpecError as exc:
            raise OpError("invalid", str(exc)) from None
        deferred = Deferred()
        self.d.submit(spec, lambda result: self.d.server.resolve(deferred, result))
        return deferred

    def op_stop(self, args: dict[str, Any]) -> dict[str, Any]:
        """Stop a running experiment, or cancel a scheduled one."""
        exp = self._experiment(args)
        if exp.state == "SCHEDULED" and exp.id not in self.d.runners:
            assert self.d.store is not None
            self.d.store.set_experiment_state(exp.id, "STOPPED",
                                            "cancelled by the user before it started")
            self.d.jobs.cancel(exp.id)
            log.info("scheduled experiment %s cancelled", exp.name)
            return {"experiment": exp.name, "state": "STOPPED"}
        runner = self._runner(args)
        runner.engine.stop()
        return {"experiment": runner.engine.experiment.name, "state": "STOPPED"}

    def op_pause(self, args: dict[str, Any]) -> dict[str, Any]:
        runner = self._runner(args)
        runner.engine.pause()
        return {"experiment": runner.engine.experiment.name, "state": "PAUSED"}

    def op_resume(self, args: dict[str, Any]) -> dict[str, Any] | Deferred:
        """Resume a paused experiment, or run a STOPPED or COMPLETED one again with its
        remaining or a larger budget: `num_trials` (the new total), `time_out` (seconds
        from now). Its searcher and scheduler go on from their stored state; no finished
        trial runs again. Also extends a running experiment's budget."""
        exp = self._experiment(args)
        num_trials = _count(args, "num_trials")
        time_out = _seconds(args, "time_out")
        runner = self.d.runners.get(exp.id)
        if runner is not None and runner.engine.ended is not None:
            raise OpError("conflict", f"experiment {exp.name!r} is {exp.state} and its last "
                                      "trials are ending; resume it once they have")
        if exp.name in self.d.loading:
            raise OpError("conflict", f"experiment {exp.name!r} is loading its entry already")
        if runner is None and exp.state not in ("STOPPED", "COMPLETED"):
            hint = {"FAILED": "; fix the cause, then delete it and submit it again",
                    "SCHEDULED": "; it starts at its scheduled time"}.get(exp.state, "")
            raise OpError("conflict", f"experiment {exp.name!r} is {exp.state}: it cannot "
                                      f"be resumed{hint}")
        spec = self._extended(exp, num_trials, time_out, running=runner is not None)
        if runner is not None:
            runner.engine.extend(spec.get("num_trials"), spec.get("time_out"))
            if runner.engine.paused:
                runner.engine.resume()
            return self._resumed(exp.name, spec)
        executor = self.d.template(ExperimentSpec.from_dict(spec),
                                  os.path.join(self.d.state_dir, "logs", exp.name), wait=False)
        deferred = Deferred()
        self.d.load(ExperimentSpec.from_dict(spec), executor,
                   lambda result: self.d.server.resolve(deferred, result),
                   lambda ex: self._restart(exp.id, spec, ex))
        return deferred

    def _extended(self, exp: Any, num_trials: int | None, time_out: float | None,
                  running: bool) -> dict[str, Any]:
        """The experiment's spec with its new budget, stored; OpError `invalid` for a total
        below the trials made, `conflict` when a finished experiment would have nothing
        left to run."""
        assert self.d.store is not None
        spec = dict(exp.spec)
        made = sum(self.d.store.count_trials(exp.id).values())
        elapsed = self.d.store.seconds_since_first_trial(exp.id)
        if num_trials is not None:
            if num_trials < made or num_trials == 0:
                raise OpError("invalid", f"num_trials: {num_trials} is below the {made} "
                                         f"trial(s) {exp.name!r} has made (it is the new total)")
            spec["num_trials"] = num_trials
        if time_out is not None:
            spec["time_out"] = elapsed + time_out  # counted from the first trial, as stored
        left_trials = spec.get("num_trials") is None or made < spec["num_trials"]
        left_time = spec.get("time_out") is None or elapsed < spec["time_out"]
        if not running and not (left_trials and left_time):
            raise OpError("conflict", f"experiment {exp.name!r} is {exp.state} and its budget "
                                      f"is spent ({made} trial(s) made): give a larger "
                                      "num_trials (--num-trials N, the new total) or a "
                                      "time_out (--time-out S, seconds from now)")
        if spec != exp.spec:
            self.d.store.update_spec(exp.id, spec)
        return spec

    def _restart(self, experiment_id: int, spec: dict[str, Any],
                 executor: TemplateExecutor) -> dict[str, Any]:
        """Run a STOPPED or COMPLETED experiment again, its template loaded."""
        assert self.d.store is not None
        exp = self.d.store.experiment(experiment_id)
        try:
            self.d.store.set_experiment_state(experiment_id, "RUNNING")
        except BadTransition as exc:  # it changed while the template loaded
            executor.close_template()
            raise OpError("conflict", str(exc)) from None
        self.d.start_runner(experiment_id, executor)
        log.info("experiment %s resumed (num_trials %s, time_out %s)", exp.name,
                 spec.get("num_trials"), spec.get("time_out"))
        return self._resumed(exp.name, spec)

    @staticmethod
    def _resumed(name: str, spec: dict[str, Any]) -> dict[str, Any]:
        return {"experiment": name, "state": "RUNNING", "num_trials": spec.get("num_trials"),
                "time_out": spec.get("time_out")}

    def op_delete(self, args: dict[str, Any]) -> dict[str, Any]:
        """Delete a finished or scheduled experiment: its rows, logs and checkpoints; the
        name is free again. `conflict` while it runs (or is paused, or loading)."""
        exp = self._experiment(args)
        if exp.id in self.d.runners or exp.name in self.d.loading or \
                exp.state in ("RUNNING", "PAUSED"):
            raise OpError("conflict", f"experiment {exp.name!r} is {exp.state}: stop it "
                                      f"first (tunectl stop {exp.name})")
        self.d.delete(exp)
        return {"experiment": exp.name, "deleted": True}

    def op_kill(self, args: dict[str, Any]) -> dict[str, Any]:
        runner = self._runner(args)
        number = args.get("trial")
        if not isinstance(number, int) or not runner.engine.kill_trial(number):
            raise OpError("not_found", f"no running trial {number!r} in "
                                       f"{runner.engine.experiment.name!r}")
        return {"experiment": runner.engine.experiment.name, "trial": number, "killed": True}

    def op_watch(self, args: dict[str, Any]) -> Subscribe:
        """Stream events: trial starts, reports and ends (of EXPERIMENT, or of all)."""
        if args.get("experiment"):
            exp = self._experiment(args)
            return Subscribe(f"exp/{exp.name}", first={"ok": True, **self.op_status(args)})
        return Subscribe(None, first={"ok": True, **self.op_status({})})

    def op_logs(self, args: dict[str, Any]) -> dict[str, Any]:
        exp = self._experiment(args)
        number = args.get("trial")
        if not isinstance(number, int):
            raise OpError("bad_request", "logs needs a trial number")
        path = os.path.join(self.d.state_dir, "logs", exp.name, f"trial-{number}.log")
        offset = _integer(args, "offset") or 0
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if offset < 0:
                    offset = max(0, size + offset)
                f.seek(offset)
                data = f.read(256 * 1024)
        except FileNotFoundError:
            raise OpError("not_found", f"no log for trial {number} of {exp.name!r}") from None
        return {"experiment": exp.name, "trial": number, "offset": offset + len(data),
                "text": data.decode(errors="replace")}


_INT_MAX = (1 << 63) - 1  # SQLite's integers are 64-bit


def _count(args: dict[str, Any], key: str) -> int | None:
    """An optional non-negative integer argument; OpError `bad_request` if it is not one."""
    value = args.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _INT_MAX:
        raise OpError("bad_request", f"{key} must be an integer >= 0, got {value!r}")
    return value


def _integer(args: dict[str, Any], key: str) -> int | None:
    """An optional integer argument (negative allowed); OpError `bad_request` otherwise."""
    value = args.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or abs(value) > _INT_MAX:
        raise OpError("bad_request", f"{key} must be an integer, got {value!r}")
    return value


def _seconds(args: dict[str, Any], key: str) -> float | None:
    """An optional number of seconds > 0; OpError `bad_request` otherwise."""
    value = args.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not 0 < value < 1e12:
        raise OpError("bad_request", f"{key} must be a number of seconds > 0, got {value!r}")
    return float(value)


OPS = ("hello", "status", "experiments", "trials", "best", "curves", "submit", "stop", "pause",
       "resume", "kill", "logs", "watch", "delete", "progress", "export", "adopt")
