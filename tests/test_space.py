"""Tests of tuned.space: domains and spaces sample, encode, enumerate and round-trip."""

from __future__ import annotations

import json
import keyword
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tuned.core.space import INT_LIMIT, Bool, Categorical, Domain, Int, Real, Space

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------- strategies

names = st.from_regex(r"[a-z_][a-z0-9_]{0,7}", fullmatch=True).filter(
    lambda n: not keyword.iskeyword(n))

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=5))


@st.composite
def reals(draw: st.DrawFn) -> Real:
    """A valid Real, linear or log, with or without a default."""
    if draw(st.booleans()):
        a, b = sorted(draw(st.lists(st.floats(-12, 12), min_size=2, max_size=2, unique=True)))
        lower, upper, log = 10.0 ** a, 10.0 ** b, True
    else:
        lower = draw(st.floats(-1e9, 1e9))
        upper = lower + draw(st.floats(1e-3, 1e9))
        log = False
    if not lower < upper:  # the width was lost to rounding
        upper = math.nextafter(lower, math.inf)
    default = draw(st.none() | st.floats(lower, upper))
    return Real(lower, upper, default=default, log=log)


@st.composite
def ints(draw: st.DrawFn, max_width: int = 10**9) -> Int:
    """A valid Int; linear bounds anywhere within INT_LIMIT, log bounds up to 1e9."""
    if draw(st.booleans()):
        lower = draw(st.integers(1, 10**6))
        upper = draw(st.integers(lower + 1, lower + min(max_width, 10**9)))
        log = True
    else:
        lower = draw(st.integers(-INT_LIMIT, INT_LIMIT - 1))
        upper = draw(st.integers(lower + 1, min(INT_LIMIT, lower + max_width)))
        log = False
    default = draw(st.none() | st.integers(lower, upper))
    return Int(lower, upper, default=default, log=log)


def _choice_key(c: Any) -> tuple[str, Any]:
    return type(c).__name__, c


categoricals = st.lists(json_scalars, min_size=1, max_size=6, unique_by=_choice_key).map(
    Categorical)
finite_domains = st.one_of(ints(max_width=6), categoricals, st.just(Bool()))
domains = st.one_of(reals(), ints(), categoricals, st.just(Bool()))
spaces = st.dictionaries(names, domains, max_size=4).map(Space)
finite_spaces = st.dictionaries(names, finite_domains, max_size=3).map(Space)


def canonical(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True)


def assert_native_in(dom: Domain, value: Any) -> None:
    """`value` is a plain Python value of the domain's type, inside the domain."""
    if isinstance(dom, Real):
        assert type(value) is float
    elif isinstance(dom, Int):
        assert type(value) is int
    elif isinstance(dom, Bool):
        assert type(value) is bool
    else:
        assert any(type(c) is type(value) and c == value for c in dom.choices)
    assert dom.contains(value), (dom, value)


def assert_unit_round_trip(dom: Domain, value: Any) -> None:
    back = dom.from_unit(dom.to_unit(value))
    if isinstance(dom, Real):
        tol = 1e-9 * (float(dom.upper) - float(dom.lower)) + 8 * math.ulp(
            max(abs(dom.lower), abs(dom.upper)))
        if dom.log:
            tol = 1e-9 * abs(value)
        assert type(back) is float and abs(back - value) <= tol, (dom, value, back)
    else:
        assert type(back) is type(value) and back == value, (dom, value, back)


# ---------------------------------------------------------------- sampling


@SETTINGS
@given(spaces, st.integers(0, 2**32))
def test_samples_are_native_and_in_their_domain(space: Space, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(5):
        config = space.sample(rng)
        assert list(config) == list(space)
        for name, dom in space.items():
            assert_native_in(dom, config[name])
        assert space.validate(config) == config


@SETTINGS
@given(spaces, st.integers(0, 2**32))
def test_same_seed_same_samples(space: Space, seed: int) -> None:
    def draw() -> list[str]:
        rng = np.random.default_rng(seed)
        return [canonical(space.sample(rng)) for _ in range(5)]

    assert draw() == draw()


@SETTINGS
@given(spaces)
def test_default_is_native_and_in_the_domain(space: Space) -> None:
    config = space.default()
    for name, dom in space.items():
        assert_native_in(dom, config[name])


# ---------------------------------------------------------------- unit encoding


@SETTINGS
@given(domains, st.integers(0, 2**32))
def test_unit_round_trip(dom: Domain, seed: int) -> None:
    rng = np.random.default_rng(seed)
    values = [dom.sample(rng) for _ in range(5)] + [dom.default]
    if isinstance(dom, (Real, Int)):
        values += [dom.lower, dom.upper]
    if isinstance(dom, Real):
        values = [float(v) for v in values]
    for value in values:
        u = dom.to_unit(value)
        assert 0.0 <= u <= 1.0
        assert_unit_round_trip(dom, value)


@SETTINGS
@given(domains, st.floats(allow_nan=False))
def test_from_unit_stays_in_the_domain(dom: Domain, u: float) -> None:
    assert_native_in(dom, dom.from_unit(u))


@SETTINGS
@given(spaces, st.integers(0, 2**32))
def test_space_unit_round_trip(space: Space, seed: int) -> None:
    config = space.sample(np.random.default_rng(seed))
    point = space.to_unit(config)
    assert point.shape == (len(space),)
    assert np.all((point >= 0) & (point <= 1))
    back = space.from_unit(point)
    for name, dom in space.items():
        assert_unit_round_trip(dom, config[name])
        assert_native_in(dom, back[name])


def test_every_int_survives_the_unit_encoding_far_from_zero() -> None:
    dom = Int(INT_LIMIT - 20, INT_LIMIT)
    for v in range(dom.lower, dom.upper + 1):
        assert dom.from_unit(dom.to_unit(v)) == v


def test_every_log_int_survives_the_unit_encoding() -> None:
    dom = Int(1, 5000, log=True)
    assert [dom.from_unit(dom.to_unit(v)) for v in range(1, 5001)] == list(range(1, 5001))


def test_from_unit_clips_out_of_range_points() -> None:
    assert Categorical("a", "b").from_unit(math.inf) == "b"
    assert Categorical("a", "b").from_unit(-math.inf) == "a"
    assert Int(0, 9).from_unit(2.0) == 9
    assert Real(0, 1).from_unit(-3.0) == 0.0


def test_from_unit_needs_one_coordinate_per_parameter() -> None:
    with pytest.raises(ValueError, match="2 coordinates"):
        Space({"a": Bool(), "b": Bool()}).from_unit([0.5])


# ---------------------------------------------------------------- JSON


@SETTINGS
@given(spaces)
def test_json_round_trip(space: Space) -> None:
    assert Space.from_json(space.to_json()) == space
    through_text = Space.from_json(json.loads(json.dumps(space.to_json())))
    assert through_text == space
    assert hash(through_text) == hash(space)
    assert list(through_text) == list(space)


def test_equality_is_exact_about_choice_types_and_order() -> None:
    assert Categorical(1) != Categorical(True)
    assert Categorical(1) != Categorical(1.0)
    assert Space({"a": Bool(), "b": Int(0, 3)}) != Space({"b": Int(0, 3), "a": Bool()})
    assert Space({"a": Bool(), "b": Int(0, 3)}) == Space({"a": Bool(), "b": Int(0, 3)})


def test_equal_reals_hash_alike() -> None:
    assert Real(0, 1) == Real(0.0, 1.0)
    assert hash(Real(0, 1)) == hash(Real(0.0, 1.0))
    assert hash(Space({"x": Real(0, 1)})) == hash(Space({"x": Real(0.0, 1.0)}))


# ---------------------------------------------------------------- grid


@SETTINGS
@given(finite_spaces)
def test_finite_grid_is_every_configuration_once(space: Space) -> None:
    grid = list(space.grid())
    assert len(grid) == space.cardinality
    assert len({canonical(c) for c in grid}) == len(grid)
    for config in grid:
        assert space.validate(config) == config


@SETTINGS
@given(spaces, st.integers(1, 4))
def test_grid_with_points_is_valid_and_has_no_repeats(space: Space, points: int) -> None:
    grid = list(space.grid(points))
    assert len({canonical(c) for c in grid}) == len(grid)
    bound = 1
    for dom in space.values():
        bound *= min(points, dom.cardinality) if isinstance(dom, Int) else (
            dom.cardinality or points)
    assert 1 <= len(grid) <= bound
    for config in grid:
        assert space.validate(config) == config


def test_grid_order_last_parameter_fastest() -> None:
    space = Space({"a": Int(0, 1), "b": Categorical("x", "y", "z")})
    assert list(space.grid()) == [{"a": a, "b": b} for a in (0, 1) for b in "xyz"]


def test_real_grid_spans_the_bounds() -> None:
    assert Real(0, 1).grid(3) == [0.0, 0.5, 1.0]
    assert Real(1, 100, log=True).grid(3) == pytest.approx([1.0, 10.0, 100.0])
    assert Real(0, 5e-324).grid(3) == [0.0, 5e-324]


def test_grid_of_a_real_needs_points_and_names_it() -> None:
    space = Space({"a": Bool(), "lr": Real(1e-4, 1e-1, log=True)})
    with pytest.raises(ValueError, match="'lr'.*continuous"):
        space.grid()  # raised by the call, not by the first next()


@pytest.mark.parametrize("points", [0, -1, 1.5, True])
def test_grid_points_must_be_a_positive_integer(points: Any) -> None:
    with pytest.raises(ValueError, match="grid points"):
        Space({"a": Bool()}).grid(points)


# ---------------------------------------------------------------- validation

INVALID_DOMAINS = [
    (lambda: Real(1.0, 1.0), "lower (1.0) must be < upper (1.0)"),
    (lambda: Real(0.01, 0.001), "lower (0.01) must be < upper (0.001)"),
    (lambda: Int(5, 2), "lower (5) must be < upper (2)"),
    (lambda: Real(0.0, 1.0, log=True), "log scale needs lower > 0"),
    (lambda: Real(-1.0, 1.0, log=True), "log scale needs lower > 0"),
    (lambda: Int(0, 10, log=True), "log scale needs lower > 0"),
    (lambda: Real(0, math.inf), "upper must be finite"),
    (lambda: Real(math.nan, 1), "lower must be finite"),
    (lambda: Real("0", 1), "lower must be a number"),
    (lambda: Real(True, 2), "lower must be a number"),
    (lambda: Int(0.0, 3), "lower must be an integer"),
    (lambda: Int(0, 2 * INT_LIMIT), "upper"),
    (lambda: Real(-1e308, 1e308), "too wide"),
    (lambda: Real(0, 1, log="yes"), "log must be True or False"),
    (lambda: Real(0, 1, default=2.0), "default (2.0) is outside"),
    (lambda: Int(0, 3, default=-1), "default (-1) is outside"),
    (lambda: Int(0, 3, default=1.5), "default must be an integer"),
    (lambda: Categorical(), "at least one choice"),
    (lambda: Categorical([]), "at least one choice"),
    (lambda: Categorical("a", object()), "cannot be stored as JSON"),
    (lambda: Categorical(1.0, math.nan), "nan"),
    (lambda: Categorical(math.inf), "cannot be stored as JSON"),
    (lambda: Categorical("a", [1, 2]), "cannot be stored as JSON"),
    (lambda: Categorical("a", {"k": 1}), "cannot be stored as JSON"),
    (lambda: Categorical("a", "b", "a"), "'a' appears twice"),
]


@pytest.mark.parametrize(("make", "problem"), INVALID_DOMAINS)
def test_invalid_domain_names_parameter_and_problem(make: Any, problem: str) -> None:
    with pytest.raises(ValueError) as info:
        Space({"my_param": make()})
    assert "'my_param'" in str(info.value)
    assert problem in str(info.value)


@pytest.mark.parametrize("name", ["1x", "a-b", "", "has space", "class", "lambda", 3])
def test_names_must_be_identifiers(name: Any) -> None:
    with pytest.raises(ValueError, match="identifier") as info:
        Space({name: Bool()})
    assert repr(name) in str(info.value)


def test_values_must_be_domains() -> None:
    with pytest.raises(ValueError, match="'lr'.*domain"):
        Space({"lr": 0.1})


INVALID_JSON = [
    ({"type": "float", "lower": 0, "upper": 1}, "type must be one of"),
    ({"lower": 0, "upper": 1}, "type must be one of"),
    ({"type": "real", "lower": 0, "upper": 1, "step": 2}, "unknown key(s) ['step']"),
    ({"type": "bool", "default": True}, "unknown key(s) ['default']"),
    ({"type": "categorical", "choices": "abc"}, "choices must be a list"),
    ({"type": "categorical", "choices": []}, "at least one choice"),
    ({"type": "int", "lower": 0}, "missing key(s) ['upper']"),
    ({"type": "int", "lower": 3, "upper": 1}, "lower (3) must be < upper (1)"),
    ([0, 1], "expected a table"),
]


@pytest.mark.parametrize(("data", "problem"), INVALID_JSON)
def test_invalid_json_names_parameter_and_problem(data: Any, problem: str) -> None:
    with pytest.raises(ValueError) as info:
        Space.from_json({"my_param": data})
    assert "'my_param'" in str(info.value)
    assert problem in str(info.value)


def test_space_json_must_be_a_table() -> None:
    with pytest.raises(ValueError, match="table of parameters"):
        Space.from_json([1, 2])


def test_validate_names_the_bad_parameter() -> None:
    space = Space({"lr": Real(0, 1), "n": Int(1, 3)})
    with pytest.raises(ValueError, match="'n'"):
        space.validate({"lr": 0.5, "n": 7})
    with pytest.raises(ValueError, match=r"\['n'\]"):
        space.validate({"lr": 0.5})
    assert space.validate({"lr": np.float64(0.5), "n": np.int64(2)}) == {"lr": 0.5, "n": 2}


def test_cardinality() -> None:
    assert Space({"a": Int(1, 4), "b": Bool(), "c": Categorical("x", "y", "z")}).cardinality \
        == 24
    assert Space({"a": Int(1, 4), "r": Real(0, 1)}).cardinality is None
    assert Space().cardinality == 1
