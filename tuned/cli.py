"""Command lines: `tuned` (read a store) and `tunectl` (talk to the daemon).

The daemon (`tuned serve`) and its control socket come later; until then `tuned` reads the
SQLite file of an in-process run directly, and `tunectl` says that no daemon runs.

Exit codes: 0 ok, 1 error, 2 usage, 3 daemon not running, 4 not found.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from tuned import __version__
from tuned.scheduler import DEFAULT_CHECKPOINT
from tuned.store import NotFound, Store, StoreError

EXIT_ERROR, EXIT_NO_DAEMON, EXIT_NOT_FOUND = 1, 3, 4

db_option = click.option("--db", default=DEFAULT_CHECKPOINT, show_default=True,
                         type=click.Path(dir_okay=False),
                         help="The SQLite file of the experiments (a run's `checkpoint`).")
json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


def _open(db: str) -> Store:
    try:
        return Store(db, preallocate=False)
    except StoreError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_ERROR)


def _experiment(store: Store, name: str):
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


@tuned_main.command("trials")
@db_option
@json_option
@click.argument("experiment")
def trials_cmd(db: str, as_json: bool, experiment: str) -> None:
    """The trials of EXPERIMENT: state, attempts, reports, last reward, error."""
    store = _open(db)
    exp = _experiment(store, experiment)
    rows = [{"trial": t.number, "state": t.state, "attempt": t.attempt, "reports": t.last_seq,
             "reward": t.last_reward, "config": t.config, "error": t.error}
            for t in store.trials(exp.id)]
    text = "\n".join(f"{r['trial']:>5} {r['state']:<10} reports={r['reports']:<4} "
                     f"reward={r['reward']} {json.dumps(r['config'])}"
                     + (f"  error: {r['error']}" if r["error"] else "") for r in rows)
    _emit(rows, as_json, text or "no trials")


@click.command()
@click.version_option(__version__, prog_name="tunectl")
def tunectl_main() -> None:
    """Control a running tuned daemon."""
    click.echo("error: no tuned daemon is running (the daemon, `tuned serve`, is not part "
               "of this version; read a run's results with `tuned experiments --db FILE`)",
               err=True)
    sys.exit(EXIT_NO_DAEMON)
