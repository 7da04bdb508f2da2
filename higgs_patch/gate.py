"""The gate: before a patch touches anything, check that the stack and the code are ones we know.

Two checks, both pure reads: the installed distributions against the declaration's PEP 440
requirements, and the AST fingerprint of every fingerprinted target against ``compat/``. A missing
distribution is a conflict, not a pass. Unknown code is refused unless forced.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import sys
from dataclasses import dataclass, field
from types import ModuleType
from typing import Mapping

import wrapt

from . import environment, fingerprint, upstream
from .declarations import Declaration, Target
from .errors import IncompatibleUpstreamError

OVERRIDE_HINT = f"pass force=True to apply(), or set {environment.FORCE}=1, to patch it anyway"


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

    def __str__(self) -> str:
        if self.matches:
            return f"{self.target}: {self.found} (matches {', '.join(self.releases)})"
        known = ", ".join(f"{fp} ({', '.join(names)})" for fp, names in self.known.items()) or "none"
        return f"{self.target} read from {self.file}: fingerprint {self.found} is unknown; known: {known}"


def conflicts(declaration: Declaration) -> list[Conflict]:
    found = []
    for distribution, spec in declaration.requires.items():
        try:
            version = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            found.append(Conflict(distribution, str(spec), None))
            continue
        if not spec.contains(version, prereleases=True):
            found.append(Conflict(distribution, str(spec), version))
    return found


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
        if knowledge.must_match(target.path):
            if modules is not None and modules.get(target.module) is None:
                try:
                    path, qualname = static_definition(target)
                except (FileNotFoundError, LookupError):
                    continue  # not found without importing it (a path added later, a dynamic definition): the import decides
            else:
                path, qualname = definition(target, modules[target.module] if modules is not None else None)
            found = fingerprint.of_file(path, qualname)
            checks.append(CodeCheck(target.path, path, qualname, found, knowledge.known(target.path)))
    return checks


def require_stack(declaration: Declaration, force: bool) -> list[str]:
    """Raise unless the stack meets the declaration; return the warnings a forced pass carries."""
    problems = [str(conflict) for conflict in conflicts(declaration)]
    return _verdict(declaration, "the installed stack does not meet its requirements", problems, force)


def require_known_code(
    declaration: Declaration, force: bool, modules: Mapping[str, ModuleType | None] | None = None
) -> list[str]:
    """Raise unless every fingerprinted target is known code; return the warnings a forced pass carries."""
    upstream.knowledge()  # malformed compat/ data is a DataError of its own, never "unknown code" to force past
    try:
        problems = [str(check) for check in code_checks(declaration, modules) if not check.matches]
    except (OSError, LookupError, SyntaxError, ValueError, AttributeError, ImportError) as exc:
        # no source file, a target gone, unparsable code: unknown code, refused like any other
        problems = [f"cannot fingerprint its targets: {type(exc).__name__}: {exc}"]
    return _verdict(declaration, "its target code is not a known upstream release", problems, force)


def _verdict(declaration: Declaration, what: str, problems: list[str], force: bool) -> list[str]:
    if not problems:
        return []
    message = f"patch {declaration.id!r} refused: {what}:\n  " + "\n  ".join(problems)
    if force or environment.flag(environment.FORCE):
        return [message.replace("refused", "forced", 1)]
    raise IncompatibleUpstreamError(f"{message}\n{OVERRIDE_HINT}.")
