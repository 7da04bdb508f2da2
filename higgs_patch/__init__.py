"""higgs-patch: versioned, gated, reversible run-time fixes that make Higgs Audio v2 train.

    import higgs_patch
    higgs_patch.apply()      # before or after boson_multimodal / transformers are imported

Importing this package imports neither torch, transformers nor boson_multimodal.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
from typing import TYPE_CHECKING, Any, Iterator

from . import engine, sourcetree
from .engine import PatchStatus, apply, revert, status
from .errors import (
    AudioIndexError,
    ConversionError,
    DataError,
    DeclarationError,
    IncompatibleUpstreamError,
    InputError,
    OptionError,
    PatchError,
    SampleError,
)

if TYPE_CHECKING:
    from .conversion import Conversion, convert
    from .fixes.collator_audio_index import AudioIndexCounts, audio_index_counts
    from .loss import HiggsAudioLoss, higgs_audio_loss
    from .samples import training_sample

# Imported on first use, so that ``import higgs_patch`` does not import torch.
_LAZY = {
    "higgs_audio_loss": "higgs_patch.loss",
    "HiggsAudioLoss": "higgs_patch.loss",
    "audio_index_counts": "higgs_patch.fixes.collator_audio_index",
    "AudioIndexCounts": "higgs_patch.fixes.collator_audio_index",
    "convert": "higgs_patch.conversion",
    "Conversion": "higgs_patch.conversion",
    "training_sample": "higgs_patch.samples",
}

try:
    __version__ = importlib.metadata.version("higgs-patch")
except importlib.metadata.PackageNotFoundError:  # pragma: no cover - running from a bare source tree
    __version__ = "0+unknown"

__all__ = [
    "AudioIndexCounts",
    "AudioIndexError",
    "Conversion",
    "ConversionError",
    "DataError",
    "DeclarationError",
    "HiggsAudioLoss",
    "IncompatibleUpstreamError",
    "InputError",
    "OptionError",
    "PatchError",
    "PatchStatus",
    "SampleError",
    "apply",
    "applied",
    "audio_index_counts",
    "convert",
    "higgs_audio_loss",
    "revert",
    "status",
    "training_sample",
    "__version__",
]


@contextlib.contextmanager
def applied(*ids: str, force: bool = False, **options: Any) -> Iterator[tuple[PatchStatus, ...]]:
    """Apply inside the block, revert after it what this call applied (not what was applied before)."""
    before = {s.id for s in status() if s.state in engine.ACTIVE}
    report = apply(*ids, force=force, **options)
    try:
        yield report
    finally:
        fresh = [s.id for s in report if s.id not in before]
        if fresh:
            revert(*fresh)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'higgs_patch' has no attribute {name!r}")


sourcetree.map_data_packages(__name__)  # run from a clone: patches/ and compat/ as the wheel maps them
