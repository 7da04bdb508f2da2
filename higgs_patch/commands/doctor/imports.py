"""The order of import, and whether this transformers is one the plugin was tested on.

From transformers 4.48 boson_multimodal fails in its own import unless some shims are in place first
(``before_import`` in their declarations). Doctor imports the stack as a user must there: unpatched
first, to show what a user meets; then with those shims applied, so that every other check sees the
stack the plugin makes; it reverts them when the checks are done.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Iterable

from packaging.version import Version

from ... import engine, gate
from ...declarations import Declaration
from .report import FAIL, OK, WARN, Check, PatchReport, installed_version, one_line
from .stack import newest_tested

ORDER_ADVICE = (
    "call higgs_patch.apply() before anything imports boson_multimodal (or start the program with "
    "`higgs-patch run -- python train.py`; child processes then apply it at start-up)"
)


def import_all(names: Iterable[str], into: dict[str, ModuleType | BaseException] | None = None):
    """Each module, or the exception importing it raised (reported by the checks, never dropped)."""
    found: dict[str, ModuleType | BaseException] = {} if into is None else into
    for name in dict.fromkeys(names):
        try:
            found[name] = importlib.import_module(name)
        except Exception as exc:
            found[name] = exc
    return found


@dataclass
class ImportOrder:
    check: Check
    applied: tuple[str, ...] = ()  # what doctor applied to import the stack, reverted by undo()

    def undo(self) -> None:
        if self.applied:
            engine.revert(*self.applied)


def check_import_order(declarations: list[Declaration], imported: dict[str, Any], names: list[str]) -> ImportOrder:
    """Import again, with the shims that must come first, what failed without them; say what a user must do."""
    first = [d for d in declarations if d.before_import and not gate.off_line(d)]
    transformers = installed_version("transformers")
    if not first:
        return ImportOrder(Check("import order", OK, f"transformers {transformers}: no patch must precede an import here"))
    ids = [d.id for d in first]
    modules = sorted({m for d in first for m in d.before_import})
    failed = {name: imported[name] for name in modules if isinstance(imported.get(name), BaseException)}
    before = {s.id for s in engine.status() if s.state in ("applied", "pending")}
    try:
        engine.apply(*ids)
    except Exception as exc:  # the shims themselves refused: named, the import stays failed
        return ImportOrder(Check("import order", FAIL, f"the patches boson_multimodal needs before its import here "
                                 f"({', '.join(ids)}) do not apply: {one_line(exc)}", "see their sections below"))
    applied = tuple(i for i in ids if i not in before)
    if failed:
        for name in list(imported):  # what failed for want of them, imported again as a user would after apply()
            if isinstance(imported[name], BaseException):
                del imported[name]
        import_all(names, into=imported)
    still = [name for name in modules if isinstance(imported.get(name), BaseException)]
    if still:
        detail = f"{still[0]} cannot be imported even with {', '.join(ids)} applied first: {one_line(imported[still[0]])}"
        return ImportOrder(Check("import order", FAIL, detail), applied)
    needs = f"on transformers {transformers}, {' and '.join(modules)} imports only with {', '.join(ids)} in place first"
    if failed:
        name, error = next(iter(failed.items()))
        detail = f"{needs} (without them: {one_line(error, 160)})"
    else:
        detail = f"{needs}; they were, in this process" if not applied else f"{needs}"
    return ImportOrder(Check("import order", OK, detail, ORDER_ADVICE), applied)


def check_tested_line(patches: list[PatchReport]) -> Check:
    """transformers against the tested stacks: newer than the newest, every patch that applies is unverified."""
    found, newest = installed_version("transformers"), newest_tested("transformers")
    if found is None or newest is None:
        return Check("tested line", OK, "nothing to compare: transformers or compat/matrix.toml's tested stacks missing")
    if Version(found) <= newest:
        return Check("tested line", OK, f"transformers {found} is within the tested lines (newest tested: {newest})")
    unverified = [p.declaration.id for p in patches if p.needed and p.compatible]
    return Check(
        "tested line", WARN,
        f"transformers {found} is newer than the newest tested ({newest}): unverified there: "
        f"{', '.join(unverified) or 'no patch applies'} (they apply, and were never tested on {found})",
        f"pip install 'transformers=={newest}' for a tested stack, or run the test suite on {found} and report it",
    )
