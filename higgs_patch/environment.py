"""Environment variables the plugin reads, one constant each."""

from __future__ import annotations

import os

#: "1" patches code the gate does not recognise, like ``apply(force=True)``; logged as a warning.
FORCE = "HIGGS_PATCH_FORCE"


def flag(name: str) -> bool:
    """True when the variable is set to a truthy value ("1", "true", "yes", "on")."""
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}
