"""Stack checks: Python, the platform, torch and torchaudio, transformers, accelerate, peft, wrapt.

Each check records its facts for ``--json`` and returns one :class:`Check`; a distribution outside
what compat/matrix.toml knows to work is a failure that names the fix.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import re
import sys
import tempfile
import traceback
from typing import Any

import wrapt
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from ... import upstream
from .report import FAIL, OK, WARN, Check, one_line, installed_version


def check_python(facts: dict[str, Any]) -> Check:
    facts["python"] = {
        "version": platform.python_version(),
        "implementation": platform.python_implementation(),
        "executable": sys.executable,
    }
    if sys.version_info < (3, 10):
        return Check("python", FAIL, f"{platform.python_version()}: higgs-patch needs Python >= 3.10")
    return Check("python", OK, f"{platform.python_version()} {platform.python_implementation()} ({sys.executable})")


def check_platform(facts: dict[str, Any]) -> Check:
    facts["platform"] = {
        "system": platform.system(),
        "machine": platform.machine(),
        "release": platform.release(),
        "platform": platform.platform(),
    }
    return Check("platform", OK, platform.platform())


def check_torch(facts: dict[str, Any], imported: dict[str, Any]) -> Check:
    version = installed_version("torch")
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


def check_torchaudio(facts: dict[str, Any], imported: dict[str, Any]) -> Check:
    """Optional: nothing in higgs-patch uses it, but data pipelines do, and 2.9 cannot do I/O alone. One that is
    installed and cannot load breaks more than audio: transformers 5 imports it whenever it is installed."""
    version = installed_version("torchaudio")
    facts["torchaudio"] = {"installed": version is not None, "version": version, "wav_roundtrip": None}
    if version is None:
        return Check("torchaudio", OK, "not installed (optional: nothing in higgs-patch or the patched code uses it)")
    wanted = _torch_requirement()
    torch_version = installed_version("torch")
    if wanted and torch_version and not wanted.contains(torch_version, prereleases=True):
        return Check(
            "torchaudio", WARN, f"{version} needs torch{wanted}, torch {torch_version} is installed",
            f"install the torchaudio release made for torch {torch_version}, or uninstall torchaudio",
        )
    try:
        import torchaudio
    except Exception as exc:  # a build for another torch or CUDA: its extension does not load
        return _cannot_load(version, torch_version, exc, imported)
    try:
        import torch

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
            f"code uses torchaudio): {_torchcodec_cause(version)}{_audio_io_cause(exc)}",
            _AUDIO_IO_FIX.format(torch=torch_version),
        )
    facts["torchaudio"]["wav_roundtrip"] = True
    return Check("torchaudio", OK, f"{version}; saves and loads a WAV file")


_AUDIO_IO_FIX = (
    "only if your own code reads audio with torchaudio: torchaudio >= 2.9 does file I/O through torchcodec, "
    "which needs FFmpeg's shared libraries (e.g. apt install ffmpeg, or conda install ffmpeg) and the torchcodec "
    "release built for torch {torch} (see torchcodec's compatibility table; the newest one may need CUDA "
    "libraries a CPU machine lacks); or read audio with librosa or soundfile instead"
)


#: What doctor looks for in the failures of other checks, to name the package that cannot load as their cause.
UNLOADABLE = "torchaudio"


def _cannot_load(version: str, torch_version: str | None, exc: BaseException, imported: dict[str, Any]) -> Check:
    """An installed torchaudio that raises when imported: a failure when some of the stack fails with it."""
    broken = [name for name, found in imported.items() if isinstance(found, BaseException) and caused_by(found)]
    fix = (f"pip uninstall -y torchaudio (nothing in higgs-patch, boson's model and collator, or the Trainer needs it), "
           f"or install the torchaudio built for your torch {torch_version} (each pins the torch it was built for; "
           "PyPI's newest may be a CUDA build that a CPU torch cannot load, and torch 2.12 and later have none yet)")
    detail = f"{version} is installed but cannot be loaded: {_audio_io_cause(exc)}"
    if not broken:
        return Check("torchaudio", WARN, f"{detail} (nothing imported here fails with it; code that imports it does)", fix)
    return Check("torchaudio", FAIL, f"{detail}; transformers imports torchaudio whenever it is installed, so "
                 f"{', '.join(broken)} cannot be imported either", fix)


def caused_by(exc: BaseException | str) -> bool:
    """Whether a failure (an exception, or its text from another interpreter) comes from the installed torchaudio:
    raised in its files, or naming them."""
    spec = importlib.util.find_spec(UNLOADABLE) if UNLOADABLE not in sys.modules else sys.modules[UNLOADABLE].__spec__
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    if not folders:
        return False
    seen: set[int] = set()
    while isinstance(exc, BaseException) and id(exc) not in seen:
        seen.add(id(exc))
        files = [frame.filename for frame in traceback.extract_tb(exc.__traceback__)]
        if any(f.startswith(folder) for f in files for folder in folders) or any(folder in str(exc) for folder in folders):
            return True
        exc = exc.__cause__ or exc.__context__
    return isinstance(exc, str) and any(folder in exc for folder in folders)


def _torchcodec_cause(version: str) -> str:
    """torchaudio >= 2.9 saves and loads through torchcodec: name it, installed or not, as the cause."""
    if Version(version).release < (2, 9):
        return ""
    codec = installed_version("torchcodec")
    return (f"torchaudio {version} does file I/O through torchcodec, " +
            (f"and torchcodec {codec} cannot load or run: " if codec else "and torchcodec is not installed: "))


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


def check_required(facts: dict[str, Any], distribution: str, imported: dict[str, Any]) -> Check:
    """A required distribution, against what is known to work with boson_multimodal."""
    version = installed_version(distribution)
    facts[distribution] = {"installed": version is not None, "version": version}
    rule = rule_for(distribution, version)
    if version is None:
        return Check(distribution, FAIL, "not installed", rule.fix if rule else f"pip install {distribution}")
    failed = imported.get(distribution)
    if isinstance(failed, BaseException):
        fix = f"pip install --force-reinstall {distribution}=={version}"
        return Check(distribution, FAIL, f"{version} cannot be imported: {one_line(failed)}", fix)
    if rule and not SpecifierSet(rule.works).contains(version, prereleases=True):
        return Check(distribution, FAIL, f"{version} is outside {rule.works}: {rule.reason}", rule.fix)
    return Check(distribution, OK, version)


def check_optional(facts: dict[str, Any], distribution: str, use: str) -> Check:
    version = installed_version(distribution)
    facts[distribution] = {"installed": version is not None, "version": version}
    rule = rule_for(distribution, version)
    if version and rule and not SpecifierSet(rule.works).contains(version, prereleases=True):
        detail = f"{version} is outside {rule.works} (known to break {use}): {rule.reason}"
        return Check(distribution, FAIL, detail, rule.fix)
    return Check(distribution, OK, version or f"not installed (optional, {use})")


def rule_for(distribution: str, version: str | None = None) -> upstream.KnownBad | None:
    """compat/matrix.toml's known-bad rule for ``distribution`` that holds in this environment, if any; with
    ``version``, the first such rule that version breaks, if one does (a distribution may have several)."""
    holding = [
        rule for rule in upstream.known_bad()
        if rule.distribution == distribution and all(
            (found := installed_version(other)) is not None and SpecifierSet(spec).contains(found, prereleases=True)
            for other, spec in rule.when.items()
        )
    ]
    broken = [r for r in holding if version and not SpecifierSet(r.works).contains(version, prereleases=True)]
    return (broken or holding or [None])[0]


def newest_tested(distribution: str) -> Version | None:
    """The newest version of ``distribution`` in compat/matrix.toml's tested stacks."""
    found = []
    for stack in upstream.tested():
        try:
            found.append(Version(stack.versions.get(distribution, "").split()[0]))
        except (InvalidVersion, IndexError):
            continue
    return max(found, default=None)


def check_wrapt(facts: dict[str, Any]) -> Check:
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
