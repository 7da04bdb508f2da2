"""Process start-up: patches in every process, the way coverage.py measures subprocesses.

``higgs_patch.pth`` (installed at the top of site-packages) runs one line at every interpreter
start: it does nothing unless ``HIGGS_PATCH_ACTIVATE`` is set, so an inactive install costs one
environment lookup and imports nothing. When set (by ``higgs-patch run``, or by ``apply()`` in a
parent process), it holds the patches and options to apply, and this module applies them; the
patches wait, pending, for their modules to be imported. Spawned DataLoader workers, torchrun ranks
and any other child inherit the variable, so they patch themselves before unpickling anything.
"""

from __future__ import annotations

import json
import os
from typing import Any

from . import environment

_started = False


def encode(patches: dict[str, dict[str, Any]], force: bool) -> str:
    return json.dumps({"patches": patches, "force": force}, sort_keys=True)


def decode(value: str) -> tuple[dict[str, dict[str, Any]], bool]:
    data = json.loads(value)
    return dict(data["patches"]), bool(data.get("force", False))


def process_startup() -> None:
    """Apply what HIGGS_PATCH_ACTIVATE asks for; idempotent (a .pth can run twice)."""
    global _started
    value = os.environ.get(environment.ACTIVATE)
    if _started or not value:
        return
    _started = True
    from . import engine

    patches, force = decode(value)
    if not patches:
        return
    options = {name: setting for chosen in patches.values() for name, setting in chosen.items()}
    engine.apply(*patches, force=force, **options)  # one call: atomic, as in the parent


def exec_with_patches(command: list[str], ids: tuple[str, ...], options: dict[str, Any], force: bool) -> None:
    """Replace this process by ``command``, every Python process of which applies the same patches.

    Applying here first checks the ids, the options and the stack, and publishes HIGGS_PATCH_ACTIVATE
    for the children; nothing is imported, the patches stay pending in this process until exec.
    """
    from . import engine

    engine.apply(*ids, force=force, **options)
    os.execvp(command[0], command)
