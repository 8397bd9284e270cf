"""Exporting an experiment's trials and reports as rows: CSV, JSON Lines, a pandas DataFrame.

Contract
--------
- A row is a dict from column name to value, its keys in column order. Values are None,
  bool, int, float or str (a config value may also be a list or a dict, as stored).
- Trials export (`trial_columns`, `trial_rows`): one row per trial, by trial number, with
  `TRIAL_FIXED_COLUMNS` then one column per search-space parameter, in the space's order.
  A parameter named like a fixed column gets the column ``config.<name>``.
- Reports export (`report_columns`, `report_rows`): one row per report, by (trial number,
  seq), with `REPORT_FIXED_COLUMNS` then one column per metric name found in any of the
  experiment's reports, sorted; the reward and time metrics are among them. A metric named
  like a fixed column, or whose name starts with ``metric.``, gets the column
  ``metric.<name>``, so that column names stay unique.
- Times (`created`, `started`, `ended`) are ISO 8601 UTC strings with milliseconds, e.g.
  ``2026-12-07T08:01:02.345Z`` (truncated, not rounded, to the millisecond); None when
  unknown. A trial's `duration` is ``ended - started`` in seconds, None when either is
  unknown.
- A value a row lacks is None: a parameter missing from an older trial's config, a metric
  a report did not have.
- Trial pages are read by position (`iter_pages`), report pages after a cursor, the
  (trial, seq) of the previous page's last row (`report_pages`), so that the millionth
  report costs what the first does. Pages read while the experiment runs may miss rows, and
  a metric first reported after `report_columns` has no column: read everything inside
  `snapshot` to export one consistent state.
- Writers take an iterable of pages, so that an export streams: `write_csv` (None is an
  empty cell; bools ``true``/``false`` as in JSON; floats as Python's ``repr``, which reads
  back to the same float; lists and dicts as compact JSON) and `write_jsonl` (one compact
  JSON object per line).
- Only the standard library is imported; `trials_frame` imports pandas when called.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import IO, TYPE_CHECKING, Any

from tuned.store.database import Experiment, Store, Trial

if TYPE_CHECKING:
    import pandas

__all__ = [
    "REPORT_FIXED_COLUMNS", "TRIAL_FIXED_COLUMNS", "TRIAL_TIME_COLUMNS", "iter_pages",
    "report_columns", "report_pages", "report_rows", "snapshot", "trial_columns", "trial_rows",
    "trials_frame", "write_csv", "write_jsonl",
]

TRIAL_FIXED_COLUMNS = ("trial", "state", "attempt", "reward", "reports", "parent", "error",
                       "created", "started", "ended", "duration")
TRIAL_TIME_COLUMNS = ("created", "started", "ended")
REPORT_FIXED_COLUMNS = ("trial", "seq", "time", "reward", "decision", "created")

_CONFIG_PREFIX = "config."
_METRIC_PREFIX = "metric."

# The experiment's reports in (trial number, seq) order: the unique index on trials
# (experiment_id, number) gives the trials in order, the reports' primary key (trial_id, seq)
# each trial's reports in order, so a page is read without sorting the whole experiment.
_REPORTS_PAGE = (
    "SELECT t.number, r.seq, r.time_value, r.reward, r.decision, r.created, r.metrics "
    "FROM trials t JOIN reports r ON r.trial_id = t.id WHERE t.experiment_id = ? "
    "AND (t.number > ? OR (t.number = ? AND r.seq > ?)) ORDER BY t.number, r.seq LIMIT ?")
_METRIC_NAMES = (
    "SELECT DISTINCT j.key FROM reports r JOIN trials t ON t.id = r.trial_id, "
    "json_each(r.metrics) j WHERE t.experiment_id = ?")


# -- values ------------------------------------------------------------------------------


def iso_time(t: float | None) -> str | None:
    """`t` (seconds since the epoch) as ISO 8601 UTC with milliseconds and a ``Z``, e.g.
    ``2026-12-07T08:01:02.345Z``; None for None. The milliseconds are truncated."""
    if t is None:
        return None
    text = datetime.fromtimestamp(t, tz=timezone.utc).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def _duration(started: float | None, ended: float | None) -> float | None:
    return None if started is None or ended is None else ended - started


# -- trials ------------------------------------------------------------------------------


def _space_names(spec: dict[str, Any]) -> list[str]:
    """The parameter names of a stored spec's space, in the space's order (the order of
    ``list(Space.from_json(spec["space"]))``, read without validating the space)."""
    return list(spec.get("space") or {})


def _config_column(name: str) -> str:
    return _CONFIG_PREFIX + name if name in TRIAL_FIXED_COLUMNS else name


def trial_columns(spec: dict[str, Any]) -> list[str]:
    """The trials export's columns for an experiment of stored spec `spec`:
    `TRIAL_FIXED_COLUMNS`, then one per parameter of ``spec["space"]`` in its order (a name
    that is a fixed column prefixed with ``config.``). A spec without a space has only the
    fixed columns."""
    return [*TRIAL_FIXED_COLUMNS, *(_config_column(n) for n in _space_names(spec))]


def _trial_row(trial: Trial, names: Sequence[str]) -> dict[str, Any]:
    row: dict[str, Any] = {
        "trial": trial.number, "state": trial.state, "attempt": trial.attempt,
        "reward": trial.last_reward, "reports": trial.last_seq, "parent": trial.parent,
        "error": trial.error, "created": iso_time(trial.created),
        "started": iso_time(trial.started), "ended": iso_time(trial.ended),
        "duration": _duration(trial.started, trial.ended),
    }
    for name in names:
        row[_config_column(name)] = trial.config.get(name)
    return row


def trial_rows(store: Store, experiment: Experiment, offset: int = 0,
               limit: int | None = None) -> list[dict[str, Any]]:
    """A page of the trials export: the rows of the experiment's trials at positions
    [offset, offset + limit) by trial number (`limit` None: to the end), each with exactly
    the keys of ``trial_columns(experiment.spec)``, in that order.

    `reward` is the last report's reward and `reports` the last report's sequence number
    (the number of reports; for a trial started from another's checkpoint, counting those
    its checkpoint covers). `parent` is the number of the trial it descends from, or None.
    """
    names = _space_names(experiment.spec)
    return [_trial_row(t, names)
            for t in store.trials(experiment.id, limit=limit, offset=offset)]


# -- reports -----------------------------------------------------------------------------


def _metric_column(name: str) -> str:
    prefixed = name in REPORT_FIXED_COLUMNS or name.startswith(_METRIC_PREFIX)
    return _METRIC_PREFIX + name if prefixed else name


def _metric_name(column: str) -> str:
    """The metric of a metric column (the inverse of `_metric_column`)."""
    return column[len(_METRIC_PREFIX):] if column.startswith(_METRIC_PREFIX) else column


def report_columns(store: Store, experiment: Experiment) -> list[str]:
    """The reports export's columns: `REPORT_FIXED_COLUMNS`, then one per metric name that
    any of the experiment's reports has, sorted by name (see the module docstring for the
    ``metric.`` prefix). Reads the metric names of every report of the experiment, with
    SQLite's JSON1 ``json_each``; `sqlite3.OperationalError` if SQLite lacks JSON1."""
    rows = store.conn.execute(_METRIC_NAMES, (experiment.id,)).fetchall()
    names = sorted(r[0] for r in rows)
    return [*REPORT_FIXED_COLUMNS, *(_metric_column(n) for n in names)]


def report_rows(store: Store, experiment: Experiment, after: tuple[int, int] | None = None,
                limit: int | None = None, *,
                columns: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """A page of the reports export: the experiment's first `limit` reports (None: all) in
    (trial number, seq) order that come after `after`, a (trial number, seq) cursor (None:
    from the start), read with one query that starts at the cursor in the indexes.
    ValueError for a negative `limit`.

    Each row has exactly the keys of `columns` (default: ``report_columns(store,
    experiment)``, which reads every report's metric names: pass the columns when reading
    many pages), in that order; a metric the report lacks is None, and a metric that has no
    column is left out.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if columns is None:
        columns = report_columns(store, experiment)
    metrics = [(c, _metric_name(c)) for c in columns[len(REPORT_FIXED_COLUMNS):]]
    number, seq = (-1, 0) if after is None else after
    cur = store.conn.execute(_REPORTS_PAGE, (experiment.id, number, number, seq,
                                             -1 if limit is None else limit))
    return [_report_row(r, metrics) for r in cur]


def report_pages(store: Store, experiment: Experiment, columns: Sequence[str],
                 page_size: int = 5000) -> Iterator[list[dict[str, Any]]]:
    """Every report row of the experiment, in pages of `page_size` (`iter_pages`), each
    read after the cursor of the page before, its last row (`report_rows`)."""
    last: list[dict[str, Any]] = []

    def fetch(offset: int, limit: int) -> list[dict[str, Any]]:
        after = (last[0]["trial"], last[0]["seq"]) if last else None
        page = report_rows(store, experiment, after, limit, columns=columns)
        last[:] = page[-1:]
        return page

    return iter_pages(fetch, page_size)


def _report_row(r: tuple, metrics: Sequence[tuple[str, str]]) -> dict[str, Any]:
    number, seq, time_value, reward, decision, created, metrics_json = r
    row: dict[str, Any] = {"trial": number, "seq": seq, "time": time_value, "reward": reward,
                           "decision": decision, "created": iso_time(created)}
    values = json.loads(metrics_json)
    for column, name in metrics:
        row[column] = values.get(name)
    return row


# -- paging and consistency --------------------------------------------------------------


def iter_pages(fetch: Callable[[int, int], list[dict[str, Any]]],
               page_size: int = 5000) -> Iterator[list[dict[str, Any]]]:
    """The pages ``fetch(0, page_size)``, ``fetch(page_size, page_size)``, ... up to the
    first shorter than `page_size` (an empty page is not yielded). `fetch(offset, limit)`
    returns at most `limit` rows from position `offset`. ValueError (raised by this call)
    when `page_size` is not an int >= 1."""
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
        raise ValueError(f"page_size must be an integer >= 1, got {page_size!r}")
    return _pages(fetch, page_size)


def _pages(fetch: Callable[[int, int], list[dict[str, Any]]],
           page_size: int) -> Iterator[list[dict[str, Any]]]:
    offset = 0
    while True:
        page = fetch(offset, page_size)
        if page:
            yield page
        if len(page) < page_size:
            return
        offset += len(page)


@contextmanager
def snapshot(store: Store) -> Iterator[Store]:
    """A read transaction on `store`: every read in the block sees the database as it was at
    the block's first read, whatever other connections commit meanwhile (WAL), so that the
    columns and all the pages of an export agree. The block must not write through `store`
    (its transactions would fail). RuntimeError when `store` is in a transaction already."""
    if store.conn.in_transaction:
        raise RuntimeError("snapshot: the store is in a transaction already")
    store.conn.execute("BEGIN DEFERRED")
    try:
        yield store
    finally:
        if store.conn.in_transaction:
            store.conn.execute("ROLLBACK")


# -- writers -----------------------------------------------------------------------------


def _cell(value: Any) -> Any:
    """A CSV cell: '' for None, true/false for bools, repr for floats, JSON for lists and
    dicts, the value itself otherwise."""
    if value is None:
        return ""
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return value


def write_csv(rows_pages: Iterable[Sequence[dict[str, Any]]], columns: Sequence[str],
              out: IO[str], header: bool = True) -> int:
    """Write the rows of every page to `out` as CSV (the `csv` module's default dialect with
    ``\\n`` line ends; open a file with ``newline=""``): the header line of `columns` first
    when `header`, then one line per row with the row's values for `columns` in order (a key
    the row lacks is an empty cell, a key not in `columns` is not written). Cells: see
    `_cell`. Returns the number of rows written."""
    writer = csv.writer(out, lineterminator="\n")
    if header:
        writer.writerow(columns)
    n = 0
    for page in rows_pages:
        writer.writerows([_cell(row.get(c)) for c in columns] for row in page)
        n += len(page)
    return n


def write_jsonl(rows_pages: Iterable[Sequence[dict[str, Any]]], out: IO[str]) -> int:
    """Write every row of every page to `out` as one compact JSON object per line, keys in
    the row's order (column order for the rows of this module), non-ASCII text as is.
    ValueError for a non-finite float (never stored by the engine), TypeError for a value
    JSON cannot hold. Returns the number of rows written."""
    n = 0
    for page in rows_pages:
        out.writelines(json.dumps(row, separators=(",", ":"), ensure_ascii=False,
                                  allow_nan=False) + "\n" for row in page)
        n += len(page)
    return n


# -- pandas ------------------------------------------------------------------------------


def trials_frame(store: Store, experiment: Experiment) -> pandas.DataFrame:
    """The trials export of every trial as a pandas DataFrame (a RangeIndex; the columns of
    `trial_columns`), with `created`, `started` and `ended` as timezone-aware UTC datetimes
    (NaT when unknown) and `reward` and `duration` as float64 (NaN when unknown).
    RuntimeError saying how to install pandas when it cannot be imported."""
    try:
        import pandas as pd
    except ImportError as exc:
        raise RuntimeError("trials_frame needs pandas: pip install pandas") from exc
    frame = pd.DataFrame(trial_rows(store, experiment),
                         columns=trial_columns(experiment.spec))
    for column in TRIAL_TIME_COLUMNS:
        frame[column] = pd.to_datetime(frame[column], utc=True, format="ISO8601")
    for column in ("reward", "duration"):
        frame[column] = frame[column].astype("float64")
    return frame
