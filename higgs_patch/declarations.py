"""Patch declarations: one TOML file per fix in ``patches/``, read as data.

The engine knows no fix by name. Everything it needs to apply one (targets, the wrapper factory for
each, options, the stack it requires) comes from its declaration, so adding a fix is a new TOML file
plus a module under ``higgs_patch``.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Mapping

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from . import schema
from .errors import DeclarationError, OptionError

#: Implementations must live in this package: a declaration can never make us import foreign code.
IMPLEMENTATION_PACKAGE = "higgs_patch"
SHIMS_PACKAGE = "higgs_patch.shims."


@dataclass(frozen=True)
class Target:
    """One attribute a patch wraps, ``module:Qualified.name``, and the factory of its wrapper.

    A target that is a module (the collator's ``torch``) names the functions read through it that
    the wrapper applies to, in ``names``. Where several patches wrap one target, a higher ``order``
    runs outside a lower one (equal orders: the one applied first is innermost).

    A target that ``adds`` is a name its module or class lacks (declared with ``provides``): the
    factory, ``factory(holder, options)``, makes the object put there; revert removes it again.
    """

    path: str
    wrapper: str
    names: tuple[str, ...] = ()
    order: int = 0
    adds: bool = False

    @property
    def module(self) -> str:
        return self.path.partition(":")[0]

    @property
    def qualname(self) -> str:
        return self.path.partition(":")[2]


#: The value types an option may declare, by the name a declaration uses.
OPTION_TYPES: dict[str, type | tuple[type, ...]] = {"string": str, "boolean": bool, "integer": int, "number": (int, float)}


@dataclass(frozen=True)
class Option:
    """One option of a patch, with what it allows; apply() checks every value against it."""

    name: str
    default: Any
    type: str
    choices: tuple[Any, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    allow_false: bool = False  # ``false`` switches the option off, whatever its type
    description: str = ""

    def allowed(self) -> str:
        if self.choices:
            text = "one of " + ", ".join(repr(choice) for choice in self.choices)
        else:
            text = {"string": "a string", "boolean": "true or false", "integer": "an integer",
                    "number": "a finite number"}[self.type]
            bounds = [f">= {self.minimum:g}" if self.minimum is not None else "",
                      f"<= {self.maximum:g}" if self.maximum is not None else ""]
            text = " ".join([text, " and ".join(b for b in bounds if b)]).strip()
        return text + (", or false (off)" if self.allow_false else "")

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is not allowed, or None when it is."""
        if value is False and self.allow_false:
            return None
        if isinstance(value, bool) != (self.type == "boolean") or not isinstance(value, OPTION_TYPES[self.type]):
            return f"{type(value).__name__} {value!r} is not {self.allowed()}"
        if self.choices and value not in self.choices:
            return f"{value!r} is not {self.allowed()}{_hint(value, self.choices)}"
        if self.type == "number" and not math.isfinite(value):
            return f"{value!r} is not {self.allowed()}"
        if (self.minimum is not None and value < self.minimum) or (self.maximum is not None and value > self.maximum):
            return f"{value!r} is out of range: expected {self.allowed()}"
        return None

    def check(self, value: Any, patch_id: str) -> Any:
        problem = self.problem(value)
        if problem:
            raise OptionError(f"option {self.name} of patch {patch_id!r}: {problem}")
        return value


def _hint(value: Any, choices: tuple[Any, ...]) -> str:
    if not isinstance(value, str):
        return ""
    same = [c for c in choices if isinstance(c, str) and c.lower() == value.lower()]
    if same:
        return f" (choices are case-sensitive: did you mean {same[0]!r}?)"
    close = difflib.get_close_matches(value, [c for c in choices if isinstance(c, str)], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


@dataclass(frozen=True)
class Declaration:
    id: str
    version: Version
    summary: str
    symptom: str
    default: bool
    targets: tuple[Target, ...]
    options: Mapping[str, Option] = field(default_factory=dict)
    requires: Mapping[str, SpecifierSet] = field(default_factory=dict)
    cause: str = ""  # why the symptom happens (optional; the fix module's docstring says it at length)
    change: str = ""  # what the patch changes
    #: The version lines it is for: any one table, every distribution in it (empty: every line).
    serves: tuple[Mapping[str, SpecifierSet], ...] = ()
    #: Modules that fail to import, or are built wrong, unless this patch is in place before their import.
    before_import: tuple[str, ...] = ()
    source: str = field(default="<declaration>", compare=False)

    @property
    def modules(self) -> tuple[str, ...]:
        """The modules the targets live in; the patch is pending until all of them are imported."""
        return tuple(dict.fromkeys(target.module for target in self.targets))

    @property
    def defaults(self) -> dict[str, Any]:
        return {name: option.default for name, option in self.options.items()}

    @property
    def shim(self) -> bool:
        """A compatibility shim (every target implemented in higgs_patch.shims): it makes boson_multimodal import
        and run on a transformers line it was not written for, and fixes nothing of boson's own."""
        return all(target.wrapper.startswith(SHIMS_PACKAGE) for target in self.targets)


FIELDS = {"id": str, "version": str, "summary": str, "symptom": str, "cause": str, "change": str, "default": bool,
          "targets": list,
          "options": dict, "requires": dict, "serves": (dict, list), "before_import": list}
TARGET_FIELDS = {"path": str, "wrapper": str, "provides": str, "names": list, "order": int}
OPTION_FIELDS = {"default": (str, bool, int, float), "type": str, "choices": list, "minimum": (int, float),
                 "maximum": (int, float), "allow_false": bool, "description": str}
#: Where a top-level field belongs, for the message when TOML put it inside a table.
TOP_LEVEL = {name: "at the top level of the file, before the first [table] header" for name in FIELDS}
ID = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")


def parse(data: Mapping[str, Any], source: str = "<declaration>") -> Declaration:
    """Validate one declaration's table; every problem names the file and the field."""

    def fail(message: str) -> DeclarationError:
        return DeclarationError(f"{source}: {message}")

    schema.check_fields(data, source, FIELDS, required=("id", "version", "summary", "symptom", "targets"),
                        error=DeclarationError)
    if not ID.match(data["id"]):
        raise fail(f"field 'id' {data['id']!r} must be lower-case words joined by '-'")
    try:
        version = Version(data["version"])
    except InvalidVersion as exc:
        raise fail(f"field 'version' {data['version']!r} is not a PEP 440 version") from exc

    targets = tuple(_parse_target(entry, f"{source}: targets[{i}]", fail) for i, entry in enumerate(data["targets"]))
    if not targets:
        raise fail("declares no targets")

    requires = _specifiers(data.get("requires", {}), "requires", source, fail)
    serves = data.get("serves", ())
    if isinstance(serves, dict):
        serves = [serves]
    if "serves" in data and not serves:
        raise fail("field 'serves' is an empty array; leave it out for a patch every line needs")
    lines = tuple(_specifiers(table, f"serves[{i}]" if isinstance(data["serves"], list) else "serves", source, fail)
                  for i, table in enumerate(serves))
    if any(not line for line in lines):
        raise fail("a table of 'serves' is empty: name at least one distribution = specifier")
    before_import = data.get("before_import", [])
    if not all(isinstance(name, str) and all(part.isidentifier() for part in name.split(".")) for name in before_import):
        raise fail(f"field 'before_import' must be a list of module names, not {before_import!r}")

    return Declaration(
        id=data["id"],
        version=version,
        summary=data["summary"],
        symptom=data["symptom"].strip(),
        cause=data.get("cause", "").strip(),
        change=data.get("change", "").strip(),
        default=data.get("default", True),
        targets=targets,
        options={name: _parse_option(name, table, f"{source}: options.{name}", fail)
                 for name, table in data.get("options", {}).items()},
        requires=requires,
        serves=lines,
        before_import=tuple(before_import),
        source=source,
    )


def _specifiers(table: Any, where: str, source: str, fail) -> dict[str, SpecifierSet]:
    """A table of distribution = PEP 440 specifier, read strictly."""
    found = {}
    for distribution, spec in schema.check_mapping(table, f"{source}: {where}", str, DeclarationError).items():
        try:
            found[distribution] = SpecifierSet(spec)
        except InvalidSpecifier as exc:
            raise fail(f"{where}.{distribution} {spec!r} is not a PEP 440 specifier") from exc
    return found


def _parse_target(entry: Any, where: str, fail) -> Target:
    schema.check_fields(entry, where, TARGET_FIELDS, required=("path",), elsewhere=TOP_LEVEL, error=DeclarationError)
    path = entry["path"]
    if path.count(":") != 1 or not all(path.split(":")):
        raise fail(f"target {path!r} is not of the form 'module:Qualified.name'")
    if ("wrapper" in entry) == ("provides" in entry):
        raise fail(f"target {path!r} needs exactly one of 'wrapper' (the factory of what wraps it) or "
                   "'provides' (the factory of a name its module or class lacks)")
    adds = "provides" in entry
    wrapper = entry["provides"] if adds else entry["wrapper"]
    misplaced = [name for name in ("names", "order") if name in entry]
    if adds and misplaced:
        raise fail(f"target {path!r} provides a name: {', '.join(misplaced)} only applies to a wrapped target")
    module, _, name = wrapper.partition(":")
    if not name or (module != IMPLEMENTATION_PACKAGE and not module.startswith(IMPLEMENTATION_PACKAGE + ".")):
        raise fail(
            f"{'provides' if adds else 'wrapper'} {wrapper!r} of target {path!r} must be 'module:function' inside the "
            f"{IMPLEMENTATION_PACKAGE!r} package; implementations elsewhere are refused"
        )
    names = entry.get("names", [])
    if not all(isinstance(name, str) and name.isidentifier() for name in names):
        raise fail(f"names of target {path!r} must be a list of identifiers")
    return Target(path=path, wrapper=wrapper, names=tuple(names), order=entry.get("order", 0), adds=adds)


def _parse_option(name: str, table: Any, where: str, fail) -> Option:
    if not isinstance(table, dict):
        raise fail(
            f"options.{name} must be a table such as [options.{name}] with default = ... and type = ... "
            f"(or choices = [...]), not {schema.describe(table)}; see patches/README.md"
        )
    schema.check_fields(table, where, OPTION_FIELDS, required=("default",), elsewhere=TOP_LEVEL, error=DeclarationError)
    if not name.isidentifier():
        raise fail(f"option name {name!r} must be a Python identifier (it is a keyword of apply())")
    choices = tuple(table.get("choices", ()))
    kind = table.get("type") or (_kind_of(choices[0]) if choices else None)
    if kind not in OPTION_TYPES:
        raise fail(f"options.{name}: field 'type' must be one of {', '.join(map(repr, OPTION_TYPES))} "
                   f"(or give choices), not {kind!r}")
    for choice in choices:
        if _kind_of(choice) != kind:
            raise fail(f"options.{name}: choice {choice!r} is not of type {kind!r}")
    if ("minimum" in table or "maximum" in table) and kind not in ("integer", "number"):
        raise fail(f"options.{name}: minimum and maximum need type 'integer' or 'number'")
    option = Option(name=name, default=table["default"], type=kind, choices=choices, minimum=table.get("minimum"),
                    maximum=table.get("maximum"), allow_false=table.get("allow_false", False),
                    description=table.get("description", ""))
    problem = option.problem(option.default)
    if problem:
        raise fail(f"options.{name}: its default {problem}")
    return option


def _kind_of(value: Any) -> str:
    return next((kind for kind, python in OPTION_TYPES.items()
                 if isinstance(value, python) and isinstance(value, bool) == (kind == "boolean")), "unknown")


def load(text: str, source: str = "<declaration>") -> Declaration:
    return parse(schema.loads(text, source, DeclarationError), source)


def load_all(folder: Any = None) -> dict[str, Declaration]:
    """Every declaration in ``folder`` (those shipped in ``patches/``), by id, in file-name order; all
    checked together, so that one bad file fails the load before anything is applied."""
    found: dict[str, Declaration] = {}
    owners: dict[str, Declaration] = {}
    added: dict[str, Declaration] = {}
    folder = folder if folder is not None else resources.files("higgs_patch.patches")
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".toml"):
            continue
        declaration = load(entry.read_text(encoding="utf-8"), f"patches/{entry.name}")
        if declaration.id in found:
            raise DeclarationError(f"patches/{entry.name}: id {declaration.id!r} is declared twice "
                                   f"(also in {found[declaration.id].source})")
        for name in declaration.options:
            if name in owners:
                raise DeclarationError(
                    f"patches/{entry.name}: option {name!r} is also declared by {owners[name].source} "
                    f"(patch {owners[name].id!r}); an option belongs to one patch"
                )
            owners[name] = declaration
        for target in declaration.targets:
            if target.adds and target.path in added:
                raise DeclarationError(f"patches/{entry.name}: {target.path} is also provided by "
                                       f"{added[target.path].source}; a name is added by one patch")
            if target.adds:
                added[target.path] = declaration
        found[declaration.id] = declaration
    return found
