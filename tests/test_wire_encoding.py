"""The report channel's fast encoders and decoder give exactly what the json module gives."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tuned.protocol.channel import answer_line, compact_json, decode_line, flat_json
from tuned.protocol.channel import parse_line as _parse
from tuned.trial.reporter import ReportRejected, encode_report

scalars = st.one_of(st.booleans(), st.integers(), st.floats(), st.text())
flat_dicts = st.dictionaries(st.text(), scalars)


@given(flat_dicts)
def test_flat_json_writes_what_compact_json_writes(metrics):
    assert flat_json(metrics) == compact_json(metrics)


def test_flat_json_keeps_nan_and_infinities_as_compact_json_does():
    metrics = {"a": math.nan, "b": math.inf, "c": -math.inf, "é": "ü"}
    assert flat_json(metrics) == compact_json(metrics) == \
        '{"a":NaN,"b":Infinity,"c":-Infinity,"\\u00e9":"\\u00fc"}'


answers = st.one_of(
    st.fixed_dictionaries({"seq": st.integers(), "decision": st.sampled_from(
        ["continue", "stop", "pause", "other", 'quote"d'])}),
    st.fixed_dictionaries({"seq": st.one_of(st.booleans(), st.floats(), st.text()),
                           "decision": st.sampled_from(["continue", "stop"])}),
    st.fixed_dictionaries({"seq": st.integers(), "error": st.text()}),
    st.dictionaries(st.text(), scalars),
)


@given(answers)
def test_answer_line_is_compact_json_plus_newline(body):
    assert answer_line(body) == compact_json(body) + "\n"


@given(st.one_of(flat_dicts, st.lists(scalars), scalars),
       st.sampled_from(["", " ", "\t", "\r", " \r "]))
def test_decode_line_reads_what_json_loads_reads(value, pad):
    line = (pad + json.dumps(value) + pad).encode()
    got, want = decode_line(line), json.loads(line)
    assert json.dumps(got) == json.dumps(want)


@pytest.mark.parametrize("line", [
    b"", b" ", b"{", b'{"seq":1}x', b'{"seq":1} {"seq":2}', b"\xff\xfe", b"nul", b"[1,]",
    b"\x0b{}", b"{}\xc2\xa0", b"\xe2\x80\x83[1]",  # whitespace to str.strip, not to JSON
])
def test_decode_line_refuses_what_json_loads_refuses(line):
    with pytest.raises(ValueError):
        json.loads(line)
    with pytest.raises(ValueError):
        decode_line(line)


def test_a_bad_line_on_the_channel_becomes_a_message_naming_it():
    assert _parse(3, b'{"seq":1,"metrics":{"a":1}}').body == {"seq": 1, "metrics": {"a": 1}}
    bad = _parse(3, b'{"seq":1} trailing')
    assert bad.body is None and "not JSON" in bad.error and "trailing" in bad.error
    assert "not JSON" in _parse(3, b"\xff").error
    assert "not a JSON object" in _parse(3, b"[1]").error


numpy_scalars = st.one_of(
    st.integers(-2**63, 2**63 - 1).map(np.int64), st.floats().map(np.float64),
    st.floats(width=32).map(np.float32), st.booleans().map(np.bool_))


@given(st.integers(1, 2**62), st.dictionaries(st.text(), st.one_of(scalars, numpy_scalars)))
def test_encode_report_writes_what_the_json_module_writes(seq, metrics):
    plain = {k: v.item() if isinstance(v, np.generic) else v for k, v in metrics.items()}
    want = json.dumps({"seq": seq, "metrics": plain}, separators=(",", ":")) + "\n"
    assert encode_report(seq, metrics) == want.encode()


@pytest.mark.parametrize("value", [None, [1], {"a": 1}, (1,), b"x", object()])
def test_encode_report_names_a_metric_json_cannot_hold(value):
    with pytest.raises(ReportRejected, match="'bad'"):
        encode_report(1, {"ok": 1.0, "bad": value})
