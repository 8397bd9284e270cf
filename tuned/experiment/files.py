"""Experiment spec files (TOML, or JSON) and the training code they name.

Three steps, kept apart so that validating a file never runs user code:

1. `load_spec_file(path)` (or `parse_spec_text(text, filename, workdir)` for a file's text
   received over the control socket) validates a file into an `ExperimentSpec`. It imports
   nothing of the user's: a spec with `entry` and no `[space]` table passes with an empty
   space, to be filled in from the function's `@tuned.args` by step 3.
2. `resolve_entry(entry, workdir)` imports the entry function ("path/to/file.py:function"
   relative to `workdir`, or "package.module:function" with `workdir` on `sys.path`).
3. `complete_spec(spec)` resolves the entry, fills in the space and constants from the
   function, infers Hyperband's `max_t`, and checks that the searcher and scheduler can be
   built from their options.

Steps 2 and 3 import user code and change `sys.path` and `sys.modules`: run them in the
process that will run the trials (the per-experiment template process), not in one that must
stay clean. Every error is a `SpecError` whose problems each name their key (or, for a file
that cannot be read at all, the file).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import json
import os
import re
import stat
import sys
import traceback
from collections.abc import Callable
from types import ModuleType
from typing import Any

from tuned.core.factory import (
    infer_max_t,
    make_scheduler,
    make_searcher,
    max_t_problem,
    needs_max_t,
)
from tuned.core.space import Space
from tuned.experiment.command import check_command
from tuned.experiment.spec import ENTRY_RE, ExperimentSpec, SpecError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = ["MAX_SPEC_BYTES", "load_spec_file", "parse_spec_text", "resolve_entry",
           "complete_spec"]

#: The largest spec file accepted: a spec is a small hand-written text.
MAX_SPEC_BYTES = 1 << 20
#: The keys a `[resources]` table may hold; each maps to the spec field of the same name.
RESOURCE_KEYS = ("num_cpus", "num_gpus")


# -- reading files ---------------------------------------------------------------------------

def load_spec_file(path: str | os.PathLike[str]) -> ExperimentSpec:
    """Read and validate the spec file at `path` (TOML, or JSON by extension or content).

    `name` defaults to the file's stem; `workdir` becomes the file's folder (absolute), or a
    `workdir` given in the file resolved against that folder. No user code is imported: an
    `entry` spec without a `[space]` table comes back with an empty space (see
    `complete_spec`). Raises SpecError listing every problem; a file that is missing, not a
    regular file, larger than `MAX_SPEC_BYTES`, binary or not UTF-8 gives one problem
    naming the file.
    """
    path = os.path.abspath(os.fspath(path))
    return parse_spec_text(_read_text(path), path, os.path.dirname(path))


def parse_spec_text(text: str, filename: str = "spec.toml", workdir: str | None = None, *,
                    fmt: str | None = None) -> ExperimentSpec:
    """Validate spec `text` as if it were read from the file `filename` in folder `workdir`.

    For a control server that receives a file's text rather than its path. `name` defaults
    to the stem of `filename`; problems of the file as a whole name `filename`. `fmt` is
    "toml" or "json"; None chooses JSON for a `.json` filename or text starting with "{",
    else TOML. The spec's `workdir` is `workdir` made absolute (a `workdir` in the text is
    resolved against it); with `workdir` None, only an absolute `workdir` in the text gives
    one, and relative entry paths are later resolved against the current folder. Imports no
    user code. Raises SpecError listing every problem.
    """
    if fmt is None and filename.lower().endswith(".json"):
        fmt = "json"
    data = _parse(text, filename, fmt)
    problems: list[str] = []
    data = _flatten_resources(data, problems)
    data.setdefault("name", os.path.splitext(os.path.basename(filename))[0])
    data["workdir"] = _workdir(data.get("workdir"), workdir, problems)
    if data.get("entry") is None and data.get("command") is None:
        problems.append('entry: give entry = "file.py:function" (or "package.module:function")'
                        ', or command = [program, args...]')
    try:
        spec = ExperimentSpec.from_dict(data)
    except SpecError as exc:
        raise SpecError(problems + exc.problems) from None
    if problems:
        raise SpecError(problems)
    return spec


def _read_text(path: str) -> str:
    """The text of the regular file `path`; SpecError naming the file when it cannot be one.

    Reads at most `MAX_SPEC_BYTES` + 1 bytes, so a file that grows meanwhile is refused too.
    """
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise SpecError([f"{path}: not a regular file"])
        if info.st_size > MAX_SPEC_BYTES:
            raise SpecError([f"{path}: {info.st_size} bytes; a spec file may hold at most "
                             f"{MAX_SPEC_BYTES} bytes"])
        with open(path, "rb") as f:
            raw = f.read(MAX_SPEC_BYTES + 1)
    except OSError as exc:
        raise SpecError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError([f"{path}: a spec file may hold at most {MAX_SPEC_BYTES} bytes"])
    if b"\x00" in raw:
        raise SpecError([f"{path}: a binary file (it holds NUL bytes), not a TOML or JSON spec"])
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SpecError([f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})"]) from None


def _parse(text: str, source: str, fmt: str | None) -> dict[str, Any]:
    """Parse TOML or JSON into a dict; SpecError naming `source` and where the syntax fails."""
    if fmt is None:
        fmt = "json" if text.lstrip().startswith("{") else "toml"
    if fmt == "json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecError([f"{source}: JSON syntax error: {exc.msg} (at line {exc.lineno}, "
                             f"column {exc.colno})"]) from None
    else:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise SpecError([f"{source}: TOML syntax error: {exc}"]) from None
    if not isinstance(data, dict):
        raise SpecError([f"{source}: a spec must be a table of keys, got a "
                         f"{type(data).__name__}"])
    return data


def _flatten_resources(data: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    """`data` with its `[resources]` table moved to top-level `num_cpus`/`num_gpus`.

    Unknown resource keys, a non-table, and a resource also given at top level are problems.
    """
    data = dict(data)
    if "resources" not in data:
        return data
    resources = data.pop("resources")
    if not isinstance(resources, dict):
        problems.append(f"resources: must be a table like {{num_cpus = 2, num_gpus = 1}}, "
                        f"got {resources!r}")
        return data
    for key, value in resources.items():
        if key not in RESOURCE_KEYS:
            problems.append(f"resources.{key}: unknown resource (known: "
                            f"{', '.join(RESOURCE_KEYS)})")
        elif key in data:
            problems.append(f"resources.{key}: also given as top-level {key}; give it once")
        else:
            data[key] = value
    return data


def _workdir(given: Any, folder: str | None, problems: list[str]) -> str | None:
    """The absolute workdir: `folder`, or a `workdir` from the file resolved against it.

    With `folder` None, a `workdir` from the file is kept as given (from_dict then insists
    that it is absolute), and None stays None.
    """
    if given is not None and (not isinstance(given, str) or not given):
        problems.append(f"workdir: must be a folder path, got {given!r}")
        given = None
    if folder is None:
        return given
    if given is None:
        return os.path.abspath(folder)
    return os.path.abspath(os.path.join(folder, given))


# -- importing entries -----------------------------------------------------------------------

def resolve_entry(entry: str, workdir: str | None) -> tuple[Callable, Space | None,
                                                            dict[str, Any]]:
    """Import the function `entry` names; return (function, space, constants).

    "path/to/file.py:function" loads the file (relative to `workdir`, or to the current
    folder when `workdir` is None) as a module with a name unique to its path, with the
    file's folder put on `sys.path` for its own imports. "package.module:function" imports
    the module with `workdir` put on `sys.path`. The space and constants are the function's
    `@tuned.args` ones, or (None, {}) for a plain function. Raises SpecError naming `entry`
    and what failed: a malformed entry, a file not found, an import that raised, a missing
    attribute, or one that is not callable.
    """
    match = ENTRY_RE.match(entry) if isinstance(entry, str) else None
    if match is None:
        raise SpecError([f'entry: must look like "path/to/file.py:function" or '
                         f'"package.module:function", got {entry!r}'])
    if match["path"] is not None:
        module, where = _load_file(match["path"], workdir)
    else:
        module, where = _import_module(match["module"], workdir), match["module"]
    fn = _function(module, where, match["function"])
    space = getattr(fn, "space", None)
    if not isinstance(space, Space):
        return fn, None, {}
    return fn, space, dict(getattr(fn, "constants", None) or {})


def _load_file(relpath: str, workdir: str | None) -> tuple[ModuleType, str]:
    """Execute the Python file `relpath` as a fresh module; (module, its absolute path)."""
    path = os.path.abspath(os.path.join(workdir or os.getcwd(), relpath))
    if not os.path.isfile(path):
        raise SpecError([f"entry: file not found: {path}"])
    _put_on_path(os.path.dirname(path))
    name = _module_name(path)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SpecError([f"entry: cannot load {path} as a Python module"])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before running it, as an import would (dataclasses need it)
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:
        sys.modules.pop(name, None)
        raise SpecError([f"entry: importing {path} raised {_describe(exc)}"]) from exc
    return module, path


def _import_module(dotted: str, workdir: str | None) -> ModuleType:
    """Import the module `dotted`, with `workdir` (if any) first on `sys.path`."""
    if workdir is not None:
        _put_on_path(workdir)
    importlib.invalidate_caches()
    try:
        return importlib.import_module(dotted)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (dotted == exc.name or dotted.startswith(exc.name + ".")):
            where = f" (looked in {workdir} and on sys.path)" if workdir else ""
            raise SpecError([f"entry: no module named {exc.name!r}{where}"]) from exc
        raise SpecError([f"entry: importing {dotted} raised {_describe(exc)}"]) from exc
    except (Exception, SystemExit) as exc:
        raise SpecError([f"entry: importing {dotted} raised {_describe(exc)}"]) from exc


def _function(module: ModuleType, where: str, name: str) -> Callable:
    """`module.name`, which must exist and be callable."""
    if not hasattr(module, name):
        defined = sorted(k for k, v in vars(module).items()
                         if callable(v) and not k.startswith("_")
                         and getattr(v, "__module__", None) == module.__name__)
        hint = f" (its functions: {', '.join(defined[:10])})" if defined else ""
        raise SpecError([f"entry: {where} has no attribute {name!r}{hint}"])
    fn = getattr(module, name)
    if not callable(fn):
        raise SpecError([f"entry: {where}:{name} is not callable (it is a "
                         f"{type(fn).__name__})"])
    return fn


def _put_on_path(folder: str) -> None:
    """Put `folder` first on `sys.path` unless it is there already."""
    folder = os.path.abspath(folder)
    if folder not in sys.path:
        sys.path.insert(0, folder)


def _module_name(path: str) -> str:
    """A module name unique to the file `path` (the same path gives the same name)."""
    stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
    digest = hashlib.sha1(path.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    return f"_tuned_entry_{digest}_{stem}"


def _describe(exc: BaseException) -> str:
    """'Type: message (at file:line)', the place being the innermost frame of the error."""
    text = f"{type(exc).__name__}: {exc}"
    frames = traceback.extract_tb(exc.__traceback__)
    user = [f for f in frames if "importlib" not in f.filename]
    if user and not isinstance(exc, SyntaxError):  # a SyntaxError names its own place
        text += f" (at {user[-1].filename}:{user[-1].lineno})"
    return text


# -- completing specs ------------------------------------------------------------------------

Resolver = Callable[[str, "str | None"], "tuple[Callable | None, Space | None, dict[str, Any]]"]


def complete_spec(spec: ExperimentSpec, resolve: Resolver | None = None
                  ) -> tuple[ExperimentSpec, Callable | None]:
    """The spec made ready to run, and its entry function (None for a command spec).

    For an entry spec: the function is imported (`resolve_entry`); the space is the spec's
    `[space]` table if it has one, else the function's `@tuned.args` space (a plain function
    needs a `[space]` table); the constants are the function's, overridden by the spec's.
    A command spec needs a `[space]` table. For Hyperband without `max_t`, `max_t` is taken
    from an integer `epochs` or `max_t` constant, as the in-process API does. Finally the
    searcher and the scheduler are built once to check their options. Constants keep the
    function's live values: ones JSON cannot hold must be made JSON-safe before `to_dict`
    is stored. `resolve` (default `resolve_entry`, which imports the entry in this process)
    gives (function or None, its space or None, its constants): the daemon passes one that
    asks the experiment's template process instead. Raises SpecError listing every problem.
    """
    fn: Callable | None = None
    constants = dict(spec.constants)
    space = spec.space
    problems: list[str] = []
    if spec.entry is not None:
        fn, fn_space, fn_constants = (resolve or resolve_entry)(spec.entry, spec.workdir)
        constants = {**fn_constants, **spec.constants}
        if not spec.space:
            if fn_space is None:
                problems.append("space: the entry function is not decorated with "
                                "@tuned.args; give a [space] table")
            else:
                space = fn_space
    elif spec.command is not None:
        if not spec.space:
            problems.append("space: a command spec needs a [space] table")
        problems += check_command(spec.command, set(spec.space) | set(constants))
    else:
        problems.append("entry: give entry or command")
    options = _scheduler_options(spec, constants, problems)
    done = dataclasses.replace(spec, space=space, constants=constants,
                               scheduler_options=options)
    if not problems:
        _check_builds(done, problems)
    if problems:
        raise SpecError(problems)
    return done, fn


def _scheduler_options(spec: ExperimentSpec, constants: dict[str, Any],
                       problems: list[str]) -> dict[str, Any]:
    """The scheduler options, with Hyperband's `max_t` inferred from the constants."""
    options = dict(spec.scheduler_options)
    if not needs_max_t(spec.scheduler):
        return options
    max_t = infer_max_t(options, constants)
    if max_t is None:
        problems.append(f"scheduler_options: {max_t_problem(spec.scheduler)}")
    else:
        options["max_t"] = max_t
    return options


def _check_builds(spec: ExperimentSpec, problems: list[str]) -> None:
    """Build the searcher and the scheduler once; a failure is a problem naming its table."""
    try:
        make_searcher(spec.searcher, spec.space, seed=spec.seed, **spec.searcher_options)
    except (ValueError, TypeError) as exc:
        problems.append(f"searcher_options: {exc}")
    try:
        make_scheduler(spec.scheduler, spec.scheduler_options, seed=spec.seed,
                       space=spec.space)
    except (ValueError, TypeError) as exc:
        problems.append(f"scheduler_options: {exc}")
