"""One section per patch: the gate's verdict as apply() would reach it, the state here, and a dry run.

Whether a patch would apply is the gate's own verdict (:func:`higgs_patch.gate.judge`), never
rebuilt here, so a new gate rule shows up in doctor without a second edit. Doctor adds only what it
sees around it: a target module that fails to import, a target missing from the installed code.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

import wrapt

from ... import engine, environment, gate, install_advice
from ...declarations import Declaration, Target
from ...errors import PatchError
from ...slots import object_at
from .report import FAIL, OK, WARN, Check, PatchReport, installed_version, one_line


def check_patch(declaration: Declaration, imported: dict[str, Any]) -> PatchReport:
    states = {s.id: s for s in engine.status()}
    status = states[declaration.id]
    off = gate.off_line(declaration)
    if off:  # neither applied nor refused here: nothing else to check
        checks = [Check("serves", OK, off), Check("would apply", OK, "no need: not needed here"),
                  Check("this process", OK, status.state), Check("dry run", OK, "skipped: not needed here")]
        return PatchReport(declaration, status.state, True, "", [], [], "skipped", checks, needed=False)
    absent = gate.absent(declaration, gate.conflicts(declaration))
    if absent:  # its upstream is not installed: a bare apply() passes over it, as gate.judge decides
        checks = [Check("requires", OK, f"{absent}: a bare apply() passes over it (not-needed); named, it is refused"),
                  Check("would apply", OK, "no need: its upstream is not installed"),
                  Check("this process", OK, status.state), Check("dry run", OK, "skipped: its upstream is not installed")]
        return PatchReport(declaration, status.state, True, "", [], [], "skipped", checks, needed=False)
    severity = FAIL if declaration.default else WARN  # a default patch that cannot apply makes apply() fail
    broken = _broken(declaration, imported)  # what forcing cannot get past
    verdict = None if broken else gate.judge(declaration, False, {name: imported[name] for name in declaration.modules})

    checks = [_requirements(declaration, severity)] + _serves(declaration)
    checks += [Check(name, severity, text) for name, text in broken]
    if verdict is not None:
        checks += [_code_check(c, severity) for c in verdict.code]
        checks += [Check("fingerprint", severity, verdict.unreadable)] if verdict.unreadable else []
        fingerprinted = {c.target for c in verdict.code}
        checks += [_unfingerprinted(t) for t in declaration.targets if t.path not in fingerprinted]

    problems = [*(verdict.problems if verdict else [str(c) for c in gate.conflicts(declaration)]), *(t for _, t in broken)]
    compatible = verdict is not None and verdict.applies and not verdict.forced
    forced = verdict is not None and verdict.forced
    if compatible:
        checks.append(Check("would apply", OK, "yes"))
    elif forced:
        checks.append(Check(
            "would apply", WARN,
            f"yes, forced by {environment.FORCE}=1 over: {'; '.join(problems)}; "
            "forcing is not a fix: it can train wrong without any error",
        ))
    else:
        checks.append(Check("would apply", severity, "no: see the failed check(s) above"))
    in_use = WARN if status.state == "bypassed" else OK  # applied, but the target was replaced since
    checks.append(Check("this process", in_use, status.state + (f" ({status.reason})" if status.reason else "")))

    dry_run, check = _dry_run(declaration, status.state, compatible or forced, states)
    checks.append(check)
    conflicts = [str(c) for c in gate.conflicts(declaration)]
    return PatchReport(declaration, status.state, compatible, "; ".join(problems), conflicts,
                       list(verdict.code) if verdict else [], dry_run, checks)


def _broken(declaration: Declaration, imported: dict[str, Any]) -> list[tuple[str, str]]:
    """Target modules that fail to import, then targets missing from the installed code: (check, detail)."""
    failed = [(name, imported.get(name)) for name in declaration.modules if isinstance(imported.get(name), BaseException)]
    if failed:
        return [("import", f"{name} cannot be imported: {one_line(error)}") for name, error in failed]
    return [("target", f"{t.path} does not exist in the installed code")
            for t in declaration.targets if not t.adds and not _exists(imported[t.module], t)]


def _serves(declaration: Declaration) -> list[Check]:
    if not declaration.serves:
        return []
    lines = " or ".join(", ".join(f"{n}{spec}" for n, spec in line.items()) for line in declaration.serves)
    found = ", ".join(f"{n} {installed_version(n)}" for n in dict.fromkeys(n for line in declaration.serves for n in line))
    return [Check("serves", OK, f"needed here: it serves {lines}; found {found}")]


def _requirements(declaration: Declaration, severity: str) -> Check:
    found = gate.conflicts(declaration)
    if found:
        fix = install_advice.install_fix((c.distribution, c.requested) for c in found)
        return Check("requires", severity, "; ".join(str(c) for c in found), fix)
    met = ", ".join(f"{n}{s} (found {installed_version(n)})" for n, s in declaration.requires.items())
    return Check("requires", OK, met or "no requirements")


def _code_check(check: gate.CodeCheck, severity: str) -> Check:
    if check.matches:
        return Check("fingerprint", OK, f"{check.label} {check.found} matches {', '.join(check.releases)}")
    return Check(
        "fingerprint", severity,
        f"{check.label} {check.found} matches no known release: {check.file} was changed",
        "if you edited it, undo the edit; if it is a new upstream release, run `higgs-patch fingerprint`, test, "
        f"and add it to compat/fingerprints.toml; {environment.FORCE}=1 patches it anyway, at your own risk",
    )


def _exists(module: ModuleType, target: Target) -> bool:
    try:
        wrapt.resolve_path(module, target.qualname)
    except AttributeError:
        return False
    return True


def _unfingerprinted(target: Target) -> Check:
    top = target.module.split(".")[0]
    return Check("fingerprint", OK, f"{target.qualname} not fingerprinted: {top} is gated by its version requirement")


def _dry_run(declaration: Declaration, state: str, would_apply: bool, states: dict[str, Any]) -> tuple[str, Check]:
    """Apply and revert in this process; the originals must be back, by identity."""
    if state in engine.ACTIVE:
        return "skipped", Check("dry run", OK, f"skipped: {state} in this process, left as it is")
    if not would_apply:
        return "skipped", Check("dry run", WARN, "skipped: it would not apply")
    # A target another applied patch already wraps keeps its wrapper while this one is on: layers stack.
    shared = {path for s in states.values() if s.state in engine.ACTIVE for path in s.targets}
    before = {t.path: _resolve(t) for t in declaration.targets}
    problems = []
    try:
        engine.apply(declaration.id)
    except PatchError as exc:
        return "failed", Check("dry run", FAIL, f"apply() failed: {one_line(exc)}")
    try:
        now = next(s for s in engine.status() if s.id == declaration.id)
        if now.state == "not-needed":  # a name it adds was there already: left alone
            return "skipped", Check("dry run", WARN, f"not applied: {now.reason}")
        if now.state != "applied":
            problems.append(f"state after apply() is {now.state!r}")
        problems += [
            f"{t.path} was not {'added' if t.adds else 'wrapped'}" for t in declaration.targets
            if t.path not in shared and _resolve(t) is before[t.path]
        ]
    finally:
        engine.revert(declaration.id)
    problems += [
        f"{t.path} is not the original after revert()" for t in declaration.targets if _resolve(t) is not before[t.path]
    ]
    if problems:
        return "failed", Check("dry run", FAIL, "; ".join(problems))
    count = len(declaration.targets)
    return "ok", Check("dry run", OK, f"applied and reverted; {count} original{'s' * (count > 1)} back (identity)")


def _resolve(target: Target) -> object:
    return object_at(sys.modules[target.module], target.qualname, target.adds)
