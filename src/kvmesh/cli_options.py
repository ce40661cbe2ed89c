"""How ``kvmesh`` command-line options map onto the typed config: the config owns every default.

An option bound to a config field (:func:`config_option`) takes its help from the field's description and
shows the field's default in ``--help``, but its own default is None: a command passes only the flags that
were given (:func:`parse`), so pydantic fills in the rest and a default changed in ``config.py`` reaches
every command.  ``tests/test_cli_defaults.py`` walks every command and checks each option against its field.
Errors leave as one line, ``kvmesh: error: --flag: message``, with exit status 2.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NoReturn

import typer
from pydantic import BaseModel, ValidationError

from kvmesh.config import first_error


def fail(msg: str, code: int = 2) -> NoReturn:
    typer.echo(f"kvmesh: error: {msg}", err=True)
    raise typer.Exit(code)


def config_option(model: type[BaseModel], field: str, *names: str, help: str | None = None) -> Any:
    """A typer option for ``model.field`` (its default must stay None; see the module docstring)."""
    f = model.model_fields[field]
    default = None if f.is_required() else f.get_default(call_default_factory=True)
    shown: bool | str = False if default in (None, (), {}) else str(default)
    return typer.Option(*names, help=help or f.description, show_default=shown)


def given(**fields: Any) -> dict[str, Any]:
    """The fields whose flags were given (not None)."""
    return {k: v for k, v in fields.items() if v is not None}


def parse(schema: Callable[..., Any], flag_names: Mapping[str, str] | None = None, **fields: Any) -> Any:
    """``schema(**given(fields))``; a validation error exits 2 naming the flag: ``flag_names`` maps a
    field path (``section.field``) to the command's flag; any other path is named as the config key
    (``[section] field``), never as a flag the command lacks."""
    try:
        return schema(**given(**fields))
    except ValidationError as e:
        loc, msg = first_error(e)
        fail(f"{option_name(loc, flag_names or {})}: {msg}" if loc else msg)  # no loc: a whole-model check


def option_name(loc: list[str], flag_names: Mapping[str, str]) -> str:
    """How an error names the setting at ``loc``: the command's flag, else the config key."""
    path = [p for p in loc if not p.isdigit()]  # list positions (backends.0.url) name no setting
    for n in range(len(path), 0, -1):
        if ".".join(path[:n]) in flag_names:
            return flag_names[".".join(path[:n])]
    if path and path[0] == "backends":
        return "--backend"
    if len(path) == 1:
        return f"--{path[0].replace('_', '-')}"
    return f"[{'.'.join(path[:-1])}] {path[-1]}"
