"""Command lines: `tuned` (the daemon, `tuned serve`, and reading a store directly) and
`tunectl` (talking to the daemon over its socket).

Contract for scripts:
- Exit codes: 0 ok, 1 error, 2 usage, 3 daemon not running, 4 not found (the `tunectl`
  column of the protocol's error table, `tuned.protocol.control.ERRORS`).
- `--json`, before or after the command, prints each answer as one JSON document on
  stdout, and every error as one JSON object ``{"error": {"code", "message"}}`` on stdout
  (a code of the table: the daemon's, or one of the client's own, ``usage``,
  ``no_daemon``, ``unavailable``, ``error``), with the code's exit status. Without it,
  errors go to stderr as ``error: <message>``.
- Human output fits 100 columns (`tuned.ui.render`).

`tunectl` starts once per command, so this module imports only what every command needs
(click, json, the package's version, the renderer); each command imports the rest itself:
the store, logging and the daemon for `tuned`, the lean control client (`tuned.daemon.client`, not
the server in `tuned.daemon.control`) for `tunectl`.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

from tuned._version import __version__
from tuned.ui import render

# Importing click makes many objects and no garbage: the collections its allocations set off
# find nothing, and cost a tunectl run about 8 ms. They are paused while it loads.
_collecting = gc.isenabled()
gc.disable()
try:
    import click
finally:
    if _collecting:
        gc.enable()

# What `trials` and `curves` show without --all: a page whose size does not grow with the
# experiment, like a pager's first screen (the last PAGE trials; the TOP_CURVES best curves).
PAGE = 50
TOP_CURVES = 20
EXPORT_PAGE = 5000


def fail(code: str, message: str) -> NoReturn:
    """End the command with an error of the protocol's table (`code`) and its exit code."""
    from tuned.protocol.control import ProtocolError

    raise ProtocolError(code, message)


@contextlib.contextmanager
def _talking(socket_path: str) -> Iterator[None]:
    """Talk to the daemon: its error answers end the command as they are (`ProtocolError`),
    no daemon at the socket as `no_daemon`, any other failure of the channel as `error`."""
    from tuned.daemon.client import ControlError, DaemonNotRunning

    try:
        yield
    except DaemonNotRunning as exc:
        fail("no_daemon", f"no tuned daemon at {socket_path} ({exc})")
    except ControlError as exc:
        fail("error", str(exc))


class _Output:
    """Whether this run prints JSON (`--json` anywhere before a ``--``)."""

    json = False


OUTPUT = _Output()


def _json_flag(command: Any) -> Any:
    """`--json` on a group or command; it only marks the run (see `run`)."""

    def mark(ctx: click.Context, param: click.Parameter, value: bool) -> None:
        if value:
            OUTPUT.json = True

    return click.option("--json", "json_flag", is_flag=True, expose_value=False,
                        callback=mark, help="Machine-readable output (also before the "
                        "command); errors as JSON objects.")(command)


def run(group: click.Group, args: list[str] | None, prog: str) -> NoReturn:
    """Run `group` on `args` (default: the process's) and exit with the documented code;
    errors are printed as the run's `--json` asks (see the module docstring)."""
    from tuned.protocol.control import ProtocolError

    args = sys.argv[1:] if args is None else list(args)
    head = args[:args.index("--")] if "--" in args else args
    OUTPUT.json = "--json" in head
    try:
        code = group.main(args=args, prog_name=prog, standalone_mode=False)
    except ProtocolError as exc:  # the daemon's error answers, the views' and `fail`'s
        _print_error(exc.code, exc.message)
        code = exc.exit_code
    except click.UsageError as exc:
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        _print_error("usage", exc.format_message() + hint)
        code = 2
    except click.ClickException as exc:
        _print_error("error", exc.format_message())
        code = exc.exit_code
    except click.exceptions.Abort:
        _print_error("error", "aborted")
        code = 1
    except KeyboardInterrupt:
        code = 130
    sys.exit(code if isinstance(code, int) else 0)


def _print_error(code: str, message: str) -> None:
    if OUTPUT.json:
        click.echo(json.dumps({"error": {"code": code, "message": message}}))
    else:
        click.echo(f"error: {message}", err=True)


def emit(data: Any, text: str | Callable[[], str]) -> None:
    """Print `data` as JSON with --json, else `text` (or what `text()` gives)."""
    if OUTPUT.json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
    else:
        click.echo(text() if callable(text) else text)


# -- options shared by both command lines ---------------------------------------------------


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
    if shown < total and not OUTPUT.json:
        last = first + shown - 1
        where = f"positions {first}-{last}" if shown else f"none from position {first}"
        click.echo(f"({shown} of {total} trials shown: {where}; --all lists every trial, "
                   "--limit and --offset another page)", err=True)


def show_trials(data: dict[str, Any]) -> None:
    """Print a `trials` answer: the table (`render.trials_text`), and on stderr which page
    it is when it is not every trial."""
    emit(data, lambda: render.trials_text(data))
    page_note(len(data["trials"]), data["offset"], data["total"])


def curves_options(command: Any) -> Any:
    """The options of `curves` (see `show_curves`)."""
    for option in reversed([
        click.option("--metric", default=None, help="The metric to draw [default: the "
                     "reward]."),
        click.option("--png", type=click.Path(dir_okay=False), default=None,
                     help="Also save the chart as a PNG (needs matplotlib)."),
        click.option("--top", type=click.IntRange(min=0), default=None,
                     help=f"The N trials of highest score [default: {TOP_CURVES}]."),
        click.option("--all", "show_all", is_flag=True,
                     help="Every trial's curve (the answer grows with the experiment)."),
        click.option("--best-so-far", is_flag=True, help="The best reward so far against "
                     "trials and against time, instead of the curves."),
    ]):
        command = option(command)
    return command


def curves_args(metric: str | None, top: int | None, show_all: bool) -> dict[str, Any]:
    if show_all and top is not None:
        raise click.UsageError("--all and --top exclude each other")
    args: dict[str, Any] = {"metric": metric} if metric else {}
    if not show_all:
        args["top"] = TOP_CURVES if top is None else top
    return args


def show_curves(data: dict[str, Any], png: str | None, show_all: bool) -> None:
    """Print a `curves` answer as a chart with a legend of the best trials (and save it as
    a PNG with `png`)."""
    from tuned.ui.charts import draw_curves_png, text_chart

    curves = {int(k): v for k, v in data["curves"].items()}
    mode = data.get("mode") or "max"
    if png:
        _png(lambda: draw_curves_png(curves, data["metric"], data["time_attr"], png,
                                     mode=mode, title=f"{data['experiment']}: "
                                     f"{render.metric_label(data['metric'], data.get('mode'))}"))
    emit(data, lambda: text_chart(curves, data["metric"], data["time_attr"], mode=mode)
         + (f"\nsaved {png}" if png else ""))
    total = data.get("total")
    if not OUTPUT.json and not show_all and total is not None and total > len(curves):
        click.echo(f"(the curves of the {len(curves)} best of {total} trials; --top N for "
                   "more, --all for every one)", err=True)


def show_progress(data: dict[str, Any], png: str | None) -> None:
    """Print a `progress` answer: best so far against trials and against time."""
    from tuned.ui.charts import best_so_far_chart, draw_best_so_far_png

    if png:
        _png(lambda: draw_best_so_far_png(data["by_trial"], data["by_time"], data["metric"],
                                          data["mode"], png,
                                          title=f"{data['experiment']}: best so far"))
    emit(data, lambda: best_so_far_chart(data["by_trial"], data["by_time"], data["metric"],
                                         data["mode"]) + (f"\nsaved {png}" if png else ""))


def _png(draw: Callable[[], None]) -> None:
    try:
        draw()
    except (RuntimeError, OSError) as exc:
        fail("error", str(exc))


def export_options(command: Any) -> Any:
    for option in reversed([
        click.option("--format", "fmt", type=click.Choice(["csv", "jsonl"]), default="csv",
                     show_default=True, help="CSV with a header, or one JSON object a line."),
        click.option("--reports", is_flag=True, help="One row per report (trial, seq, time, "
                     "reward, decision, created, a column per metric) instead of one per "
                     "trial (number, state, attempt, reward, times, a column per "
                     "parameter)."),
        click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True),
                     default=None, help="Write to this file instead of stdout."),
    ]):
        command = option(command)
    return command


def write_export(fetch: Callable[[int, Any, Any], dict[str, Any]], reports: bool,
                 fmt: str, output: str | None) -> None:
    """Write every page of export answers (`columns`, `rows`) as CSV or JSON Lines to
    `output` (default stdout). `fetch(offset, after, columns)` answers one page: trials from
    position `offset`, or reports after `after`, the [trial, seq] of the page before's last
    row (None: from the start), with the first page's `columns` (None: read them). A file is
    written whole or not at all (a temporary name, renamed at the end)."""
    from tuned.store.export import iter_pages, write_csv, write_jsonl

    first = fetch(0, None, None)
    columns = first["columns"]
    last: list[dict[str, Any]] = []

    def rows(offset: int, limit: int) -> list[dict[str, Any]]:
        if offset == 0:
            page = first["rows"]
        elif reports:
            page = fetch(offset, [last[0]["trial"], last[0]["seq"]], columns)["rows"]
        else:
            page = fetch(offset, None, None)["rows"]
        last[:] = page[-1:]
        return page

    target = output + ".tmp" if output else None
    try:
        with (open(target, "w", newline="", encoding="utf-8") if target
              else _stdout()) as out:
            pages = iter_pages(rows, EXPORT_PAGE)
            if fmt == "csv":
                write_csv(pages, columns, out)
            else:
                write_jsonl(pages, out)
        if target:
            os.replace(target, output)
    except OSError as exc:
        fail("error", f"cannot write {output or 'stdout'}: {exc}")
    finally:
        if target and os.path.exists(target):
            os.unlink(target)


class _stdout:
    """sys.stdout as a context manager that does not close it."""

    def __enter__(self) -> Any:
        return sys.stdout

    def __exit__(self, *exc: object) -> None:
        sys.stdout.flush()


# -- tuned -----------------------------------------------------------------------------------


def _store_candidates() -> list[str]:
    """Where `tuned`'s store commands look for a store without --db: the daemon's state
    directory (TUNED_STATE_DIR, else the default), then the in-process API's default."""
    from tuned.daemon.paths import DEFAULT_CHECKPOINT, default_state_dir, system_state_dir

    places = [os.path.join(default_state_dir(), "tuned.db")]
    if os.environ.get("TUNED_STATE_DIR"):
        places.append(os.path.join(system_state_dir(), "tuned.db"))
    places.append(DEFAULT_CHECKPOINT)
    return list(dict.fromkeys(places))


def _found_store() -> str | None:
    """The first of `_store_candidates` that exists, or None."""
    return next((p for p in _store_candidates() if os.path.isfile(p)), None)


def _open(db: str | None) -> Any:
    """The store to read (`db`, or `_found_store()`), opened read-only: nothing is created.
    Ends the command with `not_found` when there is none, `unavailable` when it cannot be
    read."""
    from tuned.store.database import Store, StoreError, StoreMissing

    if db is None:
        db = _found_store()
        if db is None:
            fail("not_found", "no store found (looked at "
                 f"{', '.join(_store_candidates())}); give --db FILE")
    try:
        return Store(db, readonly=True)
    except StoreMissing as exc:
        fail("not_found", str(exc))
    except StoreError as exc:
        fail("unavailable", str(exc))


def _store_experiment(store: Any, name: str) -> Any:
    from tuned.store import views

    return views.experiment(store, name)


def _complete_stored(ctx: click.Context, param: click.Parameter,
                     incomplete: str) -> list[str]:
    """Shell completion of experiment names from the store (never raises)."""
    try:
        from tuned.store.database import Store

        db = ctx.params.get("db") or _found_store()
        if db is None:
            return []
        store = Store(db, readonly=True)
        try:
            return [e.name for e in store.experiments() if e.name.startswith(incomplete)]
        finally:
            store.close()
    except Exception:
        return []


db_option = click.option("--db", default=None, type=click.Path(dir_okay=False),
                         help="The SQLite file of the experiments [default: the daemon's "
                              "store, TUNED_STATE_DIR/tuned.db, else the default state "
                              "directory's, else ./tuned-runs/tuned.db]. Read only.")
stored_experiment = click.argument("experiment", shell_complete=_complete_stored)


@click.group()
@click.version_option(__version__, prog_name="tuned")
@_json_flag
def tuned_group() -> None:
    """tuned: persistent hyperparameter tuning. Exit codes: 0 ok, 1 error, 2 usage,
    4 not found."""


def tuned_main(args: list[str] | None = None) -> NoReturn:
    """The `tuned` command line (see the module docstring)."""
    run(tuned_group, args, "tuned")


@tuned_group.command("experiments")
@db_option
@_json_flag
def experiments_cmd(db: str | None) -> None:
    """The experiments of a store: state, trials by state, best (as `tunectl status`)."""
    from tuned.store import views

    store = _open(db)
    data = {"experiments": [views.summary(store, e) for e in store.experiments()]}
    emit(data, lambda: render.status_text(data))


@tuned_group.command("best")
@db_option
@_json_flag
@stored_experiment
def best_cmd(db: str | None, experiment: str) -> None:
    """The best trial of EXPERIMENT: its number, reward and config (as `tunectl best`)."""
    from tuned.store import views

    store = _open(db)
    data = views.best(store, _store_experiment(store, experiment))
    emit(data, lambda: render.best_line(data))


@tuned_group.command("trials")
@db_option
@_json_flag
@page_options
@stored_experiment
def trials_cmd(db: str | None, experiment: str, limit: int | None, offset: int | None,
               show_all: bool) -> None:
    """The trials of EXPERIMENT: state, attempt, reports, reward, config, error (by default
    the last 50; as `tunectl trials`)."""
    from tuned.store import views

    limit, offset = page(limit, offset, show_all)
    store = _open(db)
    data = views.trials_page(store, _store_experiment(store, experiment), limit, offset)
    show_trials(data)


@tuned_group.command("curves")
@db_option
@_json_flag
@curves_options
@stored_experiment
def curves_cmd(db: str | None, experiment: str, metric: str | None, png: str | None,
               top: int | None, show_all: bool, best_so_far: bool) -> None:
    """Learning curves of EXPERIMENT's best trials, or its best so far (as `tunectl
    curves`)."""
    from tuned.store import views

    store = _open(db)
    exp = _store_experiment(store, experiment)
    if best_so_far:
        show_progress(views.progress(store, exp), png)
        return
    args = curves_args(metric, top, show_all)
    show_curves(views.curves(store, exp, args.get("metric"), args.get("top")), png, show_all)


@tuned_group.command("export")
@db_option
@_json_flag
@export_options
@stored_experiment
def export_cmd(db: str | None, experiment: str, fmt: str, reports: bool,
               output: str | None) -> None:
    """EXPERIMENT's trials (or reports) as CSV or JSON Lines (as `tunectl export`)."""
    from tuned.store import views
    from tuned.store.export import snapshot

    store = _open(db)
    exp = _store_experiment(store, experiment)
    with snapshot(store):  # one consistent state, whatever a daemon commits meanwhile
        write_export(lambda offset, after, columns: views.export_page(
            store, exp, reports, EXPORT_PAGE, offset, after, columns), reports, fmt, output)


def _absolute(path: str | None) -> str | None:
    """`path` made absolute (a daemon's files outlive its working directory), or None."""
    return os.path.abspath(path) if path else None


@tuned_group.command("serve")
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
@click.option("--dask", "dask_address", default=None, metavar="ADDRESS",
              help="Run the trials of specs with executor = \"dask\" on the Dask cluster "
              "whose scheduler is at ADDRESS (tcp://host:8786).")
@click.option("--dask-scheduler-file", default=None, metavar="FILE",
              help="As --dask, the scheduler's address read from its scheduler file.")
@click.option("--listen", default="127.0.0.1:0", show_default=True, metavar="HOST:PORT",
              help="The report listener that remote trials reach the daemon on (port 0: a "
              "free one, kept across restarts).")
@click.option("--advertise", default=None, metavar="HOST",
              help="The host name the workers reach the listener by [default: its HOST].")
@click.option("--shared-dir", default=None, metavar="DIR",
              help="A folder every Dask worker (and the daemon) sees at this path: the "
              "remote trials' checkpoints [default: the state directory].")
@click.option("--tls-cert", default=None, metavar="FILE",
              help="The report listener speaks TLS only, with this certificate (PEM; with "
              "--tls-key). The workers verify it against the CA of their Dask TLS config.")
@click.option("--tls-key", default=None, metavar="FILE",
              help="The private key of --tls-cert (PEM).")
@click.option("--tls-ca", default=None, metavar="FILE",
              help="Require client certificates signed by this CA (mutual TLS): the workers' "
              "Dask certificates.")
def serve_cmd(state_dir: str | None, socket_path: str | None, log_level: str,
              stop_trials: bool, dask_address: str | None, dask_scheduler_file: str | None,
              listen: str, advertise: str | None, shared_dir: str | None,
              tls_cert: str | None, tls_key: str | None, tls_ca: str | None) -> None:
    """Run the daemon: experiments from the socket and the spool, until SIGTERM. A refused
    start (another daemon, an unsafe socket folder, TLS files that cannot be loaded) writes
    nothing."""
    import logging

    from tuned.daemon.control import AlreadyRunning, ControlError, InsecureDirectory
    from tuned.daemon.daemon import (
        AlreadyServing,
        ClusterOptions,
        Daemon,
        ListenError,
        tls_flags_problem,
    )
    from tuned.daemon.listener import parse_address
    from tuned.daemon.paths import default_socket, default_state_dir
    from tuned.store.database import StoreError

    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cluster = None
    if dask_address and dask_scheduler_file:
        fail("usage", "give --dask or --dask-scheduler-file, not both")
    tls_given = next((flag for flag, value in (("--tls-cert", tls_cert), ("--tls-key", tls_key),
                                               ("--tls-ca", tls_ca)) if value), None)
    if tls_given and not (dask_address or dask_scheduler_file):
        fail("usage", f"{tls_given} is for the report listener: it needs --dask or "
             "--dask-scheduler-file")
    problem = tls_flags_problem(tls_cert, tls_key, tls_ca)
    if problem is not None:
        fail("usage", problem)
    if dask_address or dask_scheduler_file:
        try:
            parse_address(listen)
            import distributed  # noqa: F401
        except ValueError as exc:
            fail("usage", f"--listen: {exc}")
        except ImportError:
            fail("usage", "--dask needs Dask: pip install 'tuned[dask]'")
        cluster = ClusterOptions(dask_address, dask_scheduler_file, listen, advertise,
                                 _absolute(shared_dir), tls_cert=_absolute(tls_cert),
                                 tls_key=_absolute(tls_key), tls_ca=_absolute(tls_ca))
        try:
            cluster.ssl_context()  # a file that cannot be loaded: refused before anything
        except ValueError as exc:
            fail("error", str(exc))
    daemon = Daemon(state_dir or default_state_dir(), socket_path or default_socket(),
                    stop_trials=stop_trials, cluster=cluster)
    try:
        daemon.serve()
    except (AlreadyServing, AlreadyRunning, InsecureDirectory, ControlError,
            StoreError, ListenError) as exc:
        fail("error", str(exc))


# -- tunectl ---------------------------------------------------------------------------------


class Ctl:
    """What every tunectl command shares: the socket."""

    def __init__(self, socket_path: str):
        self.socket_path = socket_path

    def call(self, op: str, timeout: float = 10.0, **args: Any) -> dict[str, Any]:
        """One request, answered within `timeout` seconds (errors end the command: see
        `_talking`); the answer's fields without ``v`` and ``ok``."""
        from tuned.daemon.client import ControlClient

        with _talking(self.socket_path), \
                ControlClient(self.socket_path, timeout=timeout) as client:
            answer = client.request(op, **args)
        return {k: v for k, v in answer.items() if k not in ("v", "ok")}


def _complete_running(ctx: click.Context, param: click.Parameter,
                      incomplete: str) -> list[str]:
    """Shell completion of experiment names from the daemon (never raises)."""
    try:
        from tuned.daemon.client import ControlClient
        from tuned.daemon.paths import default_socket

        root = ctx.find_root()
        path = root.params.get("socket_path") or default_socket()
        with ControlClient(path, timeout=1.0) as client:
            names = [e["experiment"] for e in client.request("status")["experiments"]]
        return [n for n in names if n.startswith(incomplete)]
    except Exception:
        return []


experiment_arg = click.argument("experiment", shell_complete=_complete_running)


@click.group()
@click.version_option(__version__, prog_name="tunectl")
@click.option("--socket", "socket_path", default=None,
              help="The daemon's control socket [default: TUNED_SOCKET, or the daemon's].")
@_json_flag
@click.pass_context
def tunectl_group(ctx: click.Context, socket_path: str | None) -> None:
    """Control a running tuned daemon. Exit codes: 0 ok, 1 error, 2 usage, 3 daemon not
    running, 4 not found. --json (before or after the command): JSON answers and errors."""
    from tuned.daemon.paths import default_socket

    _no_final_collection()
    ctx.obj = Ctl(socket_path or default_socket())


def tunectl_main(args: list[str] | None = None) -> NoReturn:
    """The `tunectl` command line (see the module docstring)."""
    run(tunectl_group, args, "tunectl")


def _no_final_collection() -> None:
    """Spare this short-lived process the interpreter's garbage collections at exit: they
    walk every object its imports made (click's, mostly), about a sixth of a tunectl run,
    only to free memory the process gives back anyway. Freezing the objects (`gc.freeze`)
    from an atexit handler hides them from those collections; the exit is otherwise the
    usual one (atexit handlers, flushed streams)."""
    import atexit

    atexit.register(gc.freeze)


@tunectl_group.command("status")
@click.argument("experiment", required=False, shell_complete=_complete_running)
@_json_flag
@click.pass_obj
def ctl_status(ctl: Ctl, experiment: str | None) -> None:
    """Experiments: state (and why), trials by state, best so far, why one waits; CPUs and
    GPUs."""
    data = ctl.call("status", **({"experiment": experiment} if experiment else {}))
    emit(data, lambda: render.status_text(data))


@tunectl_group.command("best")
@experiment_arg
@_json_flag
@click.pass_obj
def ctl_best(ctl: Ctl, experiment: str) -> None:
    """The best trial: {"experiment", "trial", "config", "reward", "metric", "mode"} with
    --json."""
    data = ctl.call("best", experiment=experiment)
    emit(data, lambda: render.best_line(data))


@tunectl_group.command("trials")
@experiment_arg
@page_options
@_json_flag
@click.pass_obj
def ctl_trials(ctl: Ctl, experiment: str, limit: int | None, offset: int | None,
               show_all: bool) -> None:
    """The trials: state, attempt, reports, reward, config, error (by default the last 50;
    the JSON answer's "offset" and "total" say which)."""
    limit, offset = page(limit, offset, show_all)
    page_args = {"limit": limit} if limit is not None else {}
    data = ctl.call("trials", experiment=experiment, offset=offset, **page_args)
    show_trials(data)


@tunectl_group.command("curves")
@experiment_arg
@curves_options
@_json_flag
@click.pass_obj
def ctl_curves(ctl: Ctl, experiment: str, metric: str | None, png: str | None,
               top: int | None, show_all: bool, best_so_far: bool) -> None:
    """Learning curves of the best trials (a chart with a legend; a PNG with --png), or
    with --best-so-far the best reward so far against trials and time."""
    if best_so_far:
        show_progress(ctl.call("progress", experiment=experiment), png)
        return
    data = ctl.call("curves", experiment=experiment, **curves_args(metric, top, show_all))
    show_curves(data, png, show_all)


@tunectl_group.command("submit")
@click.argument("spec", type=click.Path(exists=True, dir_okay=False))
@_json_flag
@click.pass_obj
def ctl_submit(ctl: Ctl, spec: str) -> None:
    """Submit an experiment spec (TOML or JSON)."""
    with open(spec, encoding="utf-8", errors="replace") as f:
        text = f.read(2 << 20)
    # Answered once the experiment's template has loaded the entry (up to 120 s).
    data = ctl.call("submit", timeout=130.0, text=text, filename=os.path.basename(spec),
                    workdir=os.path.dirname(os.path.abspath(spec)))
    emit(data, f"submitted {data['experiment']}")


def _simple(op: str, doc: str) -> None:
    @tunectl_group.command(op, help=doc)
    @experiment_arg
    @_json_flag
    @click.pass_obj
    def command(ctl: Ctl, experiment: str) -> None:
        data = ctl.call(op, experiment=experiment)
        emit(data, f"{data['experiment']}: {data['state']}")


_simple("stop", "Stop an experiment: it ends STOPPED; its running trials get SIGTERM (SIGKILL "
                "5 s later) and end FAILED, nothing more starts. `resume` runs the rest of "
                "its budget.")
_simple("pause", "Pause an experiment: running trials stop at their next report, with their "
                 "reports kept; nothing new starts.")


@tunectl_group.command("resume")
@experiment_arg
@click.option("--num-trials", type=click.IntRange(min=1), default=None,
              help="A new budget: the total number of trials (more than it has made).")
@click.option("--time-out", type=click.FloatRange(min=0, min_open=True), default=None,
              help="A new budget: seconds from now.")
@_json_flag
@click.pass_obj
def ctl_resume(ctl: Ctl, experiment: str, num_trials: int | None,
               time_out: float | None) -> None:
    """Resume a paused experiment, or run a STOPPED or COMPLETED one again: its searcher
    and scheduler go on where they stopped, no finished trial runs again. A COMPLETED one
    needs a larger budget; --num-trials / --time-out also extend a running one."""
    budget = {k: v for k, v in (("num_trials", num_trials), ("time_out", time_out))
              if v is not None}
    data = ctl.call("resume", timeout=130.0, experiment=experiment, **budget)
    total = data.get("num_trials")
    emit(data, f"{data['experiment']}: {data['state']}"
         + (f" (num_trials {total})" if total is not None else ""))


@tunectl_group.command("delete")
@experiment_arg
@_json_flag
@click.pass_obj
def ctl_delete(ctl: Ctl, experiment: str) -> None:
    """Delete a finished experiment: its trials, reports, logs and checkpoints. Its name is
    free again. Refused while it runs (stop it first)."""
    data = ctl.call("delete", experiment=experiment)
    emit(data, f"deleted {data['experiment']}")


@tunectl_group.command("export")
@experiment_arg
@export_options
@_json_flag
@click.pass_obj
def ctl_export(ctl: Ctl, experiment: str, fmt: str, reports: bool,
               output: str | None) -> None:
    """The trials (or reports) as CSV or JSON Lines: one row per trial (number, state,
    attempt, reward, times, a column per parameter) or per report."""
    def fetch(offset: int | None, after: Any, columns: Any) -> dict[str, Any]:
        args = {"after": after, "columns": columns} if reports else {"offset": offset}
        return ctl.call("export", timeout=60.0, experiment=experiment, reports=reports,
                        limit=EXPORT_PAGE, **{k: v for k, v in args.items() if v is not None})

    write_export(fetch, reports, fmt, output)


@tunectl_group.command("kill")
@experiment_arg
@click.argument("trial", type=int)
@_json_flag
@click.pass_obj
def ctl_kill(ctl: Ctl, experiment: str, trial: int) -> None:
    """Kill one running trial (it ends FAILED)."""
    data = ctl.call("kill", experiment=experiment, trial=trial)
    emit(data, f"killed trial {trial} of {experiment}")


@tunectl_group.command("logs")
@experiment_arg
@click.argument("trial", type=int)
@click.option("-f", "--follow", is_flag=True, help="Keep printing what the trial writes.")
@_json_flag
@click.pass_obj
def ctl_logs(ctl: Ctl, experiment: str, trial: int, follow: bool) -> None:
    """A trial's output (stdout and stderr)."""
    data = ctl.call("logs", experiment=experiment, trial=trial, offset=0)
    if OUTPUT.json and not follow:
        emit(data, "")
        return
    click.echo(data["text"], nl=False)
    while follow:
        time.sleep(0.5)
        data = ctl.call("logs", experiment=experiment, trial=trial, offset=data["offset"])
        click.echo(data["text"], nl=False)


@tunectl_group.command("watch")
@click.argument("experiment", required=False, shell_complete=_complete_running)
@_json_flag
@click.pass_obj
def ctl_watch(ctl: Ctl, experiment: str | None) -> None:
    """Follow trials live: a line per start, report and end (Ctrl-C to leave)."""
    from tuned.daemon.client import ControlClient

    args = {"experiment": experiment} if experiment else {}
    try:
        with _talking(ctl.socket_path), ControlClient(ctl.socket_path) as client:
            frames = client.stream("watch", **args)
            first = next(frames)
            if OUTPUT.json:
                click.echo(json.dumps(first))
            else:
                for e in first["experiments"]:
                    click.echo(render.clip(f"{e['experiment']}: {e['state']}, "
                                           f"{render.counts_text(e['trials'])}"))
            sys.stdout.flush()
            for frame in frames:
                click.echo(json.dumps(frame) if OUTPUT.json else render.event_line(frame))
    except KeyboardInterrupt:
        return
