"""``higgs-patch doctor``: verify an install without changing it.

:func:`run` imports the stack, checks it, and dry-runs every patch in this process (apply, revert,
originals back by identity); it returns a :class:`Report` that :func:`render` turns into text and
:meth:`Report.as_json` into the ``--json`` document. Nothing outside this process is touched.

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
    "fingerprint", "known", "releases"}`` for fingerprinted targets), ``dry_run`` (``"ok"``,
    ``"failed"`` or ``"skipped"``), ``checks`` (as above).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import platform
import re
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

import wrapt
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from . import __version__, engine, environment, gate, install_advice, provenance, startup, upstream
from .declarations import Declaration, Target
from .errors import PatchError

SCHEMA = 1
OK, WARN, FAIL = "ok", "warn", "fail"

UPSTREAM = "boson_multimodal"
UPSTREAM_DISTRIBUTION = "boson-multimodal"


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
            "higgs_patch": {"version": __version__, "location": str(Path(__file__).resolve().parent)},
            "counts": self.counts(),
            "seconds": {"import": round(self.import_seconds, 3), "checks": round(self.check_seconds, 3)},
            "environment": self.environment,
            "checks": [check.as_json() for check in self.stack],
            "patches": [patch.as_json() for patch in self.patches],
        }


# --- the run -------------------------------------------------------------------------------------


def run() -> Report:
    """Import the stack and every patch's module, check them, dry-run the patches; change nothing."""
    facts: dict[str, Any] = {}
    unreadable = _unreadable_data()
    if unreadable:  # every other check reads this data: report the file, check nothing else
        return Report(facts, [_python(facts), _platform(facts), *unreadable], [])
    declarations = list(engine.known().values())
    started = time.perf_counter()
    imported = _import_all(["torch", "transformers", *(m for d in declarations for m in d.modules)])
    import_seconds = time.perf_counter() - started

    started = time.perf_counter()
    stack = [
        _python(facts),
        _platform(facts),
        _torch(facts, imported),
        _torchaudio(facts),
        _versioned(facts, "transformers", imported),
        _versioned(facts, "accelerate", imported),
        _optional(facts, "peft", "for LoRA"),
        _wrapt(facts),
        _upstream(facts, imported),
        _startup_hook(facts),
    ]
    patches = [_patch(d, imported) for d in declarations]
    return Report(facts, stack, patches, import_seconds, time.perf_counter() - started)


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


def _import_all(names: list[str]) -> dict[str, ModuleType | BaseException]:
    """Each module, or the exception importing it raised (reported by the checks, never dropped)."""
    found: dict[str, ModuleType | BaseException] = {}
    for name in dict.fromkeys(names):
        try:
            found[name] = importlib.import_module(name)
        except Exception as exc:
            found[name] = exc
    return found


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def one_line(exc: BaseException, limit: int = 0) -> str:
    """``Type: first line of the message``, cut at ``limit`` characters when one is given."""
    text = str(exc).strip().splitlines()
    line = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
    return line[: limit - 1] + "…" if limit and len(line) > limit else line


def _raised_at(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    frames = [f for f in frames if "importlib" not in f.filename] or frames
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"


# --- the stack -----------------------------------------------------------------------------------


def _python(facts: dict[str, Any]) -> Check:
    facts["python"] = {
        "version": platform.python_version(),
        "implementation": platform.python_implementation(),
        "executable": sys.executable,
    }
    if sys.version_info < (3, 10):
        return Check("python", FAIL, f"{platform.python_version()}: higgs-patch needs Python >= 3.10")
    return Check("python", OK, f"{platform.python_version()} {platform.python_implementation()} ({sys.executable})")


def _platform(facts: dict[str, Any]) -> Check:
    facts["platform"] = {
        "system": platform.system(),
        "machine": platform.machine(),
        "release": platform.release(),
        "platform": platform.platform(),
    }
    return Check("platform", OK, platform.platform())


def _torch(facts: dict[str, Any], imported: dict[str, Any]) -> Check:
    version = _version("torch")
    module = imported["torch"]
    facts["torch"] = {"installed": version is not None, "version": version, "importable": False}
    if isinstance(module, BaseException):
        return Check("torch", FAIL, f"cannot be imported: {one_line(module)}", "pip install torch")
    cuda = module.cuda.is_available()
    count = module.cuda.device_count() if cuda else 0
    mps = bool(getattr(module.backends, "mps", None) and module.backends.mps.is_available())
    facts["torch"].update(
        version=module.__version__,
        importable=True,
        cuda={"available": cuda, "device_count": count, "version": module.version.cuda},
        mps={"available": mps},
    )
    if cuda:
        accelerators = f"CUDA {module.version.cuda} usable, {count} device(s)"
    elif module.version.cuda:
        accelerators = f"CUDA {module.version.cuda} build but no usable device"
    else:
        accelerators = "CPU build, no CUDA"
    accelerators += ", MPS usable" if mps else ", no MPS"
    return Check("torch", OK, f"{module.__version__}; {accelerators}")


def _torchaudio(facts: dict[str, Any]) -> Check:
    """Optional: nothing in higgs-patch uses it, but data pipelines do, and 2.9 cannot do I/O alone."""
    version = _version("torchaudio")
    facts["torchaudio"] = {"installed": version is not None, "version": version, "wav_roundtrip": None}
    if version is None:
        return Check("torchaudio", OK, "not installed (optional: nothing in higgs-patch or the patched code uses it)")
    wanted = _torch_requirement()
    torch_version = _version("torch")
    if wanted and torch_version and not wanted.contains(torch_version, prereleases=True):
        return Check(
            "torchaudio", WARN, f"{version} needs torch{wanted}, torch {torch_version} is installed",
            f"install the torchaudio release made for torch {torch_version}, or uninstall torchaudio",
        )
    try:
        import torch
        import torchaudio

        with tempfile.TemporaryDirectory(prefix="higgs-patch-doctor-") as folder:
            path = os.path.join(folder, "tone.wav")
            torchaudio.save(path, torch.zeros(1, 1600), 16000)
            waveform, rate = torchaudio.load(path)
        if rate != 16000 or tuple(waveform.shape) != (1, 1600):
            raise RuntimeError(f"read back {tuple(waveform.shape)} at {rate} Hz, wrote (1, 1600) at 16000 Hz")
    except Exception as exc:  # reported: nothing here needs torchaudio, so it informs and never fails
        facts["torchaudio"]["wav_roundtrip"] = False
        return Check(
            "torchaudio", OK, f"{version} cannot save and load a WAV file (nothing in higgs-patch or the patched "
            f"code uses torchaudio): {_audio_io_cause(exc)}", _AUDIO_IO_FIX.format(torch=torch_version),
        )
    facts["torchaudio"]["wav_roundtrip"] = True
    return Check("torchaudio", OK, f"{version}; saves and loads a WAV file")


_AUDIO_IO_FIX = (
    "only if your own code reads audio with torchaudio: torchaudio >= 2.9 does file I/O through torchcodec, "
    "which needs FFmpeg's shared libraries (e.g. apt install ffmpeg, or conda install ffmpeg) and the torchcodec "
    "release built for torch {torch} (see torchcodec's compatibility table; the newest one may need CUDA "
    "libraries a CPU machine lacks); or read audio with librosa or soundfile instead"
)


def _audio_io_cause(exc: BaseException) -> str:
    """The first line of the error, and every shared library it says could not be loaded (torchcodec
    lists them far down a long message)."""
    libraries = dict.fromkeys(re.findall(r"([\w.+-]+): cannot open shared object file", str(exc)))
    missing = f"; shared libraries not found: {', '.join(libraries)}" if libraries else ""
    return one_line(exc) + missing


def _torch_requirement() -> SpecifierSet | None:
    """torchaudio pins the torch it was built for exactly."""
    for line in importlib.metadata.requires("torchaudio") or ():
        try:
            requirement = Requirement(line)
        except InvalidRequirement:
            continue
        if canonicalize_name(requirement.name) == "torch" and requirement.marker is None:
            return requirement.specifier
    return None


def _versioned(facts: dict[str, Any], distribution: str, imported: dict[str, Any]) -> Check:
    """A required distribution, against what is known to work with boson_multimodal."""
    version = _version(distribution)
    facts[distribution] = {"installed": version is not None, "version": version}
    rule = _rule(distribution)
    if version is None:
        return Check(distribution, FAIL, "not installed", rule.fix if rule else f"pip install {distribution}")
    failed = imported.get(distribution)
    if isinstance(failed, BaseException):
        fix = f"pip install --force-reinstall {distribution}=={version}"
        return Check(distribution, FAIL, f"{version} cannot be imported: {one_line(failed)}", fix)
    if rule and not SpecifierSet(rule.works).contains(version, prereleases=True):
        return Check(distribution, FAIL, f"{version} is outside {rule.works}: {rule.reason}", rule.fix)
    return Check(distribution, OK, version)


def _optional(facts: dict[str, Any], distribution: str, use: str) -> Check:
    version = _version(distribution)
    facts[distribution] = {"installed": version is not None, "version": version}
    rule = _rule(distribution)
    if version and rule and not SpecifierSet(rule.works).contains(version, prereleases=True):
        detail = f"{version} is outside {rule.works} (known to break {use}): {rule.reason}"
        return Check(distribution, FAIL, detail, rule.fix)
    return Check(distribution, OK, version or f"not installed (optional, {use})")


def _dependency_at_fault(module: str) -> tuple[str, str] | None:
    """(why, fix) when an import boson_multimodal makes fails because the distribution providing
    ``module`` is a version it does not work with (compat/matrix.toml, else its own requirements)."""
    names = importlib.metadata.packages_distributions().get(module, [module]) if module else []
    for name in names:
        version = _version(name)
        rule = _rule(name)
        works, fix = (rule.works, rule.fix) if rule else (_upstream_requirement(name), "")
        if version and works and not SpecifierSet(works).contains(version, prereleases=True):
            why = f"{name} {version}: boson_multimodal works with {name}{SpecifierSet(works)}"
            return why, fix or install_advice.install_fix([(name, works)])
    return None


def _upstream_requirement(distribution: str) -> str:
    """boson-multimodal's own requirement on ``distribution``, "" when it has none."""
    if _version(UPSTREAM_DISTRIBUTION) is None:
        return ""
    for line in importlib.metadata.requires(UPSTREAM_DISTRIBUTION) or ():
        requirement = Requirement(line)
        if canonicalize_name(requirement.name) == canonicalize_name(distribution) and requirement.marker is None:
            return str(requirement.specifier)
    return ""


def _rule(distribution: str) -> upstream.KnownBad | None:
    """compat/matrix.toml's known-bad rule for ``distribution`` that holds in this environment, if any."""
    for rule in upstream.known_bad():
        if rule.distribution == distribution and all(
            (found := _version(other)) is not None and SpecifierSet(spec).contains(found, prereleases=True)
            for other, spec in rule.when.items()
        ):
            return rule
    return None


def _wrapt(facts: dict[str, Any]) -> Check:
    version = wrapt.__version__
    # wrapt 2 imports its C extension as wrapt._wrappers and falls back to pure Python (wrapt/__wrapt__.py);
    # the FunctionWrapper it exports says which one is in use.
    extension = sys.modules.get("wrapt._wrappers")
    in_use = extension is not None and wrapt.FunctionWrapper is getattr(extension, "FunctionWrapper", None)
    facts["wrapt"] = {"installed": True, "version": version, "c_extension": in_use}
    if not SpecifierSet(">=2.2").contains(version):
        return Check("wrapt", FAIL, f"{version}: higgs-patch needs wrapt>=2.2", 'pip install "wrapt>=2.2"')
    if in_use:
        return Check("wrapt", OK, f"{version}, C extension in use")
    if os.environ.get("WRAPT_DISABLE_EXTENSIONS"):
        return Check("wrapt", OK, f"{version}, pure Python (WRAPT_DISABLE_EXTENSIONS is set)")
    return Check(
        "wrapt", WARN, f"{version}, pure Python: its C extension is not available (works, each patched call is slower)",
        "pip install --force-reinstall --no-binary=:none: wrapt",
    )


def _upstream(facts: dict[str, Any], imported: dict[str, Any]) -> Check:
    distribution = provenance.distribution_of(UPSTREAM)
    version = distribution.version if distribution else None
    info: dict[str, Any] = {
        "installed": version is not None, "version": version, "importable": False, "error": None,
        "location": None, "editable": False, "url": None, "commit": None, "checkout": None,
    }
    facts[UPSTREAM] = info
    failures = [(n, m) for n, m in imported.items() if n.split(".")[0] == UPSTREAM and isinstance(m, BaseException)]
    install = install_advice.install_fix([(UPSTREAM_DISTRIBUTION, "")])
    if failures:
        name, exc = failures[0]
        info["error"] = one_line(exc)
        culprit = (getattr(exc, "name", None) or "").split(".")[0]
        if isinstance(exc, ModuleNotFoundError) and culprit == UPSTREAM and version is None:
            return Check(UPSTREAM, FAIL, "not installed", install)
        installed = f"{version} is installed but " if version else ""
        detail = f"{installed}{name} cannot be imported: {one_line(exc)} (raised at {_raised_at(exc)})"
        blamed = _dependency_at_fault(culprit) if isinstance(exc, ImportError) and culprit != UPSTREAM else None
        if blamed:
            return Check(UPSTREAM, FAIL, f"{detail}; the cause is {blamed[0]}", blamed[1])
        if isinstance(exc, ModuleNotFoundError) and culprit and culprit != UPSTREAM:
            fix = f"install {exc.name!r}, which boson_multimodal imports: pip install \"higgs-patch[upstream]\""
        else:
            fix = f"reinstall it: pip uninstall -y {UPSTREAM_DISTRIBUTION} && {install}"
        return Check(UPSTREAM, FAIL, detail, fix)
    package = sys.modules.get(UPSTREAM)
    if package is None:  # no patch targets it: nothing to check
        return Check(UPSTREAM, OK if version else WARN, version or "not installed")
    location = Path(package.__file__).resolve().parent
    info.update(importable=True, location=str(location), **provenance.origin(distribution, location))
    where = f"{version or 'no distribution metadata'} from {location}"
    origin = provenance.describe(info)
    shadowed = provenance.shadowed(distribution, location)
    if shadowed:
        return Check(
            UPSTREAM, WARN, f"{where} ({origin}), not from the installed distribution at {shadowed}",
            "check PYTHONPATH and the working directory: they put another copy first",
        )
    return Check(UPSTREAM, OK, f"{where} ({origin})")


def _startup_hook(facts: dict[str, Any]) -> Check:
    """Whether child processes (spawned workers, launcher ranks, ``higgs-patch run``) can be patched."""
    hook = startup.find_hook()
    facts["startup_hook"] = {"path": hook.path, "active": hook.active}
    value = os.environ.get(environment.ACTIVATE)
    if value:
        try:
            startup.decode(value)
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


# --- the patches ---------------------------------------------------------------------------------


def _patch(declaration: Declaration, imported: dict[str, Any]) -> PatchReport:
    states = {s.id: s for s in engine.status()}
    status = states[declaration.id]
    checks: list[Check] = []
    blocking: list[str] = []  # why it would not apply
    broken: list[str] = []  # the part of it that forcing cannot get past
    severity = FAIL if declaration.default else WARN  # a default patch that cannot apply makes apply() fail

    conflicts = [str(c) for c in gate.conflicts(declaration)]
    if conflicts:
        blocking += conflicts
        checks.append(Check("requires", severity, "; ".join(conflicts), _requirement_fix(declaration)))
    else:
        met = ", ".join(f"{n}{s} (found {_version(n)})" for n, s in declaration.requires.items())
        checks.append(Check("requires", OK, met or "no requirements"))

    code: list[gate.CodeCheck] = []
    failed = {name: imported.get(name) for name in declaration.modules if isinstance(imported.get(name), BaseException)}
    for name, error in failed.items():
        broken.append(f"{name} cannot be imported: {one_line(error)}")
        checks.append(Check("import", severity, broken[-1]))
    if not failed:
        missing = [t for t in declaration.targets if not _exists(imported[t.module], t)]
        for target in missing:
            broken.append(f"{target.path} does not exist in the installed code")
            checks.append(Check("target", severity, broken[-1]))
        try:
            code = gate.code_checks(declaration) if not missing else []
        except Exception as exc:  # e.g. an install without source files: reported, not fatal to the doctor
            broken.append(f"cannot fingerprint {', '.join(declaration.modules)}: {one_line(exc)}")
            checks.append(Check("fingerprint", severity, broken[-1]))
        checks += [_code_check(c, severity) for c in code]
        blocking += [f"{c.target}: fingerprint {c.found} is unknown" for c in code if not c.matches]
        fingerprinted = {c.target for c in code}
        checks += [
            _unfingerprinted(t) for t in declaration.targets
            if t.path not in fingerprinted and t not in missing
        ]

    blocking += broken
    forced = bool(blocking) and not broken and environment.flag(environment.FORCE)
    compatible = not blocking
    if compatible:
        checks.append(Check("would apply", OK, "yes"))
    elif forced:
        checks.append(Check(
            "would apply", WARN,
            f"yes, forced by {environment.FORCE}=1 over: {'; '.join(blocking)}; "
            "forcing is not a fix: it can train wrong without any error",
        ))
    else:
        checks.append(Check("would apply", severity, "no: see the failed check(s) above"))
    in_use = WARN if status.state == "bypassed" else OK  # applied, but the target was replaced since
    checks.append(Check("this process", in_use, status.state + (f" ({status.reason})" if status.reason else "")))

    dry_run, check = _dry_run(declaration, status.state, compatible or forced, states)
    checks.append(check)
    return PatchReport(
        declaration, status.state, compatible, "; ".join(blocking), conflicts, code, dry_run, checks
    )


def _requirement_fix(declaration: Declaration) -> str:
    return install_advice.install_fix((c.distribution, c.requested) for c in gate.conflicts(declaration))


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
    if state in ("applied", "bypassed", "pending"):
        return "skipped", Check("dry run", OK, f"skipped: {state} in this process, left as it is")
    if not would_apply:
        return "skipped", Check("dry run", WARN, "skipped: it would not apply")
    # A target another applied patch already wraps keeps its wrapper while this one is on: layers stack.
    shared = {path for s in states.values() if s.state in ("applied", "pending") for path in s.targets}
    before = {t.path: _resolve(t) for t in declaration.targets}
    problems = []
    try:
        engine.apply(declaration.id)
    except PatchError as exc:
        return "failed", Check("dry run", FAIL, f"apply() failed: {one_line(exc)}")
    try:
        now = next(s for s in engine.status() if s.id == declaration.id)
        if now.state != "applied":
            problems.append(f"state after apply() is {now.state!r}")
        problems += [
            f"{t.path} was not wrapped" for t in declaration.targets
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
    return wrapt.resolve_path(sys.modules[target.module], target.qualname)[2]


# --- text ----------------------------------------------------------------------------------------


def render(report: Report, strict: bool = False, symbols: dict[str, str] | None = None) -> str:
    marks = symbols or {OK: "✓", WARN: "!", FAIL: "✗"}
    rows: list[tuple[str | None, Check | str]] = [(None, "Stack")]
    rows += [("  ", check) for check in report.stack]
    for patch in report.patches:
        d = patch.declaration
        rows.append((None, ""))
        rows.append((None, f"Patch {d.id} {d.version} (default {'on' if d.default else 'off'})"))
        rows += [("  ", check) for check in patch.checks]
    width = max(len(c.name) for _, c in rows if isinstance(c, Check))
    lines = [f"higgs-patch {__version__} doctor: checks this install, changes nothing", ""]
    for indent, row in rows:
        if isinstance(row, str):
            lines.append(row)
            continue
        lines.append(f"{indent}{marks[row.level]} {row.name.ljust(width)}  {row.detail}")
        if row.fix:
            lines.append(f"{indent}  {' ' * width}  {'fix' if row.level != OK else 'advice'}: {row.fix}")
    counts = report.counts()
    problems = counts[FAIL] + (counts[WARN] if strict else 0)
    verdict = "all good" if not problems else f"{problems} problem{'s' * (problems != 1)} found"
    lines += [
        "",
        f"doctor: {verdict} ({counts[OK]} ok, {counts[WARN]} warning{'s' * (counts[WARN] != 1)}, "
        f"{counts[FAIL]} failed{', warnings count' if strict else ''}); "
        f"checks took {report.check_seconds:.2f} s after {report.import_seconds:.2f} s importing the stack",
    ]
    return "\n".join(lines)
