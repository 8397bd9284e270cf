"""Search spaces: the domains of hyperparameters and the space they form together.

A domain (`Real`, `Int`, `Categorical`, `Bool`) describes the values one hyperparameter may
take. A `Space` is an ordered mapping from parameter names to domains. Both are pure values:
they sample from a `numpy.random.Generator` passed in, encode to and decode from the unit
interval (one dimension per parameter, for model-based searchers), enumerate their finite
grid, and round-trip through JSON.

Validation is done when a domain is bound to a name (by `Space`, and so by `tuned.args`),
so that every `ValueError` names the parameter and the problem, e.g.
``parameter 'lr': lower (0.01) must be < upper (0.001)``.
"""

from __future__ import annotations

import itertools
import json
import keyword
import math
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

__all__ = ["Domain", "Real", "Int", "Categorical", "Bool", "Space", "is_json_scalar"]

SPACE_JSON_VERSION = 1

#: The largest magnitude an `Int` bound may have. Integer values travel through the unit
#: interval as float64 (for model-based searchers), through JSON and through SQLite; within
#: this limit every one of them survives all three exactly.
INT_LIMIT = 10**15


def is_json_scalar(value: Any) -> bool:
    """True for values that survive a JSON round trip unchanged.

    Those are str, bool, int, finite float and None.
    """
    if value is None or isinstance(value, (str, bool, int)):
        return True
    return isinstance(value, float) and math.isfinite(value)


def _native(value: Any) -> Any:
    """Turn numpy scalars into the Python scalars they stand for."""
    return value.item() if isinstance(value, np.generic) else value


def _as_float(value: int | float) -> float | None:
    """`value` as a float, or None when it is an int too large for one."""
    try:
        return float(value)
    except OverflowError:
        return None


def _canonical(data: Any) -> str:
    """A canonical JSON text of `data`: equal texts mean equal values of equal JSON types.

    Used for equality and hashing, so that `1`, `1.0` and `True` stay distinct choices.
    """
    return json.dumps(data, sort_keys=True, default=repr)


class Domain:
    """The values one hyperparameter may take.

    Subclasses implement `problems()` (what is wrong with the domain, as sentences),
    `sample`, `to_unit`, `from_unit`, `grid`, `contains` and `to_json`.
    """

    kind = "domain"

    def problems(self) -> list[str]:
        """Sentences describing what is invalid about this domain; empty when it is valid."""
        return []

    def check(self, name: str = "?") -> Domain:
        """Return self, or raise ValueError naming `name` and the first problem."""
        problems = self.problems()
        if problems:
            raise ValueError(f"parameter {name!r}: {problems[0]}")
        return self

    @property
    def cardinality(self) -> int | None:
        """The number of distinct values, or None when there are infinitely many."""
        raise NotImplementedError

    @property
    def default(self) -> Any:
        raise NotImplementedError

    def sample(self, rng: np.random.Generator) -> Any:
        raise NotImplementedError

    def to_unit(self, value: Any) -> float:
        raise NotImplementedError

    def from_unit(self, u: float) -> Any:
        raise NotImplementedError

    def grid(self, points: int | None = None) -> list[Any]:
        raise NotImplementedError

    def contains(self, value: Any) -> bool:
        raise NotImplementedError

    def to_json(self) -> dict[str, Any]:
        raise NotImplementedError

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and _canonical(self.to_json()) == _canonical(
            other.to_json())

    def __hash__(self) -> int:
        return hash((type(self).__name__, _canonical(self.to_json())))

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.to_json().items() if k != "type")
        return f"{type(self).__name__}({fields})"


class _Numeric(Domain):
    """Shared checks of `Real` and `Int`: bounds, log scale, default in range."""

    def __init__(self, lower: Any, upper: Any, default: Any = None, log: bool = False):
        self.lower = _native(lower)
        self.upper = _native(upper)
        self._default = _native(default)
        self.log = log

    def _bound_problems(self, number_types: tuple[type, ...], what: str,
                        limit: int | None = None) -> list[str]:
        for label, v in (("lower", self.lower), ("upper", self.upper)):
            if isinstance(v, bool) or not isinstance(v, number_types):
                return [f"{label} must be {what}, got {v!r}"]
            if limit is not None and abs(v) > limit:
                return [f"{label} ({v!r}) must lie within -{limit:.0e} .. {limit:.0e}"]
            if _as_float(v) is None:
                return [f"{label} is too large for a float64"]
            if not math.isfinite(v):
                return [f"{label} must be finite, got {v!r}"]
        if not self.lower < self.upper:
            return [f"lower ({self.lower!r}) must be < upper ({self.upper!r})"]
        if not isinstance(self.log, bool):
            return [f"log must be True or False, got {self.log!r}"]
        if self.log and self.lower <= 0:
            return [f"log scale needs lower > 0, got lower={self.lower!r}"]
        d = self._default
        if d is not None:
            if isinstance(d, bool) or not isinstance(d, number_types):
                return [f"default must be {what}, got {d!r}"]
            if not self.lower <= d <= self.upper:
                return [f"default ({d!r}) is outside [{self.lower!r}, {self.upper!r}]"]
        return []

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.kind, "lower": self.lower, "upper": self.upper}
        if self.log:
            out["log"] = True
        if self._default is not None:
            out["default"] = self._default
        return out


class Real(_Numeric):
    """A real number in [lower, upper], uniform or (with `log=True`) log-uniform."""

    kind = "real"

    def problems(self) -> list[str]:
        problems = self._bound_problems((int, float), "a number")
        if not problems and not math.isfinite(float(self.upper) - float(self.lower)):
            problems = [f"the range [{self.lower!r}, {self.upper!r}] is too wide for float64"]
        return problems

    @property
    def cardinality(self) -> int | None:
        return None

    def to_json(self) -> dict[str, Any]:
        """Bounds and default as floats, so that `Real(0, 1) == Real(0.0, 1.0)`."""
        out = super().to_json()
        for key in ("lower", "upper", "default"):
            v = out.get(key)
            if isinstance(v, int) and not isinstance(v, bool) and _as_float(v) is not None:
                out[key] = float(v)
        return out

    @property
    def default(self) -> float:
        if self._default is not None:
            return float(self._default)
        return self.from_unit(0.5)

    def _warp(self) -> tuple[float, float]:
        if self.log:
            return math.log(self.lower), math.log(self.upper)
        return float(self.lower), float(self.upper)

    def sample(self, rng: np.random.Generator) -> float:
        return self.from_unit(float(rng.random()))

    def to_unit(self, value: Any) -> float:
        lo, hi = self._warp()
        x = math.log(value) if self.log else float(value)
        return min(1.0, max(0.0, (x - lo) / (hi - lo)))

    def from_unit(self, u: float) -> float:
        lo, hi = self._warp()
        x = lo + min(1.0, max(0.0, float(u))) * (hi - lo)
        x = math.exp(x) if self.log else x
        return min(float(self.upper), max(float(self.lower), x))

    def grid(self, points: int | None = None) -> list[float]:
        """`points` values evenly spaced (on the log scale when `log`), both bounds included.

        Fewer when the range holds fewer than `points` distinct floats; never a repeat.
        """
        if points is None:
            raise ValueError(f"{self!r} is continuous: its grid needs a number of points")
        if points < 1:
            raise ValueError(f"grid points must be >= 1, got {points}")
        if points == 1:
            return [self.default]
        # dict.fromkeys: a range narrower than `points` floats must not repeat a value.
        return list(dict.fromkeys(self.from_unit(i / (points - 1)) for i in range(points)))

    def contains(self, value: Any) -> bool:
        value = _native(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return self.lower <= value <= self.upper


class Int(_Numeric):
    """An integer in [lower, upper] (both included), uniform or (with `log=True`) log-uniform.

    Bounds lie within +-`INT_LIMIT`. On the linear scale `from_unit(to_unit(v)) == v` for
    every v; on the log scale it holds while float64 tells log(v) from log(v + 1), that is
    for v up to about 1e12.
    """

    kind = "int"

    def problems(self) -> list[str]:
        return self._bound_problems((int,), "an integer", limit=INT_LIMIT)

    @property
    def cardinality(self) -> int:
        return self.upper - self.lower + 1

    @property
    def default(self) -> int:
        if self._default is not None:
            return int(self._default)
        return self.from_unit(0.5)

    def _warp(self) -> tuple[float, float]:
        # Each integer v owns the interval [v, v + 1) of the warped line.
        if self.log:
            return math.log(self.lower), math.log(self.upper + 1)
        return float(self.lower), float(self.upper + 1)

    def sample(self, rng: np.random.Generator) -> int:
        if not self.log:
            return int(rng.integers(self.lower, self.upper + 1))
        return self.from_unit(float(rng.random()))

    def to_unit(self, value: Any) -> float:
        v = min(self.upper, max(self.lower, int(value)))
        if not self.log:
            # Exact integer arithmetic: the centre of v's slot, (k + 1/2) / n, correctly
            # rounded, whatever the magnitude of the bounds.
            return (2 * (v - self.lower) + 1) / (2 * self.cardinality)
        lo, hi = self._warp()
        # The centre of v's interval, so that from_unit(to_unit(v)) == v.
        centre = (math.log(v) + math.log(v + 1)) / 2
        return min(1.0, max(0.0, (centre - lo) / (hi - lo)))

    def from_unit(self, u: float) -> int:
        u = min(1.0, max(0.0, float(u)))
        if not self.log:
            num, den = u.as_integer_ratio()
            return self.lower + min(self.cardinality - 1, num * self.cardinality // den)
        lo, hi = self._warp()
        v = math.floor(math.exp(lo + u * (hi - lo)))
        return int(min(self.upper, max(self.lower, v)))

    def grid(self, points: int | None = None) -> list[int]:
        """Every integer when there are at most `points` (or `points` is None), else at most
        `points` distinct values spread evenly over the range (on the log scale when `log`;
        fewer where several of them fall on one integer), in increasing order."""
        if points is None or self.cardinality <= points:
            return list(range(self.lower, self.upper + 1))
        if points < 1:
            raise ValueError(f"grid points must be >= 1, got {points}")
        values = sorted({self.from_unit((i + 0.5) / points) for i in range(points)})
        return values

    def contains(self, value: Any) -> bool:
        value = _native(value)
        if isinstance(value, bool) or not isinstance(value, int):
            return False
        return self.lower <= value <= self.upper


class Categorical(Domain):
    """One of a list of choices: JSON scalars (str, int, finite float, bool, None).

    The default is the first choice.
    """

    kind = "categorical"

    def __init__(self, *choices: Any):
        if len(choices) == 1 and isinstance(choices[0], (list, tuple)):
            choices = tuple(choices[0])
        self.choices = [_native(c) for c in choices]

    def problems(self) -> list[str]:
        if not self.choices:
            return ["a categorical needs at least one choice"]
        seen = set()
        for c in self.choices:
            if not is_json_scalar(c):
                return [f"choice {c!r} cannot be stored as JSON "
                        "(use str, int, finite float, bool or None)"]
            key = (type(c).__name__, c)
            if key in seen:
                return [f"choice {c!r} appears twice"]
            seen.add(key)
        return []

    @property
    def cardinality(self) -> int:
        return len(self.choices)

    @property
    def default(self) -> Any:
        return self.choices[0]

    def index(self, value: Any) -> int:
        """The position of `value` among the choices; ValueError when it is not one."""
        value = _native(value)
        for i, c in enumerate(self.choices):
            if type(c) is type(value) and c == value:
                return i
        raise ValueError(f"{value!r} is not one of the choices {self.choices!r}")

    def sample(self, rng: np.random.Generator) -> Any:
        return self.choices[int(rng.integers(len(self.choices)))]

    def to_unit(self, value: Any) -> float:
        return (self.index(value) + 0.5) / len(self.choices)

    def from_unit(self, u: float) -> Any:
        n = len(self.choices)
        u = min(1.0, max(0.0, float(u)))
        return self.choices[min(n - 1, math.floor(u * n))]

    def grid(self, points: int | None = None) -> list[Any]:
        return list(self.choices)

    def contains(self, value: Any) -> bool:
        try:
            self.index(value)
        except ValueError:
            return False
        return True

    def to_json(self) -> dict[str, Any]:
        return {"type": self.kind, "choices": list(self.choices)}


class Bool(Categorical):
    """False or True (default False)."""

    kind = "bool"

    def __init__(self) -> None:
        super().__init__(False, True)

    def to_json(self) -> dict[str, Any]:
        return {"type": self.kind}

    def __repr__(self) -> str:
        return "Bool()"


_DOMAIN_KEYS = {
    "real": (Real, {"lower", "upper", "default", "log"}),
    "int": (Int, {"lower", "upper", "default", "log"}),
    "categorical": (Categorical, {"choices"}),
    "bool": (Bool, set()),
}


def domain_from_json(name: str, data: Any) -> Domain:
    """Build a domain from its JSON form; ValueError naming `name` and every key at fault."""
    if not isinstance(data, Mapping):
        raise ValueError(f"parameter {name!r}: expected a table like "
                         f"{{type = \"real\", lower = ..., upper = ...}}, got {data!r}")
    kind = data.get("type")
    if kind not in _DOMAIN_KEYS:
        raise ValueError(f"parameter {name!r}: type must be one of "
                         f"{sorted(_DOMAIN_KEYS)}, got {kind!r}")
    cls, allowed = _DOMAIN_KEYS[kind]
    unknown = sorted(set(data) - allowed - {"type"})
    if unknown:
        raise ValueError(f"parameter {name!r}: unknown key(s) {unknown} for type {kind!r} "
                         f"(allowed: {sorted(allowed)})")
    if cls is Bool:
        return Bool()
    if cls is Categorical:
        choices = data.get("choices")
        if not isinstance(choices, list):
            raise ValueError(f"parameter {name!r}: choices must be a list, got {choices!r}")
        return Categorical(*choices).check(name)
    missing = [k for k in ("lower", "upper") if k not in data]
    if missing:
        raise ValueError(f"parameter {name!r}: missing key(s) {missing}")
    return cls(data["lower"], data["upper"], default=data.get("default"),
               log=data.get("log", False)).check(name)


class Space(Mapping):
    """An ordered mapping of parameter names to domains.

    Construction validates every domain and raises ValueError naming the parameter.
    Configurations are plain dicts from name to value, in the space's order.
    """

    def __init__(self, params: Mapping[str, Domain] | None = None):
        self._params: dict[str, Domain] = {}
        for name, dom in (params or {}).items():
            if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
                raise ValueError(f"parameter {name!r}: names must be Python identifiers "
                                 "(and not keywords)")
            if not isinstance(dom, Domain):
                raise ValueError(f"parameter {name!r}: expected a tuned.core.space domain, "
                                 f"got {dom!r}")
            self._params[name] = dom.check(name)

    def __getitem__(self, name: str) -> Domain:
        return self._params[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._params)

    def __len__(self) -> int:
        return len(self._params)

    def _canonical(self) -> str:
        # A list of pairs: the order of the parameters is part of the space.
        return _canonical([[name, dom.to_json()] for name, dom in self._params.items()])

    def __eq__(self, other: object) -> bool:
        """Equal spaces have the same parameters, in the same order, with equal domains."""
        return isinstance(other, Space) and self._canonical() == other._canonical()

    def __hash__(self) -> int:
        return hash(self._canonical())

    def __repr__(self) -> str:
        return f"Space({self._params!r})"

    @property
    def cardinality(self) -> int | None:
        """The number of distinct configurations, or None when infinite."""
        total = 1
        for dom in self._params.values():
            n = dom.cardinality
            if n is None:
                return None
            total *= n
        return total

    def default(self) -> dict[str, Any]:
        return {name: dom.default for name, dom in self._params.items()}

    def sample(self, rng: np.random.Generator) -> dict[str, Any]:
        return {name: dom.sample(rng) for name, dom in self._params.items()}

    def to_unit(self, config: Mapping[str, Any]) -> np.ndarray:
        """The configuration as a point of the unit cube, one dimension per parameter."""
        return np.array([dom.to_unit(config[name]) for name, dom in self._params.items()],
                        dtype=float)

    def from_unit(self, point: Any) -> dict[str, Any]:
        """The configuration at a point of the unit cube (values are clipped into [0, 1])."""
        point = np.asarray(point, dtype=float).reshape(-1)
        if point.shape[0] != len(self._params):
            raise ValueError(f"expected a point with {len(self._params)} coordinates, "
                             f"got {point.shape[0]}")
        pairs = zip(self._params.items(), point, strict=True)
        return {name: dom.from_unit(u) for (name, dom), u in pairs}

    def grid(self, points: int | None = None) -> Iterator[dict[str, Any]]:
        """Every configuration of the grid, the last parameter varying fastest.

        Finite domains contribute all their values (an `Int` with more than `points` values
        contributes at most `points` of them); a `Real` needs `points`, else ValueError naming
        it. Errors are raised by this call, not when the iterator is first advanced; the
        configurations themselves are made lazily.
        """
        if points is not None and (isinstance(points, bool)
                                   or not isinstance(points, (int, np.integer)) or points < 1):
            raise ValueError(f"grid points must be an integer >= 1, got {points!r}")
        axes = []
        for name, dom in self._params.items():
            if dom.cardinality is None and points is None:
                raise ValueError(f"parameter {name!r}: {dom!r} is continuous; "
                                 "give grid points to discretise it")
            axes.append(dom.grid(points))
        return _configs(list(self._params), axes)

    def validate(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """Return `config` with numpy scalars made native; ValueError naming a bad parameter."""
        missing = [n for n in self._params if n not in config]
        if missing:
            raise ValueError(f"configuration lacks parameter(s) {missing}")
        out = {}
        for name, dom in self._params.items():
            value = _native(config[name])
            if not dom.contains(value):
                raise ValueError(f"parameter {name!r}: {value!r} is not in {dom!r}")
            out[name] = value
        return out

    def to_json(self) -> dict[str, Any]:
        return {name: dom.to_json() for name, dom in self._params.items()}

    @classmethod
    def from_json(cls, data: Any) -> Space:
        """Build a space from `to_json()` output (or a spec's `[space]` table)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a space must be a table of parameters, got {data!r}")
        return cls({name: domain_from_json(name, d) for name, d in data.items()})


def _configs(names: list[str], axes: list[list[Any]]) -> Iterator[dict[str, Any]]:
    """The configurations of the product of `axes`, the last axis varying fastest."""
    for values in itertools.product(*axes):
        yield dict(zip(names, values, strict=True))
