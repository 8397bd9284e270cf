"""Command lines: `tuned` (the daemon, `tuned serve`, and reading a store directly) and
`tunectl` (talking to the daemon over its socket).

Exit codes: 0 ok, 1 error, 2 usage, 3 daemon not running, 4 not found.

`tunectl` starts once per command, so this module imports only what every command needs
(click, json, the package's version); each command imports the rest itself: the store,
logging and the daemon for `tuned`, the lean control client (`tuned.client`, not the
server in `tuned.control`) for `tunectl`.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from typing import Any

from tuned import __version__
from tuned.paths import DEFAULT_CHECKPOINT

# Importing click makes many objects and no garbage: the collections its allocations set off
# find nothing, and cost a tunectl run about 8 ms. They are paused while it loads.
_collecting = gc.isenabled()
gc.disable()
try:
    import click
finally:
    if _collecting:
        gc.enable()

EXIT_ERROR, EXIT_NO_DAEMON, EXIT_NOT_FOUND = 1, 3, 4
# What `trials` and `curves` show without --all: a page whose size does not grow with the
# experiment, like a pager's first screen (the last PAGE trials; the TOP_CURVES best curves).
PAGE = 50
TOP_CURVES = 20

db_option = click.option("--db", default=DEFAULT_CHECKPOINT, show_default=True,
                         type=click.Path(dir_okay=False),
                         help="The SQLite file of the experiments (a run's `checkpoint`).")
json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


def _open(db: str) -> Any:
    from tuned.store import Store, StoreError

    try:
        return Store(db, preallocate=False)
    except StoreError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_ERROR)


def _experiment(store: Any, name: str) -> Any:
    from tuned.store import NotFound

    try:
        return store.experiment(name)
    except NotFound:
        click.echo(f"error: no experiment {name!r} in {store.path}", err=True)
        sys.exit(EXIT_NOT_FOUND)


def _emit(data: Any, as_json: bool, text: str) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True) if as_json else text)


@click.group()
@click.version_option(__version__, prog_name="tuned")
def tuned_main() -> None:
    """tuned: persistent hyperparameter tuning."""


@tuned_main.command("experiments")
@db_option
@json_option
def experiments_cmd(db: str, as_json: bool) -> None:
    """List the experiments in a store, with their trials by state and best reward."""
    store = _open(db)
    rows = []
    for exp in store.experiments():
        best = store.best_trial(exp.id)
        rows.append({"experiment": exp.name, "state": exp.state,
                     "trials": store.count_trials(exp.id),
                     "best_reward": best.last_reward if best else None})
    text = "\n".join(f"{r['experiment']:<24} {r['state']:<10} best={r['best_reward']} "
                     f"{r['trials']}" for r in rows) or "no experiments"
    _emit(rows, as_json, text)


@tuned_main.command("best")
@db_option
@json_option
@click.argument("experiment")
def best_cmd(db: str, as_json: bool, experiment: str) -> None:
    """The best trial of EXPERIMENT: its number, config and reward."""
    store = _open(db)
    exp = _experiment(store, experiment)
    best = store.best_trial(exp.id)
    if best is None:
        click.echo(f"error: experiment {experiment!r} has no reported trial yet", err=True)
        sys.exit(EXIT_NOT_FOUND)
    data = {"experiment": exp.name, "trial": best.number, "config": best.config,
            "reward": best.last_reward}
    _emit(data, as_json, f"trial {best.number}: reward {best.last_reward} "
                         f"config {json.dumps(best.config)}")


def page_options(command: Any) -> Any:
    """--limit, --offset and --all of a command listing trials (see `page`)."""
    command = click.option("--all", "show_all", is_flag=True,
                           help="Every trial (the output grows with the experiment).")(command)
    command = click.option("--offset", type=click.IntRange(min=0), default=None,
                           help="Start at this position (trials by number) instead of "
                                "showing the last ones.")(command)
    return click.option("--limit", type=click.IntRange(min=0), default=None,
                        help=f"At most this many trials [default: {PAGE}].")(command)


def page(limit: int | None, offset: int | None, show_all: bool) -> tuple[int | None, int]:
    """(limit, offset) of the trials to list: by default the last PAGE trials (offset
    -limit, from the end), as `tail` shows the end of a log; `--offset` pages from the
    start; `--all` lists every one (no limit). A usage error for --all with --limit."""
    if show_all:
        if limit is not None:
            raise click.UsageError("--all and --limit exclude each other")
        return None, offset or 0
    limit = PAGE if limit is None else limit
    return limit, (-limit if offset is None else offset)


def page_note(shown: int, first: int, total: int) -> None:
    """On stderr, when the page is not every trial: which trials it holds and how to see
    the others (stdout keeps only the listing)."""
    if shown < total:
        last = first + shown - 1
        where = f"positions {first}-{last}" if shown else f"none from position {first}"
        click.echo(f"({shown} of {total} trials shown: {where}; --all lists every trial, "
                   "--limit and --offset another page)", err=True)


@tuned_main.command("trials")
@db_option
@json_option
@page_options
@click.argument("experiment")
def trials_cmd(db: str, as_json: bool, experiment: str, limit: int | None,
               offset: int | None, show_all: bool) -> None:
    """The trials of EXPERIMENT: state, attempts, reports, last reward, error (by default
    the last 50)."""
    limit, offset = page(limit, offset, show_all)
    store = _open(db)
    exp = _experiment(store, experiment)
    rows = [{"trial": t.number, "state": t.state, "attempt": t.attempt, "reports": t.last_seq,
             "reward": t.last_reward, "config": t.config, "error": t.error, "parent": t.parent}
            for t in store.trials(exp.id, limit=limit, offset=offset)]
    text = "\n".join(f"{r['trial']:>5} {r['state']:<10} reports={r['reports']:<4} "
                     f"reward={r['reward']} {json.dumps(r['config'])}"
                     + (f"  error: {r['error']}" if r["error"] else "") for r in rows)
    _emit(rows, as_json, text or "no trials")
    if not as_json:
        total = sum(store.count_trials(exp.id).values())
        page_note(len(rows), offset if offset >= 0 else max(0, total + offset), total)


@tuned_main.command("serve")
@click.option("--state-dir", default=None, help="State directory [default: TUNED_STATE_DIR, "
              "/var/lib/tuned as root, else $XDG_STATE_HOME/tuned].")
@click.option("--socket", "socket_path", default=None, help="Control socket [default: "
              "TUNED_SOCKET, /run/tuned/control.sock as root, else "
              "$XDG_RUNTIME_DIR/tuned/control.sock].")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
@click.option("--stop-trials", is_flag=True, help="On SIGTERM stop the running trials (they "
              "run again on the next start) instead of leaving them to the next daemon, "
              "which adopts them.")
def serve_cmd(state_dir: str | None, socket_path: str | None, log_level: str,
              stop_trials: bool) -> None:
    """Run the daemon: experiments from the socket and the spool, until SIGTERM."""
    import logging

    from tuned.control import AlreadyRunning, InsecureDirectory
    from tuned.daemon import AlreadyServing, Daemon
    from tuned.paths import default_socket, default_state_dir
    from tuned.store import StoreError

    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    daemon = Daemon(state_dir or default_state_dir(), socket_path or default_socket(),
                    stop_trials=stop_trials)
    try:
        daemon.serve()
    except (AlreadyServing, AlreadyRunning, InsecureDirectory, StoreError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_ERROR)


# -- tunectl ---------------------------------------------------------------------------------


class Ctl:
    """What every tunectl command shares: the socket and the output format."""

    def __init__(self, socket_path: str, as_json: bool):
        self.socket_path = socket_path
        self.as_json = as_json

    def call(self, op: str, timeout: float = 10.0, **args: Any) -> dict[str, Any]:
        """One request, answered within `timeout` seconds; on failure print the error and
        exit with its code."""
        from tuned.client import ControlClient, ControlError, DaemonNotRunning
        from tuned.protocol import ProtocolError

        try:
            with ControlClient(self.socket_path, timeout=timeout) as client:
                return client.request(op, **args)
        except DaemonNotRunning as exc:
            click.echo(f"error: no tuned daemon at {self.socket_path} ({exc})", err=True)
            sys.exit(EXIT_NO_DAEMON)
        except (ControlError, ProtocolError) as exc:
            click.echo(f"error: {getattr(exc, 'message', exc)}", err=True)
            sys.exit(getattr(exc, "exit_code", EXIT_ERROR))

    def emit(self, data: dict[str, Any], text: str) -> None:
        payload = {k: v for k, v in data.items() if k not in ("v", "ok")}
        _emit(payload, self.as_json, text)


@click.group()
@click.version_option(__version__, prog_name="tunectl")
@click.option("--socket", "socket_path", default=None,
              help="The daemon's control socket [default: TUNED_SOCKET, or the daemon's].")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def tunectl_main(ctx: click.Context, socket_path: str | None, as_json: bool) -> None:
    """Control a running tuned daemon. Exit codes: 0 ok, 1 error, 2 usage, 3 daemon not
    running, 4 not found."""
    from tuned.paths import default_socket

    _no_final_collection()
    ctx.obj = Ctl(socket_path or default_socket(), as_json)


def _no_final_collection() -> None:
    """Spare this short-lived process the interpreter's garbage collections at exit: they
    walk every object its imports made (click's, mostly), about a sixth of a tunectl run,
    only to free memory the process gives back anyway. Freezing the objects (`gc.freeze`)
    from an atexit handler hides them from those collections; the exit is otherwise the
    usual one (atexit handlers, flushed streams)."""
    import atexit
    import gc

    atexit.register(gc.freeze)


def _best_text(best: dict[str, Any] | None) -> str:
    if not best:
        return "-"
    return f"trial {best['trial']} reward {best['reward']:.6g} {json.dumps(best['config'])}"


@tunectl_main.command("status")
@click.argument("experiment", required=False)
@click.pass_obj
def ctl_status(ctl: Ctl, experiment: str | None) -> None:
    """Experiments with their state, trials by state and best so far; GPUs in use."""
    data = ctl.call("status", **({"experiment": experiment} if experiment else {}))
    lines = [f"{e['experiment']:<28} {e['state']:<10} "
             + " ".join(f"{k.lower()}={v}" for k, v in sorted(e["trials"].items()))
             + f"  best: {_best_text(e['best'])}" for e in data["experiments"]]
    lines.append(f"CPUs free {data['cpus_free']:g} of {data['cpus']:g}; GPUs in use: "
                 f"{', '.join(data['gpus_in_use']) or 'none'}")
    ctl.emit(data, "\n".join(lines))


@tunectl_main.command("best")
@click.argument("experiment")
@click.pass_obj
def ctl_best(ctl: Ctl, experiment: str) -> None:
    """The best trial: {"experiment", "trial", "config", "reward"} with --json."""
    data = ctl.call("best", experiment=experiment)
    ctl.emit(data, _best_text(data))


@tunectl_main.command("trials")
@click.argument("experiment")
@page_options
@click.pass_obj
def ctl_trials(ctl: Ctl, experiment: str, limit: int | None, offset: int | None,
               show_all: bool) -> None:
    """The trials: state, attempt, reports, last reward, config, error (by default the last
    50; the JSON answer's "offset" and "total" say which)."""
    limit, offset = page(limit, offset, show_all)
    page_args = {"limit": limit} if limit is not None else {}
    data = ctl.call("trials", experiment=experiment, offset=offset, **page_args)
    ctl.emit(data, "\n".join(
        f"{t['trial']:>5} {t['state']:<10} attempt={t['attempt']} reports={t['reports']:<4} "
        f"reward={t['reward']} {json.dumps(t['config'])}"
        + (f"  from trial {t['parent']}" if t.get("parent") is not None else "")
        + (f"  error: {t['error']}" if t["error"] else "") for t in data["trials"]))
    if not ctl.as_json:
        page_note(len(data["trials"]), data["offset"], data["total"])


@tunectl_main.command("curves")
@click.argument("experiment")
@click.option("--metric", default=None, help="The metric to draw [default: the reward].")
@click.option("--png", type=click.Path(dir_okay=False), default=None,
              help="Also save the chart as a PNG (needs matplotlib).")
@click.option("--top", type=click.IntRange(min=0), default=None,
              help=f"The N trials of highest score [default: {TOP_CURVES}].")
@click.option("--all", "show_all", is_flag=True,
              help="Every trial's curve (the answer grows with the experiment).")
@click.pass_obj
def ctl_curves(ctl: Ctl, experiment: str, metric: str | None, png: str | None,
               top: int | None, show_all: bool) -> None:
    """Learning curves of the best trials: a chart in the terminal, a PNG with --png."""
    from tuned.curves import draw_curves_png, text_chart

    if show_all and top is not None:
        raise click.UsageError("--all and --top exclude each other")
    args: dict[str, Any] = {"metric": metric} if metric else {}
    if not show_all:
        args["top"] = TOP_CURVES if top is None else top
    data = ctl.call("curves", experiment=experiment, **args)
    curves = {int(k): v for k, v in data["curves"].items()}
    if png:
        draw_curves_png(curves, data["metric"], data["time_attr"], png)
    ctl.emit(data, text_chart(curves, data["metric"], data["time_attr"])
             + (f"\nsaved {png}" if png else ""))
    total = data.get("total")
    if not ctl.as_json and not show_all and total is not None and total > len(curves):
        click.echo(f"(the curves of the {len(curves)} best of {total} trials; --top N for "
                   "more, --all for every one)", err=True)


@tunectl_main.command("submit")
@click.argument("spec", type=click.Path(exists=True, dir_okay=False))
@click.pass_obj
def ctl_submit(ctl: Ctl, spec: str) -> None:
    """Submit an experiment spec (TOML or JSON)."""
    with open(spec, encoding="utf-8", errors="replace") as f:
        text = f.read(2 << 20)
    # Answered once the experiment's template has loaded the entry (up to 120 s).
    data = ctl.call("submit", timeout=130.0, text=text, filename=os.path.basename(spec),
                    workdir=os.path.dirname(os.path.abspath(spec)))
    ctl.emit(data, f"submitted {data['experiment']}")


def _simple(op: str, doc: str) -> None:
    @tunectl_main.command(op, help=doc)
    @click.argument("experiment")
    @click.pass_obj
    def command(ctl: Ctl, experiment: str) -> None:
        data = ctl.call(op, experiment=experiment)
        ctl.emit(data, f"{data['experiment']}: {data['state']}")


_simple("stop", "Stop an experiment: its trials end, nothing more starts.")
_simple("pause", "Pause an experiment: running trials stop at their next report, with their "
                 "reports kept; nothing new starts.")
_simple("resume", "Resume a paused experiment.")


@tunectl_main.command("kill")
@click.argument("experiment")
@click.argument("trial", type=int)
@click.pass_obj
def ctl_kill(ctl: Ctl, experiment: str, trial: int) -> None:
    """Kill one running trial (it ends FAILED)."""
    data = ctl.call("kill", experiment=experiment, trial=trial)
    ctl.emit(data, f"killed trial {trial} of {experiment}")


@tunectl_main.command("logs")
@click.argument("experiment")
@click.argument("trial", type=int)
@click.option("-f", "--follow", is_flag=True, help="Keep printing what the trial writes.")
@click.pass_obj
def ctl_logs(ctl: Ctl, experiment: str, trial: int, follow: bool) -> None:
    """A trial's output (stdout and stderr)."""
    data = ctl.call("logs", experiment=experiment, trial=trial, offset=0)
    if ctl.as_json and not follow:
        ctl.emit(data, "")
        return
    click.echo(data["text"], nl=False)
    while follow:
        time.sleep(0.5)
        data = ctl.call("logs", experiment=experiment, trial=trial, offset=data["offset"])
        click.echo(data["text"], nl=False)


@tunectl_main.command("watch")
@click.argument("experiment", required=False)
@click.pass_obj
def ctl_watch(ctl: Ctl, experiment: str | None) -> None:
    """Follow trials live: a line per start, report and end (Ctrl-C to leave)."""
    from tuned.client import ControlClient, ControlError, DaemonNotRunning
    from tuned.protocol import ProtocolError

    args = {"experiment": experiment} if experiment else {}
    try:
        with ControlClient(ctl.socket_path) as client:
            frames = client.stream("watch", **args)
            first = next(frames)
            if ctl.as_json:
                click.echo(json.dumps(first))
            else:
                for e in first["experiments"]:
                    click.echo(f"{e['experiment']}: {e['state']} {e['trials']}")
            sys.stdout.flush()
            for frame in frames:
                click.echo(json.dumps(frame) if ctl.as_json else _event_line(frame))
    except KeyboardInterrupt:
        return
    except DaemonNotRunning as exc:
        click.echo(f"error: no tuned daemon at {ctl.socket_path} ({exc})", err=True)
        sys.exit(EXIT_NO_DAEMON)
    except (ControlError, ProtocolError) as exc:
        click.echo(f"error: {getattr(exc, 'message', exc)}", err=True)
        sys.exit(getattr(exc, "exit_code", EXIT_ERROR))


def _event_line(event: dict[str, Any]) -> str:
    head = f"{event.get('experiment')} trial {event.get('trial')}"
    kind = event.get("event")
    if kind == "start":
        return f"{head} started (attempt {event['attempt']}) {json.dumps(event['config'])}"
    if kind == "report":
        return (f"{head} report {event['seq']}: reward {event['reward']:.6g} at "
                f"{event['time']:g} -> {event['decision']}")
    if kind == "end":
        return f"{head} ended {event['state']}" + (f": {event['error']}" if event["error"]
                                                    else "")
    return json.dumps(event)
