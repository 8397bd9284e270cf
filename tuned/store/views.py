"""What the read ops answer, built from the store: experiments' summaries, the best trial, a
page of trials, learning curves, best so far and export pages.

The daemon's control ops and `tuned`'s commands that read a store directly both answer
through these functions, so the two give the same fields for the same experiment. Each
returns a dict of JSON values (the fields of the op's answer, without ``v`` and ``ok``).
Errors are `ProtocolError`s with a code of the protocol's table: ``not_found`` (no such
experiment, no reported trial, no such metric), ``bad_request`` (an ill-typed argument).
"""

from __future__ import annotations

import contextlib
from typing import Any

from tuned.core.curves import best_so_far, curve_points
from tuned.protocol.control import ProtocolError, is_text
from tuned.store import export
from tuned.store.database import Experiment, NotFound, Store

#: The most rows one export page may hold.
MAX_EXPORT_PAGE = 10_000


def experiment(store: Store, name: Any) -> Experiment:
    """The experiment named `name`; ProtocolError `bad_request` for a name that is not a
    valid string, `not_found` for an unknown one."""
    if not isinstance(name, str) or not name or not is_text(name):
        raise ProtocolError("bad_request", "this op needs an 'experiment' name (valid Unicode)")
    try:
        return store.experiment(name)
    except NotFound:
        raise ProtocolError("not_found", f"no experiment {name!r}") from None


def metric_of(exp: Experiment) -> tuple[str, str]:
    """The experiment's reward metric and its direction ("max" or "min")."""
    return exp.spec.get("reward_attr", "accuracy"), exp.spec.get("mode", "max")


def summary(store: Store, exp: Experiment, waiting: str | None = None) -> dict[str, Any]:
    """One experiment as `status` lists it: state and the reason for it, why it waits
    (`waiting`, known to a daemon only), trials by state, budget, metric, best trial."""
    best = store.best_trial(exp.id)
    metric, mode = metric_of(exp)
    return {"experiment": exp.name, "state": exp.state, "reason": exp.reason,
            "waiting": waiting, "trials": store.count_trials(exp.id),
            "num_trials": exp.spec.get("num_trials"), "time_out": exp.spec.get("time_out"),
            "metric": metric, "mode": mode,
            "best": None if best is None else {"trial": best.number,
                                               "reward": best.last_reward,
                                               "config": best.config}}


def best(store: Store, exp: Experiment) -> dict[str, Any]:
    """The best trial: number, config, reward, with the metric and its direction;
    `not_found` before any trial reported."""
    trial = store.best_trial(exp.id)
    if trial is None:
        raise ProtocolError("not_found", f"experiment {exp.name!r} has no reported trial yet")
    metric, mode = metric_of(exp)
    return {"experiment": exp.name, "trial": trial.number, "config": trial.config,
            "reward": trial.last_reward, "metric": metric, "mode": mode}


def trials_page(store: Store, exp: Experiment, limit: int | None,
                offset: int) -> dict[str, Any]:
    """A page of the experiment's trials by number: `limit` (None: all) from `offset`
    (negative: counted from the end, -50 the last 50). The answer's `offset` is the
    position of its first trial, `total` the experiment's number of trials."""
    rows = store.trials(exp.id, limit=limit, offset=offset)
    total = sum(store.count_trials(exp.id).values())
    metric, mode = metric_of(exp)
    return {"experiment": exp.name, "total": total, "metric": metric, "mode": mode,
            "offset": offset if offset >= 0 else max(0, total + offset), "trials": [
                {"trial": t.number, "state": t.state, "attempt": t.attempt,
                 "reports": t.last_seq, "reward": t.last_reward, "config": t.config,
                 "error": t.error, "pid": t.pid, "parent": t.parent, "host": t.host,
                 "worker": t.worker} for t in rows]}


def curves(store: Store, exp: Experiment, metric: Any, top: int | None) -> dict[str, Any]:
    """Learning curves of `metric` (None: the reward) against `time_attr`: of every trial,
    or with `top` of the `top` trials of highest score. `mode` is the reward's direction
    (None for another metric). `not_found` when the trials drawn have reports but none of
    them has `metric`."""
    reward_attr, mode = metric_of(exp)
    metric = metric or reward_attr
    if not isinstance(metric, str):
        raise ProtocolError("bad_request", f"metric must be a metric name, got {metric!r}")
    time_attr = exp.spec.get("time_attr")
    if metric == reward_attr:
        drawn = {str(n): c for n, c in store.reward_curves(exp.id, top).items()}
    else:
        drawn, seen = {}, set()
        for number, reports in store.history(exp.id, top).items():
            seen.update(k for r in reports[-1:] for k in r)
            xs, ys = curve_points(reports, metric, time_attr)
            if xs:
                drawn[str(number)] = [xs, ys]
        if not drawn and seen:
            raise ProtocolError("not_found", f"no metric {metric!r} in the reports of "
                                             f"{exp.name!r} (they have: {', '.join(sorted(seen))})")
    return {"experiment": exp.name, "metric": metric, "time_attr": time_attr,
            "mode": mode if metric == reward_attr else None,
            "total": sum(store.count_trials(exp.id).values()), "curves": drawn}


def progress(store: Store, exp: Experiment) -> dict[str, Any]:
    """The best reward so far, as step points (`tuned.ui.charts.best_so_far`): `by_trial`
    against trial numbers, `by_time` against seconds since the first trial was created.
    A trial counts with its last reported reward (as `best` ranks it), from when that report
    was stored."""
    metric, mode = metric_of(exp)
    timeline = store.reward_timeline(exp.id)
    first = store.first_trial_created(exp.id)
    by_trial = best_so_far([(n, r) for n, r, _ in timeline], mode)
    timed = sorted((when - (first or when), r) for _, r, when in timeline)
    by_time = best_so_far(timed, mode)
    return {"experiment": exp.name, "metric": metric, "mode": mode,
            "by_trial": [by_trial[0], by_trial[1]], "by_time": [by_time[0], by_time[1]]}


def export_page(store: Store, exp: Experiment, reports: bool, limit: int | None,
                offset: int | None, after: Any, columns: Any = None) -> dict[str, Any]:
    """One page of the export (`tuned.store.export`): `columns` and `rows`. Trials are paged by
    position (`offset`); reports after a cursor `after`, the [trial, seq] of the last row of
    the page before (None: from the start), with the `columns` of the first page passed
    back (reading them scans every report's metrics). At most MAX_EXPORT_PAGE rows (the
    default). A page is read in one snapshot; pages of a running experiment may miss rows
    that came between them."""
    if limit is None or limit > MAX_EXPORT_PAGE:
        limit = MAX_EXPORT_PAGE
    # Inside a caller's snapshot (`tuned export` reads every page in one), that one holds.
    within = contextlib.nullcontext() if store.conn.in_transaction else export.snapshot(store)
    with within:
        if not reports:
            return {"experiment": exp.name, "columns": export.trial_columns(exp.spec),
                    "rows": export.trial_rows(store, exp, offset or 0, limit)}
        cursor = _cursor(after)
        if columns is None:
            columns = export.report_columns(store, exp)
        elif not (isinstance(columns, list) and all(isinstance(c, str) for c in columns)
                  and columns[:len(export.REPORT_FIXED_COLUMNS)]
                  == list(export.REPORT_FIXED_COLUMNS)):
            raise ProtocolError("bad_request", "columns must be the columns of the first page")
        return {"experiment": exp.name, "columns": columns,
                "rows": export.report_rows(store, exp, cursor, limit, columns=columns)}


def _cursor(after: Any) -> tuple[int, int] | None:
    if after is None:
        return None
    if isinstance(after, list) and len(after) == 2 and \
            all(isinstance(v, int) and not isinstance(v, bool) and abs(v) < 1 << 62
                for v in after):
        return after[0], after[1]
    raise ProtocolError("bad_request", f"after must be [trial, seq], got {after!r}")
