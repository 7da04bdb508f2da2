"""What we know of upstream releases, read from the data in ``compat/``."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from packaging.specifiers import InvalidSpecifier, SpecifierSet

from . import schema
from .errors import DataError
from .fingerprint import PREFIX


@dataclass(frozen=True)
class Release:
    name: str
    origin: str
    fingerprints: dict[str, str]  # target path -> fingerprint


@dataclass(frozen=True)
class KnownBad:
    """A combination known not to work: the versions of ``distribution`` that do, why, and the fix."""

    distribution: str
    works: str
    reason: str
    fix: str
    when: dict[str, str]  # other distributions' ranges under which the rule holds


@dataclass(frozen=True)
class TestedStack:
    """One stack the suite runs on in CI (``.ci/run``); the first of compat/matrix.toml is the main line."""

    line: str  # a short name, such as "4.57": also the folder of its venv in CI
    constraints: str  # the file under compat/ that pins the stack
    suite: str  # what CI runs there: "full" (every test), "core" or "audio" (the tests so marked)
    versions: dict[str, str]  # what ran: distribution (or python, platform) -> version


@dataclass(frozen=True)
class Knowledge:
    fingerprinted: tuple[str, ...]  # top-level packages whose targets must match a known fingerprint
    releases: tuple[Release, ...]

    def must_match(self, target_path: str) -> bool:
        return self.package_of(target_path) is not None

    def package_of(self, target_path: str) -> str | None:
        """The entry of ``fingerprinted`` (a package, or a dotted module prefix) that holds the target, if any."""
        module = target_path.partition(":")[0]
        return next((p for p in self.fingerprinted if module == p or module.startswith(p + ".")), None)

    def known(self, target_path: str) -> dict[str, list[str]]:
        """Known fingerprints of one target, each with the releases that carry it."""
        found: dict[str, list[str]] = {}
        for release in self.releases:
            if target_path in release.fingerprints:
                found.setdefault(release.fingerprints[target_path], []).append(release.name)
        return found


FINGERPRINTS, MATRIX = "fingerprints.toml", "matrix.toml"
RELEASE_FIELDS = {"name": str, "origin": str, "targets": dict}
KNOWN_BAD_FIELDS = {"distribution": str, "works": str, "reason": str, "fix": str, "when": dict}
MATRIX_FIELDS = {"tested": list, "measured": list, "known-bad": list}  # measured: a session's run on a stack CI does not build
TESTED_REQUIRED = ("line", "constraints", "suite", "transformers")
SUITES = ("full", "core", "audio", "native")


def _read(name: str, fields: dict[str, type]) -> dict[str, Any]:
    source = f"compat/{name}"
    return dict(schema.check_fields(schema.read("higgs_patch.compat", name, source), source, fields))


def _tables(data: dict[str, Any], key: str, source: str, fields: dict[str, type], required: tuple[str, ...]):
    for index, table in enumerate(data.get(key, [])):
        yield schema.check_fields(table, f"{source}: {key}[{index}]", fields, required=required)


def _specifier(text: str, where: str) -> str:
    try:
        SpecifierSet(text)
    except InvalidSpecifier as exc:
        raise DataError(f"{where}: {text!r} is not a PEP 440 specifier") from exc
    return text


@functools.lru_cache(maxsize=1)
def tested() -> tuple[TestedStack, ...]:
    """The stacks compat/matrix.toml says the suite runs on, the main line first (CI, doctor and docs read it)."""
    source = f"compat/{MATRIX}"
    data = _read(MATRIX, MATRIX_FIELDS)
    stacks: list[TestedStack] = []
    for index, entry in enumerate(data.get("tested", [])):
        where = f"{source}: tested[{index}]"
        fields = dict(schema.check_mapping(entry, where, str))
        missing = [name for name in TESTED_REQUIRED if name not in fields]
        if missing:
            raise DataError(f"{where}: missing {', '.join(missing)} (every tested stack has {', '.join(TESTED_REQUIRED)})")
        if fields["suite"] not in SUITES:
            raise DataError(f"{where}.suite: {fields['suite']!r} is not one of {', '.join(map(repr, SUITES))}")
        if any(stack.line == fields["line"] for stack in stacks):
            raise DataError(f"{where}.line: {fields['line']!r} is listed twice")
        line, constraints, suite = (fields.pop(name) for name in ("line", "constraints", "suite"))
        stacks.append(TestedStack(line, constraints, suite, fields))
    if not stacks:
        raise DataError(f"{source}: no [[tested]] entries; CI would test no stack")
    return tuple(stacks)


@functools.lru_cache(maxsize=1)
def known_bad() -> tuple[KnownBad, ...]:
    """The combinations compat/matrix.toml knows not to work (the whole file is checked, [[tested]] too)."""
    source = f"compat/{MATRIX}"
    tested()
    data = _read(MATRIX, MATRIX_FIELDS)
    rules = []
    for index, entry in enumerate(_tables(data, "known-bad", source, KNOWN_BAD_FIELDS,
                                          ("distribution", "works", "reason", "fix"))):
        where = f"{source}: known-bad[{index}]"
        when = schema.check_mapping(entry.get("when", {}), f"{where}.when", str)
        rules.append(KnownBad(entry["distribution"], _specifier(entry["works"], f"{where}.works"), entry["reason"],
                              entry["fix"], {name: _specifier(spec, f"{where}.when.{name}") for name, spec in when.items()}))
    return tuple(rules)


@functools.lru_cache(maxsize=1)
def knowledge() -> Knowledge:
    """What compat/fingerprints.toml knows; a malformed file is a DataError, never an unknown upstream."""
    source = f"compat/{FINGERPRINTS}"
    data = _read(FINGERPRINTS, {"fingerprinted": list, "release": list})
    fingerprinted = data.get("fingerprinted", [])
    for index, package in enumerate(fingerprinted):
        schema.check_type(package, str, f"{source}: fingerprinted[{index}]")
    releases = []
    for index, entry in enumerate(_tables(data, "release", source, RELEASE_FIELDS, ("name", "targets"))):
        where = f"{source}: release[{index}] ({entry['name']}).targets"
        for path, found in schema.check_mapping(entry["targets"], where, str).items():
            if path.count(":") != 1 or not found.startswith(PREFIX):
                raise DataError(f"{where}.{path}: expected 'module:Qualified.name' = \"{PREFIX}...\", got {found!r}")
        releases.append(Release(name=entry["name"], origin=entry.get("origin", ""), fingerprints=dict(entry["targets"])))
    if not releases:
        raise DataError(f"{source}: no [[release]] entries; the gate would refuse every fingerprinted target")
    return Knowledge(fingerprinted=tuple(fingerprinted), releases=tuple(releases))
