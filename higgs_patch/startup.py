"""Process start-up: patches in every process, the way coverage.py measures subprocesses.

``higgs_patch.pth`` (installed at the top of site-packages, by the wheel and by ``pip install -e``)
runs one line at every interpreter start: it does nothing unless ``HIGGS_PATCH_ACTIVATE`` is set, so
an inactive install costs one environment lookup and imports nothing. When set (by ``higgs-patch
run``, or by ``apply()`` in a parent process), it holds the patches and options to apply, and this
module applies them; the patches wait, pending, for their modules to be imported. Spawned
DataLoader workers, torchrun ranks and any other child inherit the variable, so they patch
themselves before unpickling anything. Like Python's own ``PYTHON*`` variables, it is ignored under
``python -I`` and ``-E``.

A malformed value never stops the program it reaches: one line on stderr names the variable and what
is wrong, and the process starts unpatched.
"""

from __future__ import annotations

import logging
import os
import site
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from . import environment
from .errors import PatchError

log = logging.getLogger("higgs_patch")

#: The start-up hook's file name, at the top of a site-packages directory.
HOOK = "higgs_patch.pth"

_started = False
_LINE = 900  # characters of a start-up report, its prefix aside


def process_startup() -> None:
    """Apply what HIGGS_PATCH_ACTIVATE asks for; idempotent (a .pth can run twice); never raises."""
    global _started
    value = os.environ.get(environment.ACTIVATE)
    if _started or not value or sys.flags.ignore_environment:
        return
    _started = True
    try:
        patches, force = environment.decode(value)
    except ValueError as exc:
        _report(f"{environment.ACTIVATE} is malformed and ignored, this process starts unpatched: {exc}")
        return
    except Exception as exc:  # still one line, whatever reading the value raised
        _report(f"{environment.ACTIVATE} could not be read and is ignored, this process starts unpatched: "
                f"{type(exc).__name__}: {exc}")
        return
    if not patches:
        return
    options = {name: setting for chosen in patches.values() for name, setting in chosen.items()}
    try:
        from . import engine

        engine.apply(*patches, force=force, **options)  # one call: atomic, as in the parent
    except Exception as exc:  # reported in one line: a start-up hook must not stop the program it runs in
        reason = str(exc) if isinstance(exc, PatchError) else f"{type(exc).__name__}: {exc}"
        _report(f"{environment.ACTIVATE}: not applied, this process starts unpatched: {reason}")


def _report(message: str) -> None:
    """One line on stderr (logging's last resort: nothing is configured yet at start-up), of at most
    ``_LINE`` characters however much the value or the error holds."""
    line = " ".join(message.split())
    log.error("higgs-patch: %s", line if len(line) <= _LINE else line[: _LINE - 1] + "…")


@dataclass(frozen=True)
class Hook:
    """Where the start-up hook is, and whether this interpreter's children run it."""

    path: str | None
    active: bool
    detail: str


def find_hook() -> Hook:
    """The start-up hook of this environment: installed, current, and in a directory ``site`` processes."""
    folders = [*site.getsitepackages(), *([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])]
    found = next((Path(folder, HOOK) for folder in folders if Path(folder, HOOK).is_file()), None)
    if found is None:
        return Hook(None, False, f"no {HOOK} in {', '.join(folders)}: child processes start unpatched")
    expected = resources.files(__package__).joinpath(HOOK).read_text(encoding="utf-8").strip()
    if found.read_text(encoding="utf-8").strip() != expected:
        return Hook(str(found), False, f"{found} is not this version's hook: child processes may not be patched")
    if sys.flags.no_site:
        return Hook(str(found), False, f"{found} is installed, but this interpreter runs without site (-S)")
    return Hook(str(found), True, f"{found}: child processes apply the patches {environment.ACTIVATE} names")


def exec_with_patches(command: list[str], ids: tuple[str, ...], options: dict[str, Any], force: bool) -> None:
    """Replace this process by ``command``, every Python process of which applies the same patches.

    Applying here first checks the ids, the options and the stack, and publishes HIGGS_PATCH_ACTIVATE
    for the children; nothing is imported, the patches stay pending in this process until exec.
    """
    from . import engine

    if not command or not command[0]:
        raise PatchError("no command to run: give one after --, e.g. higgs-patch run -- python train.py")
    hook = find_hook()
    if not hook.active:
        raise PatchError(
            f"higgs-patch run cannot patch the processes it starts: {hook.detail}. Reinstall the plugin (pip install . "
            "or pip install -e .), or call higgs_patch.apply() in your script instead"
        )
    engine.apply(*ids, force=force, **options)
    os.execvp(command[0], command)
