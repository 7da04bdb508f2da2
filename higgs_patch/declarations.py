"""Patch declarations: one TOML file per fix in ``patches/``, read as data.

The engine knows no fix by name. Everything it needs to apply one (targets, the wrapper factory for
each, options, the stack it requires) comes from its declaration, so adding a fix is a new TOML file
plus a module under ``higgs_patch``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Mapping

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from .errors import DeclarationError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

#: Implementations must live in this package: a declaration can never make us import foreign code.
IMPLEMENTATION_PACKAGE = "higgs_patch"


@dataclass(frozen=True)
class Target:
    """One attribute a patch wraps, ``module:Qualified.name``, and the factory of its wrapper.

    A target that is a module (the collator's ``torch``) names the functions read through it that
    the wrapper applies to, in ``names``. Where several patches wrap one target, a higher ``order``
    runs outside a lower one (equal orders: the one applied first is innermost).
    """

    path: str
    wrapper: str
    names: tuple[str, ...] = ()
    order: int = 0

    @property
    def module(self) -> str:
        return self.path.partition(":")[0]

    @property
    def qualname(self) -> str:
        return self.path.partition(":")[2]


@dataclass(frozen=True)
class Declaration:
    id: str
    version: Version
    summary: str
    symptom: str
    default: bool
    targets: tuple[Target, ...]
    options: Mapping[str, Any] = field(default_factory=dict)
    requires: Mapping[str, SpecifierSet] = field(default_factory=dict)

    @property
    def modules(self) -> tuple[str, ...]:
        """The modules the targets live in; the patch is pending until all of them are imported."""
        return tuple(dict.fromkeys(target.module for target in self.targets))


def parse(data: Mapping[str, Any], source: str = "<declaration>") -> Declaration:
    """Validate one declaration's table; every problem names the file and the field."""

    def fail(message: str) -> DeclarationError:
        return DeclarationError(f"{source}: {message}")

    for key in ("id", "version", "summary", "symptom", "targets"):
        if key not in data:
            raise fail(f"missing required field {key!r}")
    try:
        version = Version(str(data["version"]))
    except InvalidVersion as exc:
        raise fail(f"version {data['version']!r} is not a PEP 440 version") from exc

    targets = tuple(_parse_target(entry, fail) for entry in data["targets"])
    if not targets:
        raise fail("declares no targets")

    requires = {}
    for distribution, spec in dict(data.get("requires", {})).items():
        try:
            requires[distribution] = SpecifierSet(spec)
        except InvalidSpecifier as exc:
            raise fail(f"requirement {distribution} {spec!r} is not a PEP 440 specifier") from exc

    return Declaration(
        id=str(data["id"]),
        version=version,
        summary=str(data["summary"]),
        symptom=str(data["symptom"]).strip(),
        default=bool(data.get("default", True)),
        targets=targets,
        options=dict(data.get("options", {})),
        requires=requires,
    )


def _parse_target(entry: Mapping[str, Any], fail) -> Target:
    path, wrapper = entry.get("path", ""), entry.get("wrapper", "")
    if path.count(":") != 1 or not all(path.split(":")):
        raise fail(f"target {path!r} is not of the form 'module:Qualified.name'")
    module, _, name = wrapper.partition(":")
    if not name or (module != IMPLEMENTATION_PACKAGE and not module.startswith(IMPLEMENTATION_PACKAGE + ".")):
        raise fail(
            f"wrapper {wrapper!r} of target {path!r} must be 'module:function' inside the "
            f"{IMPLEMENTATION_PACKAGE!r} package; implementations elsewhere are refused"
        )
    names = entry.get("names", [])
    if not isinstance(names, list) or not all(isinstance(name, str) and name.isidentifier() for name in names):
        raise fail(f"names of target {path!r} must be a list of identifiers")
    order = entry.get("order", 0)
    if not isinstance(order, int) or isinstance(order, bool):
        raise fail(f"order of target {path!r} must be an integer, got {order!r}")
    return Target(path=path, wrapper=wrapper, names=tuple(names), order=order)


def load(text: str, source: str = "<declaration>") -> Declaration:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise DeclarationError(f"{source}: not valid TOML: {exc}") from exc
    return parse(data, source)


def load_all() -> dict[str, Declaration]:
    """Every declaration shipped in ``patches/``, by id, in file-name order."""
    found: dict[str, Declaration] = {}
    folder = resources.files("higgs_patch.patches")
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".toml"):
            continue
        declaration = load(entry.read_text(encoding="utf-8"), f"patches/{entry.name}")
        if declaration.id in found:
            raise DeclarationError(f"patches/{entry.name}: id {declaration.id!r} is declared twice")
        found[declaration.id] = declaration
    return found
