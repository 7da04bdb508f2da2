"""Strict reading of the plugin's TOML data (patches/, compat/): every field known, every type right.

A typo must not silently change what a patch does (``defualt = false`` ignored leaves a patch on by
default), so an unknown field is an error, as is a wrong type (``default = "false"``). Every message
names the file and the field, and says what is allowed.
"""

from __future__ import annotations

import difflib
import sys
from importlib import resources
from typing import Any, Mapping

from .errors import DataError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

#: What a field may hold, in the words a message uses.
KINDS: dict[type, str] = {
    str: "a string",
    bool: "true or false",
    int: "an integer",
    float: "a number",
    list: "an array",
    dict: "a table",
}


def loads(text: str, source: str, error: type[DataError] = DataError) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{source}: not valid TOML: {exc}") from exc


def read(package: str, name: str, source: str) -> dict[str, Any]:
    """One TOML file shipped in ``package``, strictly parsed."""
    return loads(resources.files(package).joinpath(name).read_text(encoding="utf-8"), source)


def check_fields(
    table: Any,
    where: str,
    fields: Mapping[str, type | tuple[type, ...]],
    *,
    required: tuple[str, ...] = (),
    elsewhere: Mapping[str, str] | None = None,
    error: type[DataError] = DataError,
) -> Mapping[str, Any]:
    """Raise unless ``table`` is a table holding only ``fields``, each of its type; return it.

    ``where`` names the file and the table (``patches/x.toml: targets[0]``). ``elsewhere`` maps a
    field that belongs in another table to where it belongs, for the message about a misplaced one.
    """
    if not isinstance(table, dict):
        raise error(f"{where} must be {KINDS[dict]}, not {describe(table)}")
    for name, value in table.items():
        if name not in fields:
            if elsewhere and name in elsewhere:
                raise error(f"{where}: field {name!r} is misplaced here; it belongs {elsewhere[name]}")
            hint = difflib.get_close_matches(name, list(fields), n=1)
            guess = f"; did you mean {hint[0]!r}?" if hint else ""
            raise error(f"{where}: unknown field {name!r} (known fields: {', '.join(fields)}){guess}")
        check_type(value, fields[name], f"{where}: field {name!r}", error)
    missing = [name for name in required if name not in table]
    if missing:
        raise error(f"{where}: missing required field(s) {', '.join(map(repr, missing))}")
    return table


def check_mapping(
    table: Any, where: str, kinds: type | tuple[type, ...], error: type[DataError] = DataError
) -> Mapping[str, Any]:
    """Raise unless ``table`` is a table whose values (under any names) are all of ``kinds``; return it."""
    if not isinstance(table, dict):
        raise error(f"{where} must be {KINDS[dict]}, not {describe(table)}")
    for name, value in table.items():
        check_type(value, kinds, f"{where}.{name}", error)
    return table


def check_type(value: Any, kinds: type | tuple[type, ...], what: str, error: type[DataError] = DataError) -> None:
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if isinstance(value, bool) and bool not in kinds:  # TOML true is no number
        ok = False
    else:
        ok = isinstance(value, kinds)
    if not ok:
        raise error(f"{what} must be {' or '.join(KINDS[k] for k in kinds)}, not {describe(value)}")


def describe(value: Any) -> str:
    name = {str: "the string", bool: "the boolean", dict: "a table", list: "the array"}.get(type(value), "the value")
    return f"{name} {value!r}" if not isinstance(value, dict) else "a table"
