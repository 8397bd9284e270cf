"""Building an experiment's searcher and trial scheduler from their names and options: the
one list of their names, the one `max_t` inference, the one place that knows which class
each name means.

`make_searcher` (registered in `tuned.core.searchers`) and `make_scheduler` raise ValueError
naming what is wrong; `infer_max_t` never raises.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tuned.core.schedulers.base import FIFOScheduler, TrialScheduler
from tuned.core.searchers import SEARCHERS, make_searcher
from tuned.core.space import Space

__all__ = ["HYPERBAND_TYPES", "MAX_T_KEYS", "SCHEDULER_ALIASES", "SCHEDULER_NAMES",
           "SEARCHER_NAMES", "infer_max_t", "make_scheduler", "make_searcher", "max_t_problem",
           "needs_max_t", "resolve_scheduler"]

SEARCHER_NAMES = SEARCHERS
SCHEDULER_NAMES = ("fifo", "hyperband_stopping", "hyperband_promotion", "pbt")
#: Other names a spec may use for a scheduler, and the canonical name each stands for.
SCHEDULER_ALIASES = {"hyperband": "hyperband_stopping"}
#: The original tutorial's spelling: ``hyperband`` with ``type = "stopping" | "promotion"``.
HYPERBAND_TYPES = {"stopping": "hyperband_stopping", "promotion": "hyperband_promotion"}
#: The constants (the function's arguments) `max_t` is read from when it is not given.
MAX_T_KEYS = ("epochs", "max_t")


def needs_max_t(scheduler: str) -> bool:
    """Whether the scheduler `scheduler` (a canonical name) needs `max_t`."""
    return scheduler != "fifo"


def infer_max_t(options: Mapping[str, Any], constants: Mapping[str, Any]) -> int | None:
    """The scheduler's `max_t`: `options["max_t"]` when given, else the first of the
    `MAX_T_KEYS` constants that is an integer > 0, else None."""
    if options.get("max_t") is not None:
        return options["max_t"]
    for key in MAX_T_KEYS:
        value = constants.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def max_t_problem(scheduler: str) -> str:
    """What to say when `scheduler` has no `max_t`."""
    return (f"max_t: {scheduler} needs the largest value of time_attr; give max_t, or an "
            f"integer {' or '.join(repr(k) for k in MAX_T_KEYS)} argument or constant")


def resolve_scheduler(name: str, options: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """The canonical scheduler name and options for `name` and `options` as a spec or the
    tutorial writes them: an alias is replaced (``hyperband`` is ``hyperband_stopping``), and
    a Hyperband scheduler's ``type`` option (``"stopping"`` or ``"promotion"``, the tutorial's
    argument) chooses between the two and leaves the options. ValueError naming the option
    when ``type`` is not one of them, or contradicts a canonical name
    (``hyperband_stopping`` with ``type = "promotion"``). Any other name is returned as it is
    (`make_scheduler` says what is wrong with it)."""
    canonical = SCHEDULER_ALIASES.get(name, name)
    options = dict(options)
    if "type" not in options or canonical not in HYPERBAND_TYPES.values():
        return canonical, options
    kind = options.pop("type")
    if not isinstance(kind, str) or kind not in HYPERBAND_TYPES:
        raise ValueError(f"scheduler_options.type: must be one of {list(HYPERBAND_TYPES)}, "
                         f"got {kind!r}")
    chosen = HYPERBAND_TYPES[kind]
    if name != "hyperband" and chosen != canonical:
        raise ValueError(f"scheduler_options.type: {kind!r} contradicts scheduler {name!r} "
                         f"(write scheduler = \"hyperband\" with a type, or {chosen!r})")
    return chosen, options


def make_scheduler(name: str, options: Mapping[str, Any], seed: int | None = None,
                   space: Space | None = None) -> TrialScheduler:
    """The trial scheduler called `name` (canonical or an alias) with `options`; `seed` is
    its default seed, `space` the search space (PBT perturbs configurations in it).

    Raises ValueError naming the scheduler or the option: an unknown name, a missing
    `max_t` (`max_t_problem`), an unknown or invalid option.
    """
    name, options = resolve_scheduler(name, options)
    if name not in SCHEDULER_NAMES:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {list(SCHEDULER_NAMES)}")
    options = dict(options)
    try:
        if name == "fifo":
            return FIFOScheduler(**options)
        if seed is not None:
            options.setdefault("seed", seed)
        if options.get("max_t") is None:
            raise ValueError(max_t_problem(name))
        if name == "pbt":
            from tuned.core.schedulers.pbt import PopulationBasedTraining

            return PopulationBasedTraining(space if space is not None else Space({}),
                                           **options)
        from tuned.core.schedulers.hyperband import HyperbandPromotion, HyperbandStopping

        cls = HyperbandPromotion if name == "hyperband_promotion" else HyperbandStopping
        return cls(**options)
    except TypeError as exc:
        raise ValueError(f"scheduler {name!r}: {exc}") from None
