"""resume-rng-state

Symptom: ``trainer.train(resume_from_checkpoint=...)`` fails with ``UnpicklingError: Weights only
load failed`` in ``Trainer._load_rng_state`` (transformers 4.46 with torch 2.6 or later).

Cause: the checkpoint's ``rng_state.pth`` holds numpy's RNG state (an ndarray); transformers 4.46
loads it with ``torch.load``'s default, which torch 2.6 made weights-only, and numpy's types are not
on its allowlist. transformers 4.47 allowlists them around that one load (process-wide, for the
duration of the call).

Change: while ``Trainer._load_rng_state`` runs, the one ``torch.load`` it makes of that checkpoint's
``rng_state.pth`` / ``rng_state_<rank>.pth`` (read through the Trainer module's ``torch``, named in
the declaration) is first scanned with torch's own weights-only scanner: if the file holds nothing
but what torch allows and numpy's RNG state (ndarray, dtype), it is loaded; anything else is
refused, naming the file and the globals; a file torch cannot read (empty, truncated) is refused
naming the file and what to do. Nothing is added to torch's allowlist, so every other
``torch.load``, in any thread, is as strict as before. The declaration serves transformers 4.46
with torch 2.6 and later only: elsewhere the Trainer's load works as it is (4.47 on allowlists the
RNG state itself; an older torch's default is not weights-only), and the patch is not needed.
"""

from __future__ import annotations

import contextvars
import os
import pickle
import re
from typing import Any, Callable, Mapping

import torch

#: What numpy's RNG state needs beyond torch's weights-only allowlist (numpy 1 and 2 spell the module apart).
RNG_STATE_GLOBALS = frozenset({
    "numpy.ndarray", "numpy.dtype", "numpy.dtypes.UInt32DType",
    "numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct",
})
RNG_FILE = re.compile(r"rng_state(_\d+)?\.pth")

_checkpoint: contextvars.ContextVar[str | None] = contextvars.ContextVar("higgs_patch_rng_checkpoint", default=None)


def note_checkpoint(original: Callable[..., Any], options: Mapping[str, Any]):
    """Layer on ``Trainer._load_rng_state``: the checkpoint whose RNG file may be loaded, for this call."""

    def wrapper(wrapped, instance, args, kwargs):
        checkpoint = args[0] if args else kwargs.get("checkpoint")
        if checkpoint is None:
            return wrapped(*args, **kwargs)
        token = _checkpoint.set(os.path.abspath(checkpoint))
        try:
            return wrapped(*args, **kwargs)
        finally:
            _checkpoint.reset(token)

    return wrapper


def load_rng_state(original: Any, options: Mapping[str, Any]):
    """Layer on the Trainer module's ``torch.load``: that checkpoint's RNG file, and only it, is loaded."""

    def wrapper(wrapped, instance, args, kwargs):
        checkpoint = _checkpoint.get()
        if checkpoint is None or "weights_only" in kwargs or not args or not _is_rng_file(args[0], checkpoint):
            return wrapped(*args, **kwargs)
        try:
            found = torch.serialization.get_unsafe_globals_in_checkpoint(args[0])
        except Exception as error:  # empty, truncated, not a torch.save file: torch's bare error names no file
            raise pickle.UnpicklingError(
                f"{args[0]} is not the RNG state a Trainer writes: torch cannot read it ({type(error).__name__}: "
                f"{error}). It was not loaded. Delete it to resume without restoring the RNG state (the data order "
                "then differs from the uninterrupted run's), or put back the file the Trainer wrote"
            ) from error
        unexpected = sorted(set(found) - RNG_STATE_GLOBALS)
        if unexpected:
            raise pickle.UnpicklingError(
                f"{args[0]} is not the RNG state a Trainer writes: it also holds {', '.join(unexpected)}. "
                "It was not loaded. If you trust it, load it yourself with torch.load(path, weights_only=False); "
                "or delete it to resume without restoring the RNG state"
            )
        return wrapped(*args, **{**kwargs, "weights_only": False})

    return wrapper


def _is_rng_file(path: Any, checkpoint: str) -> bool:
    if not isinstance(path, (str, os.PathLike)):
        return False
    path = os.path.abspath(path)
    return os.path.dirname(path) == checkpoint and RNG_FILE.fullmatch(os.path.basename(path)) is not None
