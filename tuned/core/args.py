"""`@tuned.args`: declare a training function's search space and constants.

    @tuned.args(lr=tuned.core.space.Real(1e-3, 1e-2, log=True), epochs=10)
    def train_fn(args, reporter):
        ...

The decorated function is still called as ``train_fn(args, reporter)``. It carries
``train_fn.space`` (a `Space` of the searchable parameters), ``train_fn.constants`` (the
rest) and ``train_fn.args`` (every parameter at its default, e.g. ``train_fn.args.epochs``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from tuned.core.space import Domain, Space


class Args(Mapping):
    """A trial's arguments: attribute access (``args.lr``) and mapping access (``args['lr']``).

    Raises AttributeError naming the missing argument and the ones there are.
    """

    def __init__(self, values: Mapping[str, Any] | None = None, **more: Any):
        object.__setattr__(self, "_values", {**(values or {}), **more})

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(
                f"no argument {name!r}; the arguments are {sorted(self._values)}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        self._values[name] = value

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self._values.items())
        return f"Args({inner})"

    def update(self, values: Mapping[str, Any]) -> None:
        self._values.update(values)


def split_kwargs(kwargs: Mapping[str, Any]) -> tuple[Space, dict[str, Any]]:
    """Split decorator arguments into the search space and the constants.

    Raises ValueError naming a parameter whose domain is invalid.
    """
    space = Space({k: v for k, v in kwargs.items() if isinstance(v, Domain)})
    constants = {k: v for k, v in kwargs.items() if not isinstance(v, Domain)}
    return space, constants


def args(**kwargs: Any) -> Callable[[Callable], Callable]:
    """Decorator: attach a search space and constants to a training function."""
    space, constants = split_kwargs(kwargs)

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(trial_args: Any, reporter: Any, *rest: Any, **kw: Any) -> Any:
            return fn(trial_args, reporter, *rest, **kw)

        wrapper.space = space
        wrapper.constants = dict(constants)
        wrapper.args = Args({**constants, **space.default()})
        return wrapper

    return decorate
