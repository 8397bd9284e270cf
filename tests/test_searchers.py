"""Tests of the searchers: determinism (across processes and save/load) and their contracts.

Every searcher named in SEARCHER_NAMES gets the generic tests; random and grid get their own.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest

from tuned.core.searchers import SearcherStateError, make_searcher
from tuned.core.searchers.base import Searcher
from tuned.core.searchers.grid import GridSearcher
from tuned.core.searchers.random import RandomSearcher
from tuned.core.space import Bool, Categorical, Int, Real, Space

#: The searchers every generic test runs against.
SEARCHER_NAMES = ["random", "grid", "rl", "bayesopt"]

ROOT = Path(__file__).resolve().parent.parent

MIXED = Space({
    "lr": Real(1e-4, 1e-1, log=True),
    "momentum": Real(0.5, 0.99),
    "layers": Int(1, 8),
    "width": Int(16, 1024, log=True),
    "act": Categorical("relu", "tanh", "gelu"),
    "bn": Bool(),
})
FINITE = Space({"a": Int(0, 3), "b": Categorical("x", "y", 2, 2.5, None), "c": Bool()})


def score(config: dict[str, Any]) -> float:
    """A deterministic score of a configuration, the same in every process."""
    return zlib.crc32(json.dumps(config, sort_keys=True).encode()) / 2**32


def run(searcher: Searcher, n: int, start: int = 0) -> list[dict[str, Any] | None]:
    """Suggest `n` configurations (trial ids from `start`), observing each one's score."""
    out = []
    for trial_id in range(start, start + n):
        config = searcher.suggest(trial_id)
        out.append(config)
        if config is not None:
            searcher.observe(trial_id, config, score(config), True)
    return out


CHILD = """
import json, sys, zlib
from tuned.core.searchers import make_searcher
from tuned.core.space import Space

name, space_json, seed, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
searcher = make_searcher(name, Space.from_json(json.loads(space_json)), seed=seed)
out = []
for trial_id in range(n):
    config = searcher.suggest(trial_id)
    out.append(config)
    if config is not None:
        s = zlib.crc32(json.dumps(config, sort_keys=True).encode()) / 2**32
        searcher.observe(trial_id, config, s, True)
print(json.dumps(out))
"""


@pytest.mark.parametrize("name", SEARCHER_NAMES)
def test_same_seed_same_suggestions_in_another_process(name: str) -> None:
    n = 25
    here = run(make_searcher(name, MIXED, seed=7), n)
    child = subprocess.run(
        [sys.executable, "-c", CHILD, name, json.dumps(MIXED.to_json()), "7", str(n)],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert child.returncode == 0, child.stderr[-3000:]
    there = json.loads(child.stdout)
    assert json.dumps(there) == json.dumps(here)  # exact, types included
    assert len(here) == n and here[0] is not None


@pytest.mark.parametrize("name", SEARCHER_NAMES)
def test_save_and_load_mid_run_changes_nothing(name: str) -> None:
    straight = run(make_searcher(name, MIXED, seed=3), 20)

    first = make_searcher(name, MIXED, seed=3)
    part_a = run(first, 10)
    saved = json.dumps(first.state_dict())
    second = make_searcher(name, MIXED, seed=999)  # the loaded state overrides the seed
    second.load_state_dict(json.loads(saved))
    part_b = run(second, 10, start=10)

    assert json.dumps(part_a + part_b) == json.dumps(straight)


@pytest.mark.parametrize("name", SEARCHER_NAMES)
def test_loading_rewinds_a_used_searcher(name: str) -> None:
    searcher = make_searcher(name, MIXED, seed=3)
    first = run(searcher, 10)
    saved = json.dumps(searcher.state_dict())
    later = run(searcher, 10, start=10)
    searcher.load_state_dict(json.loads(saved))
    assert json.dumps(run(searcher, 10, start=10)) == json.dumps(later)
    assert first != later


@pytest.mark.parametrize("name", SEARCHER_NAMES)
def test_state_dict_is_versioned_json(name: str) -> None:
    searcher = make_searcher(name, MIXED, seed=1)
    run(searcher, 3)
    state = json.loads(json.dumps(searcher.state_dict()))
    assert state["kind"] == name
    assert state["v"] == searcher.version


@pytest.mark.parametrize("name", SEARCHER_NAMES)
@pytest.mark.parametrize("change", [{"kind": "other"}, {"v": 999}])
def test_load_state_of_another_kind_or_version_raises(name: str, change: dict) -> None:
    searcher = make_searcher(name, MIXED, seed=1)
    state = {**searcher.state_dict(), **change}
    with pytest.raises(SearcherStateError):
        make_searcher(name, MIXED, seed=1).load_state_dict(state)


@pytest.mark.parametrize("name", SEARCHER_NAMES)
def test_suggestions_are_valid_configurations(name: str) -> None:
    for config in run(make_searcher(name, MIXED, seed=5), 15):
        if config is not None:
            assert list(config) == list(MIXED)
            assert MIXED.validate(config) == config


def test_unknown_searcher_is_named() -> None:
    with pytest.raises(ValueError, match="'nope'"):
        make_searcher("nope", MIXED)


@pytest.mark.parametrize("name", SEARCHER_NAMES)
def test_unknown_option_is_named(name: str) -> None:
    with pytest.raises(ValueError, match="bogus_option"):
        make_searcher(name, MIXED, seed=0, bogus_option=1)


# ---------------------------------------------------------------- random


def test_random_starts_with_the_default() -> None:
    assert RandomSearcher(MIXED, seed=0).suggest(0) == MIXED.default()
    assert RandomSearcher(MIXED, seed=0).suggest(0) == RandomSearcher(MIXED, seed=1).suggest(0)


def test_random_seeds_differ() -> None:
    assert run(RandomSearcher(MIXED, seed=0), 5) != run(RandomSearcher(MIXED, seed=1), 5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_exhausts_a_finite_space_without_repeats(seed: int) -> None:
    searcher = RandomSearcher(FINITE, seed=seed)
    configs = run(searcher, FINITE.cardinality)
    keys = [json.dumps(c, sort_keys=True) for c in configs]
    assert len(set(keys)) == FINITE.cardinality == 40
    assert sorted(keys) == sorted(json.dumps(c, sort_keys=True) for c in FINITE.grid())
    assert searcher.suggest(999) is None
    assert searcher.suggest(1000) is None


def test_random_exhaustion_survives_save_and_load() -> None:
    straight = run(RandomSearcher(FINITE, seed=4), 45)
    first = RandomSearcher(FINITE, seed=4)
    part_a = run(first, 33)  # past the point where the rest is enumerated
    second = RandomSearcher(FINITE, seed=4)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert part_a + run(second, 12, start=33) == straight
    assert straight[-5:] == [None] * 5


def test_random_rewound_near_exhaustion_forgets_what_it_suggested_since() -> None:
    searcher = RandomSearcher(FINITE, seed=6)
    run(searcher, 31)
    saved = json.dumps(searcher.state_dict())
    later = run(searcher, 9, start=31)  # enumerating the rest from here
    searcher.load_state_dict(json.loads(saved))
    assert run(searcher, 9, start=31) == later


def test_random_tiny_spaces() -> None:
    assert run(RandomSearcher(Space(), seed=0), 2) == [{}, None]
    assert run(RandomSearcher(Space({"b": Bool()}), seed=0), 3) == [{"b": False}, {"b": True},
                                                                    None]


def test_random_state_lists_seen_configurations_in_parts() -> None:
    from tuned.core.searchers.random import CHUNK

    searcher = RandomSearcher(MIXED, seed=0)
    configs = run(searcher, CHUNK + 3)
    state = searcher.state_dict()
    keys = [json.dumps(c, sort_keys=True) for c in configs]
    assert (state["seen.0"], state["seen.1"]) == (keys[:CHUNK], keys[CHUNK:])
    # One more suggestion changes the RNG and the last part only.
    run(searcher, 1)
    after = searcher.state_dict()
    assert {k for k in after if after[k] != state.get(k)} == {"rng", "seen.1"}


def test_random_loads_a_version_1_state() -> None:
    searcher = RandomSearcher(FINITE, seed=0)
    configs = run(searcher, 3)
    old = {"v": 1, "kind": "random", "rng": searcher.rng.bit_generator.state,
           "seen": sorted(json.dumps(c, sort_keys=True) for c in configs)}
    loaded = RandomSearcher(FINITE, seed=5)
    loaded.load_state_dict(old)
    assert run(loaded, 4) == run(searcher, 4)


def test_random_rejects_a_bad_seen_list() -> None:
    searcher = RandomSearcher(FINITE, seed=0)
    run(searcher, 2)
    state = searcher.state_dict()
    with pytest.raises(SearcherStateError, match="seen"):
        searcher.load_state_dict({**state, "seen.0": [1, 2]})


# ---------------------------------------------------------------- grid


@pytest.mark.parametrize("points", [1, 2, 3])
def test_grid_enumerates_exactly_the_grid(points: int) -> None:
    expected = list(MIXED.grid(points))
    searcher = GridSearcher(MIXED, seed=0, grid_points=points)
    got = run(searcher, len(expected) + 3)
    assert got == expected + [None] * 3


def test_grid_default_points_and_option_through_the_registry() -> None:
    space = Space({"x": Real(0, 1), "c": Categorical("a", "b")})
    assert len(run(make_searcher("grid", space), 11)) == 11
    assert run(make_searcher("grid", space), 11)[10] is None  # 5 x 2 configurations
    assert run(make_searcher("grid", space, grid_points=2), 5) == [
        {"x": 0.0, "c": "a"}, {"x": 0.0, "c": "b"}, {"x": 1.0, "c": "a"}, {"x": 1.0, "c": "b"},
        None]


@pytest.mark.parametrize("points", [0, -3, 2.5, True, "5"])
def test_grid_points_must_be_a_positive_integer(points: Any) -> None:
    with pytest.raises(ValueError, match="grid_points"):
        make_searcher("grid", MIXED, grid_points=points)


def test_grid_does_not_build_a_huge_grid() -> None:
    space = Space({f"p{i}": Int(0, 999) for i in range(6)})  # 1e18 configurations
    searcher = GridSearcher(space, grid_points=1000)
    assert searcher.suggest(0) == {f"p{i}": 0 for i in range(6)}
    assert searcher.suggest(1) == {**{f"p{i}": 0 for i in range(5)}, "p5": 1}


def test_grid_state_is_the_position() -> None:
    searcher = GridSearcher(FINITE, seed=0)
    run(searcher, 7)
    state = searcher.state_dict()
    assert state["position"] == 7
    with pytest.raises(SearcherStateError, match="grid_points"):
        GridSearcher(FINITE, seed=0, grid_points=3).load_state_dict(state)
    with pytest.raises(SearcherStateError, match="position"):
        GridSearcher(FINITE, seed=0).load_state_dict({**state, "position": -1})
