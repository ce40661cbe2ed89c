"""pydantic validation errors in kvmesh's words, one line for a person (``kvmesh.config``, the CLI)."""

from __future__ import annotations

from pydantic import ValidationError
from pydantic_core import ErrorDetails


def first_error(e: ValidationError) -> tuple[list[str], str]:
    """The first error as (field path, message), worded for a person: an engine kind's tag is dropped from
    the path and a field of the other kind says so."""
    first = e.errors()[0]
    loc, msg = [str(p) for p in first["loc"]], _plain(first)
    kinds = ("vllm", "sim")
    for i, part in enumerate(loc[:-1]):
        if part in kinds and (i == 0 or loc[i - 1] == "engine"):
            if first["type"] == "extra_forbidden":
                msg = f"not a field of kind = {part!r} engines"
            loc = loc[:i] + loc[i + 1:]
            break
    return loc, msg


_WORDING = {"extra_forbidden": "unknown setting", "int_parsing": "must be a whole number",
            "int_from_float": "must be a whole number", "float_parsing": "must be a number",
            "bool_parsing": "must be true or false", "missing": "required"}
_BOUNDS = {"greater_than_equal": ("ge", "at least"), "greater_than": ("gt", "greater than"),
           "less_than_equal": ("le", "at most"), "less_than": ("lt", "less than")}


def _plain(err: ErrorDetails) -> str:
    """pydantic's message in kvmesh's words (no "Value error," or "Input should be")."""
    kind, ctx = str(err["type"]), err.get("ctx") or {}
    if kind in _WORDING:
        return _WORDING[kind]
    if kind in _BOUNDS:
        key, words = _BOUNDS[kind]
        return f"must be {words} {ctx.get(key)}"
    msg = str(err["msg"]).removeprefix("Value error, ")
    return msg.replace("Input should be", "must be").replace("input should be", "must be")
