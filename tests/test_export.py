"""The export of an experiment's trials and reports, from a real SQLite store."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from datetime import datetime, timezone

import pytest

from tuned.core.decisions import Decision, TrialState
from tuned.core.space import Bool, Categorical, Int, Real, Space
from tuned.store import export
from tuned.store.database import Store

T0 = 1796630462.25  # 2026-12-07T08:01:02.250Z, exact in binary like every step added to it
SPACE = Space({"lr": Real(1e-5, 1.0, log=True), "layers": Int(1, 8),
               "state": Categorical("a", "b"), "bn": Bool()})

TRIALS_CSV = """\
trial,state,attempt,reward,reports,parent,error,created,started,ended,duration,lr,layers,config.state,bn
0,COMPLETED,1,0.75,2,,,2026-12-07T08:01:02.250Z,2026-12-07T08:01:05.250Z,2026-12-07T08:01:12.750Z,7.5,0.01,2,a,true
1,FAILED,1,0.25,1,,boom,2026-12-07T08:01:03.250Z,2026-12-07T08:01:05.750Z,2026-12-07T08:01:08.250Z,2.5,0.1,4,b,
2,PENDING,1,,0,0,,2026-12-07T08:01:04.250Z,,,,1e-05,8,a,false
"""  # noqa: E501

REPORTS_CSV = """\
trial,seq,time,reward,decision,created,acc,epoch,loss,lr_now,note,metric.seq
0,1,1.0,0.5,continue,2026-12-07T08:01:06.250Z,0.5,1,1.25,,,
0,2,2.0,0.75,stop,2026-12-07T08:01:07.250Z,0.75,2,0.5,0.001,,
1,1,1.0,0.25,continue,2026-12-07T08:01:06.750Z,0.25,1,,,"a ""y"" b, c",7
"""

REPORTS_JSONL = """\
{"trial":0,"seq":1,"time":1.0,"reward":0.5,"decision":"continue","created":"2026-12-07T08:01:06.250Z","acc":0.5,"epoch":1,"loss":1.25,"lr_now":null,"note":null,"metric.seq":null}
{"trial":0,"seq":2,"time":2.0,"reward":0.75,"decision":"stop","created":"2026-12-07T08:01:07.250Z","acc":0.75,"epoch":2,"loss":0.5,"lr_now":0.001,"note":null,"metric.seq":null}
{"trial":1,"seq":1,"time":1.0,"reward":0.25,"decision":"continue","created":"2026-12-07T08:01:06.750Z","acc":0.25,"epoch":1,"loss":null,"lr_now":null,"note":"a \\"y\\" b, c","metric.seq":7}
"""  # noqa: E501


class Clock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock(T0)


@pytest.fixture
def store(tmp_path, clock):
    s = Store(tmp_path / "t.db", clock=clock, preallocate=False)
    yield s
    s.close()


def _at(clock: Clock, dt: float) -> Clock:
    clock.now = T0 + dt
    return clock


def _report(store, tid, seq, reward, metrics, decision=Decision.CONTINUE):
    store.record_report(tid, seq, float(metrics["epoch"]), reward, reward,
                        json.dumps(metrics), decision)


@pytest.fixture
def exp(store, clock):
    """Trial 0 completed with two reports, trial 1 (an older trial: no `bn`) failed after
    one, trial 2 pending; the reports' metrics differ; the parameter `state` and the metric
    `seq` are named like fixed columns."""
    spec = {"space": SPACE.to_json(), "reward_attr": "acc", "time_attr": "epoch",
            "mode": "max"}
    e = store.create_experiment("e", spec)
    t0 = store.add_trial(e.id, 0, {"lr": 0.01, "layers": 2, "state": "a", "bn": True}, 0)
    _at(clock, 1)
    t1 = store.add_trial(e.id, 1, {"lr": 0.1, "layers": 4, "state": "b"}, 0)
    _at(clock, 2)
    store.add_trial(e.id, 2, {"lr": 1e-5, "layers": 8, "state": "a", "bn": False}, 0,
                    parent=0)
    _at(clock, 3)
    store.claim_trial(t0, 100)
    _at(clock, 3.5)
    store.claim_trial(t1, 101)
    _at(clock, 4)
    _report(store, t0, 1, 0.5, {"acc": 0.5, "epoch": 1, "loss": 1.25})
    _at(clock, 4.5)
    _report(store, t1, 1, 0.25, {"acc": 0.25, "epoch": 1, "seq": 7, "note": 'a "y" b, c'})
    _at(clock, 5)
    _report(store, t0, 2, 0.75, {"acc": 0.75, "epoch": 2, "loss": 0.5, "lr_now": 0.001},
            Decision.STOP)
    _at(clock, 6)
    store.finish_trial(t1, TrialState.FAILED, "boom")
    _at(clock, 10.5)
    store.finish_trial(t0, TrialState.COMPLETED)
    return store.experiment(e.id)


def _trials_csv(store, exp, page_size=5000) -> str:
    out = io.StringIO()
    pages = export.iter_pages(lambda o, n: export.trial_rows(store, exp, o, n), page_size)
    export.write_csv(pages, export.trial_columns(exp.spec), out)
    return out.getvalue()


def _reports_pages(store, exp, columns, page_size):
    return export.report_pages(store, exp, columns, page_size)


def _reports_csv(store, exp, page_size=5000) -> str:
    out = io.StringIO()
    columns = export.report_columns(store, exp)
    export.write_csv(_reports_pages(store, exp, columns, page_size), columns, out)
    return out.getvalue()


def _reports_jsonl(store, exp, page_size=5000) -> str:
    out = io.StringIO()
    columns = export.report_columns(store, exp)
    export.write_jsonl(_reports_pages(store, exp, columns, page_size), out)
    return out.getvalue()


# -- trials ------------------------------------------------------------------------------


def test_trial_csv_has_one_row_per_trial(store, exp):
    assert _trials_csv(store, exp) == TRIALS_CSV


def test_trial_columns_are_the_fixed_ones_then_the_space_in_order(exp):
    assert export.trial_columns(exp.spec) == [
        "trial", "state", "attempt", "reward", "reports", "parent", "error", "created",
        "started", "ended", "duration", "lr", "layers", "config.state", "bn"]
    assert export.trial_columns({}) == list(export.TRIAL_FIXED_COLUMNS)
    # The space's names, as Space reads them back from the stored spec.
    names = [c.removeprefix("config.") for c in export.trial_columns(exp.spec)[11:]]
    assert names == list(Space.from_json(exp.spec["space"]))


def test_trial_times_parse_back_as_utc(store, exp):
    row = export.trial_rows(store, exp)[0]
    parsed = {k: datetime.strptime(row[k], "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=timezone.utc).timestamp() for k in ("created", "started", "ended")}
    assert parsed == {"created": T0, "started": T0 + 3, "ended": T0 + 10.5}
    assert row["duration"] == 7.5


def test_iso_time_keeps_milliseconds():
    assert export.iso_time(1796630462.345) == "2026-12-07T08:01:02.345Z"
    assert export.iso_time(0) == "1970-01-01T00:00:00.000Z"
    assert export.iso_time(None) is None


def test_trial_rows_page_by_number(store, exp):
    assert [r["trial"] for r in export.trial_rows(store, exp, offset=1)] == [1, 2]
    assert [r["trial"] for r in export.trial_rows(store, exp, offset=0, limit=2)] == [0, 1]
    assert export.trial_rows(store, exp, offset=3) == []
    assert _trials_csv(store, exp, page_size=1) == TRIALS_CSV
    assert _trials_csv(store, exp, page_size=3) == TRIALS_CSV


# -- reports -----------------------------------------------------------------------------


def test_report_columns_hold_every_metric_of_every_report(store, exp):
    assert export.report_columns(store, exp) == [
        "trial", "seq", "time", "reward", "decision", "created",
        "acc", "epoch", "loss", "lr_now", "note", "metric.seq"]


def test_report_csv_has_one_row_per_report_in_order(store, exp):
    assert _reports_csv(store, exp) == REPORTS_CSV


def test_report_jsonl_has_one_object_per_report_with_nulls(store, exp):
    assert _reports_jsonl(store, exp) == REPORTS_JSONL


@pytest.mark.parametrize("page_size", [1, 2, 3, 4])
def test_paging_gives_the_same_output(store, exp, page_size):
    assert _reports_csv(store, exp, page_size) == REPORTS_CSV
    assert _reports_jsonl(store, exp, page_size) == REPORTS_JSONL


def test_report_rows_reads_a_page_with_one_query(store, exp):
    columns = export.report_columns(store, exp)
    statements = []
    store.conn.set_trace_callback(statements.append)
    try:
        page = export.report_rows(store, exp, after=(0, 1), limit=1, columns=columns)
    finally:
        store.conn.set_trace_callback(None)
    assert [(r["trial"], r["seq"]) for r in page] == [(0, 2)]
    assert len(statements) == 1 and "LIMIT" in statements[0]


def test_report_rows_default_columns_and_bad_page(store, exp):
    rows = export.report_rows(store, exp, after=(0, 2))
    assert list(rows[0]) == export.report_columns(store, exp)
    assert rows[0]["note"] == 'a "y" b, c'
    assert [(r["trial"], r["seq"]) for r in export.report_rows(store, exp, after=(0, 9))] \
        == [(1, 1)]  # past a trial's last report: the next trial's first
    with pytest.raises(ValueError, match="limit must be >= 0"):
        export.report_rows(store, exp, limit=-1)


def test_an_experiment_without_reports_exports_a_header(store):
    e = store.create_experiment("empty", {"space": {}})
    store.add_trial(e.id, 0, {}, 0)
    columns = export.report_columns(store, e)
    out = io.StringIO()
    assert export.write_csv(_reports_pages(store, e, columns, 10), columns, out) == 0
    assert out.getvalue() == "trial,seq,time,reward,decision,created\n"


def test_snapshot_sees_one_state(tmp_path, store, exp):
    other = Store(tmp_path / "t.db", preallocate=False)
    try:
        pending = other.trials(exp.id, states=("PENDING",))[0]
        other.claim_trial(pending.id, 102)
        with export.snapshot(store):
            columns = export.report_columns(store, exp)
            other.record_report(pending.id, 1, 1.0, 0.125, 0.125,
                                '{"acc":0.125,"epoch":1,"grad":3}', Decision.CONTINUE)
            assert export.report_columns(store, exp) == columns
            rows = export.report_rows(store, exp, columns=columns)
            assert len(rows) == 3
        assert "grad" in export.report_columns(store, exp)
        assert len(export.report_rows(store, exp)) == 4
    finally:
        other.close()


def test_snapshot_refuses_an_open_transaction(store):
    with store.transaction():
        with pytest.raises(RuntimeError, match="in a transaction already"):
            with export.snapshot(store):
                pass


# -- writers and paging ------------------------------------------------------------------


def test_csv_cells():
    out = io.StringIO()
    rows = [{"a": None, "b": True, "c": False, "d": 0.1, "e": 1e-05, "f": 3, "g": [1, "x"],
             "h": "line\nbreak", "extra": "not written"}]
    n = export.write_csv([rows], ["a", "b", "c", "d", "e", "f", "g", "h", "missing"], out,
                         header=False)
    assert n == 1
    assert out.getvalue() == ',true,false,0.1,1e-05,3,"[1,""x""]","line\nbreak",\n'


def test_floats_survive_a_csv_round_trip():
    values = [0.1 + 0.2, 1 / 3, 1e-300, 123456789.123456789]
    out = io.StringIO()
    export.write_csv([[{"v": v} for v in values]], ["v"], out)
    assert [float(line) for line in out.getvalue().splitlines()[1:]] == values


def test_jsonl_refuses_non_finite_floats():
    with pytest.raises(ValueError):
        export.write_jsonl([[{"v": float("nan")}]], io.StringIO())


def test_iter_pages_stops_at_a_short_page():
    data = list(range(7))
    calls = []

    def fetch(offset, limit):
        calls.append((offset, limit))
        return data[offset:offset + limit]

    assert list(export.iter_pages(fetch, 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert calls == [(0, 3), (3, 3), (6, 3)]
    calls.clear()
    assert list(export.iter_pages(fetch, 7)) == [data]
    assert calls == [(0, 7), (7, 7)]


@pytest.mark.parametrize("size", [0, -1, 2.5, True])
def test_iter_pages_refuses_a_bad_page_size(size):
    with pytest.raises(ValueError, match="page_size must be an integer >= 1"):
        export.iter_pages(lambda o, n: [], size)


# -- pandas ------------------------------------------------------------------------------


def test_trials_frame(store, exp):
    pd = pytest.importorskip("pandas")
    frame = export.trials_frame(store, exp)
    assert frame.shape == (3, 15)
    assert list(frame.columns) == export.trial_columns(exp.spec)
    for column in ("created", "started", "ended"):
        assert isinstance(frame[column].dtype, pd.DatetimeTZDtype), column
        assert str(frame[column].dtype.tz) == "UTC"
    assert frame["created"][0] == pd.Timestamp("2026-12-07T08:01:02.250Z")
    assert frame["started"].isna().tolist() == [False, False, True]
    assert frame["duration"].dtype == "float64" and frame["duration"][1] == 2.5
    assert frame["reward"].isna().tolist() == [False, False, True]
    assert frame["config.state"].tolist() == ["a", "b", "a"]


def test_trials_frame_of_an_experiment_without_trials(store):
    pd = pytest.importorskip("pandas")
    e = store.create_experiment("empty", {"space": SPACE.to_json()})
    frame = export.trials_frame(store, e)
    assert frame.shape == (0, 15)
    assert isinstance(frame["ended"].dtype, pd.DatetimeTZDtype)


def test_trials_frame_without_pandas_says_how_to_install_it(store, exp, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas: ImportError
    with pytest.raises(RuntimeError) as info:
        export.trials_frame(store, exp)
    assert str(info.value) == "trials_frame needs pandas: pip install pandas"


def test_importing_export_does_not_import_pandas():
    code = "import sys, tuned.store.export; print('pandas' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout == "False\n"
