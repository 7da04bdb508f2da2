"""Environment variables the plugin reads, one constant each, and the format of the one it writes.

``HIGGS_PATCH_ACTIVATE`` is written by the engine (``apply()``) and read by the start-up hook
(``startup``): its format lives here, below both.
"""

from __future__ import annotations

import json
import os
from typing import Any

#: "1" patches code the gate does not recognise, like ``apply(force=True)``; logged as a warning.
FORCE = "HIGGS_PATCH_FORCE"

#: Set by ``higgs-patch run`` and by ``apply()``; read at every interpreter start by ``higgs_patch.pth``.
#: JSON: ``{"patches": {id: {option: value}}, "force": bool}``. Children inherit it, so they patch too.
ACTIVATE = "HIGGS_PATCH_ACTIVATE"
_FORM = '{"patches": {"<patch id>": {"<option>": <value>}}, "force": false}'


def flag(name: str) -> bool:
    """True when the variable is set to a truthy value ("1", "true", "yes", "on")."""
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def encode(patches: dict[str, dict[str, Any]], force: bool) -> str:
    """The HIGGS_PATCH_ACTIVATE value that tells child processes these patches and options."""
    return json.dumps({"patches": patches, "force": force}, sort_keys=True)


def decode(value: str) -> tuple[dict[str, dict[str, Any]], bool]:
    """The patches and force flag in a HIGGS_PATCH_ACTIVATE value; ValueError saying what is wrong.

    Whatever the value: ``json`` raises RecursionError for deep nesting (and MemoryError, or a
    ValueError of its own for a number too long), and the message never shows more than a preview.
    """
    try:
        data = json.loads(value)
    except (ValueError, RecursionError, MemoryError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc) or type(exc).__name__
        raise ValueError(f"{value[:60]!r} is not JSON ({reason}); expected {_FORM}") from None
    if not isinstance(data, dict) or not isinstance(data.get("patches"), dict):
        raise ValueError(f"{value[:60]!r} is not of the form {_FORM}")
    unknown = sorted(set(data) - {"patches", "force"})
    if unknown:
        raise ValueError(f"unknown key(s) {unknown}; expected {_FORM}")
    patches = data["patches"]
    for patch_id, options in patches.items():
        if not isinstance(options, dict):
            raise ValueError(f"the options of patch {patch_id!r} must be a JSON object, got {_shown(options)}")
    force = data.get("force", False)
    if not isinstance(force, bool):
        raise ValueError(f'"force" must be JSON true or false, got {_shown(force)}')
    return dict(patches), force


def _shown(value: Any) -> str:
    """A short JSON preview of a decoded value; containers by kind (they may nest too deeply to print)."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    return json.dumps(value)[:60]
