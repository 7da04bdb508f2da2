"""What doctor reports: a check, a patch's section, the whole report, and its ``--json`` document.

The ``--json`` document, schema 1. Keys are only ever added within a schema version; a removed or
retyped key raises ``schema``.

``schema``
    1 (int).
``ok``
    true when no check failed (with ``strict``, and none warned).
``strict``
    whether warnings counted as problems.
``higgs_patch``
    ``{"version", "location"}`` of this plugin.
``counts``
    ``{"ok", "warn", "fail"}``: how many checks ended so.
``seconds``
    ``{"import", "checks"}``: time spent importing the stack, and on the checks after it.
``environment``
    facts, by component: ``python`` ``{version, implementation, executable}``, ``platform``
    ``{system, machine, release, platform}``, then ``torch``, ``torchaudio``, ``transformers``,
    ``accelerate``, ``peft``, ``wrapt``, ``boson_multimodal``, each with at least ``installed`` (bool)
    and ``version`` (str or null), and: torch ``cuda`` ``{available, device_count, version}`` and
    ``mps`` ``{available}``; torchaudio ``wav_roundtrip`` (bool or null when not tried); wrapt
    ``c_extension`` (bool); boson_multimodal ``importable``, ``error``, ``location``, ``editable``,
    ``url``, ``commit``, ``checkout`` (the git work tree it was imported from; null when unknown);
    ``startup_hook`` ``{path, active}`` (``higgs_patch.pth``; path null when not installed).
``checks``
    the stack checks: a list of ``{"name", "level", "detail", "fix"}``; ``level`` is ``"ok"``,
    ``"warn"`` or ``"fail"``; ``fix`` is "" when there is nothing to do (an ``ok`` check may carry
    advice). When the plugin's own data (``patches/*.toml``, ``compat/*.toml``) cannot be read, a
    failed check names the file, and ``patches`` is empty.
``patches``
    one object per known patch: ``id``, ``version``, ``default`` (bool), ``summary``, ``targets``
    (list of ``module:qualname``), ``state`` (in this process: ``applied``, ``pending``,
    ``not-applied`` or ``incompatible``), ``compatible`` (bool: it would apply), ``reason`` (why not,
    "" when compatible), ``conflicts`` (list of str), ``code`` (list of ``{"target", "file",
    "fingerprint", "known", "releases"}`` for fingerprinted targets), ``needed`` (bool: on a line it serves
    here; false: ``compatible`` is true, nothing was dry-run), ``serves`` (list of ``{distribution: specifier}``,
    any one of which makes it needed; empty: every line), ``dry_run`` (``"ok"``,
    ``"failed"`` or ``"skipped"``), ``checks`` (as above).
"""

from __future__ import annotations

import importlib.metadata
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ... import __version__, gate
from ...declarations import Declaration

SCHEMA = 1
OK, WARN, FAIL = "ok", "warn", "fail"


@dataclass(frozen=True)
class Check:
    name: str
    level: str
    detail: str
    fix: str = ""

    def as_json(self) -> dict[str, str]:
        return {"name": self.name, "level": self.level, "detail": self.detail, "fix": self.fix}


@dataclass
class PatchReport:
    declaration: Declaration
    state: str
    compatible: bool
    reason: str
    conflicts: list[str]
    code: list[gate.CodeCheck]
    dry_run: str
    checks: list[Check]
    needed: bool = True  # on a line it serves here (off them: not needed, neither applied nor refused)

    def as_json(self) -> dict[str, Any]:
        d = self.declaration
        return {
            "id": d.id,
            "version": str(d.version),
            "default": d.default,
            "summary": d.summary,
            "targets": [t.path for t in d.targets],
            "state": self.state,
            "compatible": self.compatible,
            "reason": self.reason,
            "conflicts": self.conflicts,
            "code": [
                {"target": c.target, "file": c.file, "fingerprint": c.found, "known": c.matches, "releases": c.releases}
                for c in self.code
            ],
            "dry_run": self.dry_run,
            "checks": [check.as_json() for check in self.checks],
            "needed": self.needed,
            "serves": [{name: str(spec) for name, spec in line.items()} for line in d.serves],
        }


@dataclass
class Report:
    environment: dict[str, Any]
    stack: list[Check]
    patches: list[PatchReport]
    import_seconds: float = 0.0
    check_seconds: float = 0.0

    def checks(self) -> Iterator[Check]:
        yield from self.stack
        for patch in self.patches:
            yield from patch.checks

    def counts(self) -> dict[str, int]:
        counts = {OK: 0, WARN: 0, FAIL: 0}
        for check in self.checks():
            counts[check.level] += 1
        return counts

    def ok(self, strict: bool = False) -> bool:
        counts = self.counts()
        return counts[FAIL] == 0 and not (strict and counts[WARN])

    def as_json(self, strict: bool = False) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "ok": self.ok(strict),
            "strict": strict,
            "higgs_patch": {"version": __version__, "location": str(Path(__file__).resolve().parents[2])},
            "counts": self.counts(),
            "seconds": {"import": round(self.import_seconds, 3), "checks": round(self.check_seconds, 3)},
            "environment": self.environment,
            "checks": [check.as_json() for check in self.stack],
            "patches": [patch.as_json() for patch in self.patches],
        }


def installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def one_line(exc: BaseException, limit: int = 0) -> str:
    """``Type: first line of the message``, cut at ``limit`` characters when one is given."""
    text = str(exc).strip().splitlines()
    line = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
    return line[: limit - 1] + "…" if limit and len(line) > limit else line


def raised_at(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    frames = [f for f in frames if "importlib" not in f.filename] or frames
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
