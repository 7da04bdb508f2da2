"""Environment variables the plugin reads, one constant each."""

from __future__ import annotations

import os

#: "1" patches code the gate does not recognise, like ``apply(force=True)``; logged as a warning.
FORCE = "HIGGS_PATCH_FORCE"

#: Set by ``higgs-patch run`` and by ``apply()``; read at every interpreter start by ``higgs_patch.pth``.
#: JSON: ``{"patches": {id: {option: value}}, "force": bool}``. Children inherit it, so they patch too.
ACTIVATE = "HIGGS_PATCH_ACTIVATE"


def flag(name: str) -> bool:
    """True when the variable is set to a truthy value ("1", "true", "yes", "on")."""
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}
