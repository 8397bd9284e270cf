"""The fields of a command spec's argument list: ``{name}`` is the argument `name` (a
parameter of the space or a constant), ``{python}`` the interpreter tuned runs in, ``{{`` and
``}}`` braces. Checked when a spec is completed, filled in when a trial starts.
"""

from __future__ import annotations

import re
from typing import Any

_FIELD = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")


def placeholders(command: list[str]) -> list[str]:
    """The names the command's ``{name}`` fields use, in order, each once."""
    names: list[str] = []
    for arg in command:
        for match in _FIELD.finditer(arg):
            name = match.group(1)
            if name is not None and name not in names:
                names.append(name)
    return names


def render(command: list[str], args: dict[str, Any]) -> list[str]:
    """The argument list with each ``{name}`` replaced by ``args[name]`` (bools as
    true/false, other values as `str` gives them). KeyError naming a missing argument."""

    def field(match: re.Match[str]) -> str:
        whole, name = match.group(0), match.group(1)
        if name is None:
            return whole[0]
        value = args[name]
        if isinstance(value, bool):
            return "true" if value else "false"
        return str(value)

    return [_FIELD.sub(field, arg) for arg in command]


def check_command(command: list[str], known: set[str]) -> list[str]:
    """Problems with the command's fields: each name must be one of `known` (the space's
    parameters and the constants)."""
    problems = []
    for name in placeholders(command):
        if name not in known and name != "python":
            problems.append(f"command: {{{name}}} names no parameter of [space] and no "
                            f"constant (known: {', '.join(sorted(known)) or 'none'})")
    return problems
