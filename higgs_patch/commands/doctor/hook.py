"""The start-up hook: whether child processes (spawned workers, launcher ranks, ``higgs-patch run``) can be patched."""

from __future__ import annotations

from typing import Any

from ... import environment, startup
from .report import FAIL, OK, WARN, Check


def check_startup_hook(facts: dict[str, Any], value: str | None) -> Check:
    """Whether child processes (spawned workers, launcher ranks, ``higgs-patch run``) can be patched; ``value``:
    HIGGS_PATCH_ACTIVATE as doctor started (the shims a line needs, applied for the import checks, publish
    their own)."""
    hook = startup.find_hook()
    facts["startup_hook"] = {"path": hook.path, "active": hook.active}
    if value:
        try:
            environment.decode(value)
        except ValueError as exc:
            detail = f"{environment.ACTIVATE} is malformed: {exc}"
            return Check("start-up hook", FAIL, detail, f"unset {environment.ACTIVATE}")
    if hook.active:
        return Check("start-up hook", OK, hook.detail)
    return Check(
        "start-up hook", WARN, f"{hook.detail}; apply() still patches this process, and forked workers inherit it",
        "reinstall the plugin (pip install . or pip install -e .), "
        "or call higgs_patch.apply() in every script a launcher starts",
    )
