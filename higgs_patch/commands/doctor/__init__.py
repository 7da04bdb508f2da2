"""``higgs-patch doctor``: verify an install without changing it.

:func:`run` imports the stack, checks it, and dry-runs every patch in this process (apply, revert,
originals back by identity); it returns a :class:`Report` that :func:`render` turns into text and
:meth:`Report.as_json` into the ``--json`` document (its schema: :mod:`.report`). Nothing outside
this process is touched. One module per kind of check: :mod:`.stack`, :mod:`.origin` (where the
upstream comes from), :mod:`.hook` (the start-up hook), :mod:`.patches` (each patch, by the gate's
own verdict); :mod:`.render` makes the text.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

from ... import engine, environment, install_advice, upstream
from ...errors import PatchError
from . import hook, imports, lora, origin, stack
from .patches import check_patch
from .render import render
from .report import FAIL, OK, SCHEMA, WARN, Check, PatchReport, Report, one_line

__all__ = ["FAIL", "OK", "SCHEMA", "WARN", "Check", "PatchReport", "Report", "one_line", "render", "run"]


def run() -> Report:
    """Import the stack and every patch's module, check them, dry-run the patches; change nothing."""
    facts: dict[str, Any] = {}
    given = os.environ.get(environment.ACTIVATE)  # as started: the shims applied below publish their own
    unreadable = _unreadable_data()
    if unreadable:  # every other check reads this data: report the file, check nothing else
        return Report(facts, [stack.check_python(facts), stack.check_platform(facts), *unreadable], [])
    declarations = list(engine.known().values())
    started = time.perf_counter()
    names = ["torch", "transformers", *(m for d in declarations for m in d.modules)]
    probe = lora.start()  # a fresh interpreter trying LoRA, beside this one's imports
    imported = imports.import_all(names)
    order = imports.check_import_order(declarations, imported, names)
    tried_lora = lora.finish(probe)
    import_seconds = time.perf_counter() - started

    started = time.perf_counter()
    checks = [
        stack.check_python(facts),
        stack.check_platform(facts),
        stack.check_torch(facts, imported),
        stack.check_torchaudio(facts, imported),
        stack.check_required(facts, "transformers", imported),
        stack.check_required(facts, "accelerate", imported),
        peft := stack.check_optional(facts, "peft", "for LoRA"),
        *filter(None, [lora.check_lora(facts, peft, tried_lora)]),
        stack.check_wrapt(facts),
        origin.check_upstream(facts, imported),
        order.check,
        hook.check_startup_hook(facts, given),
    ]
    try:
        patches = [check_patch(d, imported) for d in declarations]
    finally:
        order.undo()
    checks.append(imports.check_tested_line(patches))
    _name_the_cause(checks, patches)
    return Report(facts, checks, patches, import_seconds, time.perf_counter() - started)


def _name_the_cause(checks: list[Check], patches: list[PatchReport]) -> None:
    """Where a package that cannot load (stack.UNLOADABLE) failed its own check, every other failure it causes
    points there instead of giving advice of its own (reinstalling boson_multimodal or peft fixes nothing then)."""
    culprit = next((c for c in checks if c.name == stack.UNLOADABLE and c.level == FAIL), None)
    if culprit is None:
        return
    note = f" (the cause: {stack.UNLOADABLE} cannot be loaded, see its check)"
    fix = f"fix {stack.UNLOADABLE} (its check above)"

    def blamed(check: Check) -> Check:
        if check is culprit or check.level != FAIL or not stack.caused_by(check.detail):
            return check
        return dataclasses.replace(check, detail=check.detail + note, fix=fix)

    checks[:] = [blamed(check) for check in checks]
    for patch in patches:
        patch.checks[:] = [blamed(check) for check in patch.checks]


def _unreadable_data() -> list[Check]:
    """A failed check for each of the plugin's data files that cannot be read (named, never a traceback)."""
    failed = []
    for name, load in (
        ("patches/*.toml", engine.known),
        ("compat/fingerprints.toml", upstream.knowledge),
        ("compat/matrix.toml", upstream.known_bad),
        (install_advice.SOURCE, install_advice.install_commands),
    ):
        try:
            load()
        except Exception as exc:  # reported as a failed check naming the file
            message = str(exc) if isinstance(exc, PatchError) else f"{name}: {one_line(exc)}"
            failed.append(Check("plugin data", FAIL, message, "fix or restore the file (reinstall higgs-patch)"))
    return failed
