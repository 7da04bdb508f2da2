"""The gate: before a patch touches anything, check that the stack and the code are ones we know.

Two checks, both pure reads: the installed distributions against the declaration's PEP 440
requirements, and the AST fingerprint of every fingerprinted target against ``compat/``. A missing
distribution is a conflict, not a pass. A refusal says the fix first (the pip command), then what
forcing would risk; force is offered only where it can help (nothing forces a package into being).
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import importlib.metadata
import importlib.util
import inspect
import sys
from dataclasses import dataclass, field
from types import ModuleType
from typing import Iterable, Mapping

import wrapt
from packaging.utils import canonicalize_name

from . import environment, fingerprint, upstream
from .install_advice import install_fix
from .declarations import Declaration, Target
from .errors import IncompatibleUpstreamError

FORCE_HOW = f"force=True to apply(), or {environment.FORCE}=1"
VERSION_RISK = (
    "it was written and tested for the versions it requires; on others it can train wrong without any error "
    "(a loss or gradient off by a factor)"
)
CODE_RISK = "it was written for the code of the known releases; on other code it can train wrong without any error"


@dataclass(frozen=True)
class Conflict:
    """A distribution that does not meet a declaration's requirement, in OpenTelemetry's words."""

    distribution: str
    requested: str
    found: str | None

    def __str__(self) -> str:
        found = f'"{self.distribution} {self.found}"' if self.found else "nothing (not installed)"
        return f'requested: "{self.distribution} {self.requested}" but found: {found}'


@dataclass(frozen=True)
class CodeCheck:
    """The fingerprint of one target as installed, and what compat/ knows of it."""

    target: str
    file: str
    qualname: str | None  # None: the whole module
    found: str
    known: dict[str, list[str]] = field(default_factory=dict)

    @property
    def matches(self) -> bool:
        return self.found in self.known

    @property
    def releases(self) -> list[str]:
        return self.known.get(self.found, [])

    @property
    def label(self) -> str:
        """What was fingerprinted: a function, or (for a module target) the module that reads the name."""
        module, _, name = self.target.partition(":")
        if self.qualname is not None:
            return name
        return f"the module {module} as a whole (the patch changes its view of {name}, not {name})"

    def __str__(self) -> str:
        if self.matches:
            return f"{self.target}: {self.found} (matches {', '.join(self.releases)})"
        known = ", ".join(f"{fp} ({', '.join(names)})" for fp, names in self.known.items()) or "none"
        what = self.target if self.qualname is not None else f"{self.target}, {self.label},"
        return f"{what} read from {self.file}: fingerprint {self.found} is unknown; known: {known}"


def conflicts(declaration: Declaration) -> list[Conflict]:
    found = []
    for distribution, spec in declaration.requires.items():
        version = _installed(distribution)
        if version is None or not spec.contains(version, prereleases=True):
            found.append(Conflict(distribution, str(spec), version))
    return found


def off_line(declaration: Declaration) -> str:
    """Why the patch is not needed on this stack ("" when it is): no table of its ``serves`` holds.

    A table holds when every distribution it names is installed in its range, or not installed at
    all (a checkout on PYTHONPATH has no version to be off a line by).
    """
    if not declaration.serves or any(all(_within(d, spec) for d, spec in line.items()) for line in declaration.serves):
        return ""
    lines = " or ".join(", ".join(f"{d}{spec}" for d, spec in line.items()) for line in declaration.serves)
    found = ", ".join(f"{d} {_installed(d)}" for d in dict.fromkeys(d for line in declaration.serves for d in line))
    return f"not needed here: it serves {lines}; found {found}"


@contextlib.contextmanager
def one_reading():
    """Inside, each installed distribution's version is read once (an ``apply()`` judges every patch
    against one reading of the stack; parsing a distribution's metadata costs a millisecond or more).
    The next call reads the stack afresh, so a ``pip install`` in between is seen."""
    token = _versions.set({})
    try:
        yield
    finally:
        _versions.reset(token)


def _installed(distribution: str) -> str | None:
    read = _versions.get()
    if read is not None and distribution in read:
        return read[distribution]
    try:
        version = importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        version = None
    if read is not None:
        read[distribution] = version
    return version


_versions: contextvars.ContextVar[dict[str, str | None] | None] = contextvars.ContextVar(
    "higgs_patch_installed_versions", default=None)


def _within(distribution: str, spec) -> bool:
    """A distribution not installed does not count against a line where its code is there without
    metadata (a checkout on PYTHONPATH); where its code is not there either, the line is not this one."""
    version = _installed(distribution)
    if version is None:
        return _findable(distribution.replace("-", "_"))
    return spec.contains(version, prereleases=True)


def definition(target: Target, holder: ModuleType | None = None) -> tuple[str, str | None]:
    """The source file and qualified name that define a target (None: the whole module holding it).

    ``holder``: the target's module, fully imported; without it the module is imported here. Our own
    wrappers and views are seen through (``__wrapped__``).
    """
    holder = holder if holder is not None else importlib.import_module(target.module)
    found = inspect.unwrap(wrapt.resolve_path(holder, target.qualname)[2])
    if isinstance(found, ModuleType) or not hasattr(found, "__qualname__"):
        return fingerprint.source_file(holder), None
    return fingerprint.source_file(sys.modules[found.__module__]), found.__qualname__


def static_definition(target: Target) -> tuple[str, str | None]:
    """What :func:`definition` finds, read from the source files without importing anything.

    A target that names functions (``names``) is a module its module imports: the whole module holding it.
    """
    if target.names:
        return fingerprint.source_file(target.module), None
    return fingerprint.defining(target.module, target.qualname)


def code_checks(declaration: Declaration, modules: Mapping[str, ModuleType | None] | None = None) -> list[CodeCheck]:
    """Fingerprint every target of the declaration that compat/ says must match.

    ``modules``: the target modules, each fully imported or None (not imported: read from its source
    file without importing it, and left to the import when it cannot be found that way); without it
    every target module is imported.
    """
    knowledge = upstream.knowledge()
    checks = []
    for target in declaration.targets:
        if knowledge.must_match(target.path) and not target.adds:  # an added name has no code of its own to check
            if modules is not None and modules.get(target.module) is None:
                try:
                    path, qualname = static_definition(target)
                    found = fingerprint.of_file(path, qualname)
                except (FileNotFoundError, LookupError):
                    # not found without importing it (a path added later, a method inherited from a
                    # base class defined elsewhere): the import decides
                    continue
            else:
                path, qualname = definition(target, modules[target.module] if modules is not None else None)
                found = fingerprint.of_file(path, qualname)
            checks.append(CodeCheck(target.path, path, qualname, found, knowledge.known(target.path)))
    return checks


@dataclass(frozen=True)
class Verdict:
    """The gate's decision on one patch and what it rests on; apply() and doctor both read it.

    ``problems`` are what stands in the way (version conflicts, unknown code, code that could not be
    fingerprinted: ``unreadable``); a patch with problems is refused, or, when forced, passes with
    ``warnings`` that say what forcing risks. A patch off the lines it serves is ``not_needed``
    (why, in words): neither applied nor refused, and nothing else is checked.
    """

    conflicts: tuple[Conflict, ...]
    code: tuple[CodeCheck, ...]
    unreadable: str | None
    problems: tuple[str, ...]
    refusal: IncompatibleUpstreamError | None
    warnings: tuple[str, ...]
    not_needed: str = ""

    @property
    def applies(self) -> bool:
        return self.refusal is None

    @property
    def forced(self) -> bool:
        return self.applies and bool(self.problems)

    def accept(self) -> list[str]:
        """The warnings a pass carries; the refusal, raised."""
        if self.refusal is not None:
            raise self.refusal
        return list(self.warnings)


def judge(declaration: Declaration, force: bool, modules: Mapping[str, ModuleType | None] | None = None,
          *, stack: bool = True, named: bool = True) -> Verdict:
    """Check the stack (unless ``stack`` is False: decided already) and the code of every fingerprinted target.

    ``modules`` as for :func:`code_checks`. Forcing (``force`` or HIGGS_PATCH_FORCE=1) passes what it can
    help with; a distribution that is not installed and whose code cannot be imported either cannot be forced.
    ``named``: the user asked for this patch by name. A patch taken only as a default (a bare ``apply()``)
    whose upstream is not installed at all is ``not_needed`` instead of refused: there is nothing of
    it to patch, and the upstreams that are installed are served (:func:`absent`).
    """
    upstream.knowledge()  # malformed compat/ data is a DataError of its own, never "unknown code" to force past
    reason = off_line(declaration)
    if reason:
        return Verdict((), (), None, (), None, (), reason)
    found = conflicts(declaration) if stack else []
    missing = [] if named else absent(declaration, found)
    if missing:
        return Verdict((), (), None, (), None, (), missing)
    unreadable = None
    try:
        checks = code_checks(declaration, modules)
    except (OSError, LookupError, SyntaxError, ValueError, AttributeError, ImportError) as exc:
        # no source file, a target gone, unparsable code: unknown code, refused like any other
        checks, unreadable = [], f"cannot fingerprint its targets: {type(exc).__name__}: {exc}"
    unknown = [str(check) for check in checks if not check.matches] + ([unreadable] if unreadable else [])
    problems = tuple(str(conflict) for conflict in found) + tuple(unknown)
    try:
        warnings = _stack_verdict(declaration, found, force) + _code_verdict(declaration, unknown, force)
    except IncompatibleUpstreamError as exc:
        return Verdict(tuple(found), tuple(checks), unreadable, problems, exc, ())
    return Verdict(tuple(found), tuple(checks), unreadable, problems, None, tuple(warnings))


def _stack_verdict(declaration: Declaration, found: list[Conflict], force: bool) -> list[str]:
    if not found:
        return []
    problems = [str(conflict) for conflict in found]
    fix = f"fix: {install_fix((c.distribution, c.requested) for c in found)}"
    absent = not_there(declaration, found)
    what = "the installed stack does not meet its requirements"
    if absent:
        missing = f"{', '.join(absent)} {'is' if len(absent) == 1 else 'are'} not installed: there is nothing to patch"
        advice = f"{fix}\nforcing ({FORCE_HOW}) cannot help: {missing}"
        raise IncompatibleUpstreamError(_message(declaration, "refused", what, problems, advice))
    return _verdict(declaration, what, problems, fix, VERSION_RISK, force)


def _code_verdict(declaration: Declaration, problems: list[str], force: bool) -> list[str]:
    fix = (
        "fix: if you edited that code, undo the edit (or reinstall it); if it is a new upstream release, "
        "`higgs-patch fingerprint` prints what compat/fingerprints.toml needs once the tests pass on it"
    )
    return _verdict(declaration, "its target code is not a known upstream release", problems, fix, CODE_RISK, force)


def still_applicable(declarations: Iterable[Declaration]) -> list[str]:
    """The ids among ``declarations`` that pass the gate now without forcing (code not yet imported is
    read from its source, or checked on import)."""
    return [
        d.id for d in declarations
        if not (verdict := judge(d, False, {name: sys.modules.get(name) for name in d.modules})).problems
        and verdict.applies and not verdict.not_needed
    ]


def absent(declaration: Declaration, found: list[Conflict]) -> str:
    """Why a default patch is not needed here ("" when it may be): an upstream it requires is not installed,
    or the package its targets live in cannot be found at all."""
    missing = not_there(declaration, found)
    named = {canonicalize_name(m) for m in missing}
    missing += [f"{package} (the package of its targets)" for package in dict.fromkeys(
        t.module.split(".")[0] for t in declaration.targets) if canonicalize_name(package) not in named
        and not _findable(package)]
    return f"{', '.join(missing)} not installed" if missing else ""


def _findable(package: str) -> bool:
    """Whether a top-level package can be imported here (read once per :func:`one_reading`)."""
    read, key = _versions.get(), f"find_spec:{package}"
    if read is not None and key in read:
        return read[key] is not None
    found = importlib.util.find_spec(package) is not None
    if read is not None:
        read[key] = "found" if found else None
    return found


def not_there(declaration: Declaration, found: list[Conflict]) -> list[str]:
    """The distributions in conflict that nothing can force: not installed, and no code of theirs that the
    declaration targets can be imported without metadata (as a checkout on PYTHONPATH can)."""
    tops = {canonicalize_name(t.module.split(".")[0]): t.module.split(".")[0] for t in declaration.targets}
    return [
        c.distribution for c in found
        if c.found is None and not (
            canonicalize_name(c.distribution) in tops and importlib.util.find_spec(tops[canonicalize_name(c.distribution)])
        )
    ]


def _verdict(declaration: Declaration, what: str, problems: list[str], fix: str, risk: str, force: bool) -> list[str]:
    if not problems:
        return []
    if force or environment.flag(environment.FORCE):
        return [_message(declaration, "forced anyway", what, problems, f"{fix}\nforcing is not a fix: {risk}")]
    hint = f"to patch it anyway ({FORCE_HOW}), know the risk: {risk}"
    raise IncompatibleUpstreamError(_message(declaration, "refused", what, problems, f"{fix}\n{hint}"))


def _message(declaration: Declaration, verdict: str, what: str, problems: list[str], advice: str) -> str:
    return f"patch {declaration.id!r} {verdict}: {what}:\n  " + "\n  ".join(problems) + f"\n{advice}"
