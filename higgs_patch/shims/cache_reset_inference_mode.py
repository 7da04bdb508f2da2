"""cache-reset-inference-mode (transformers 4.56 and later)

Symptom: ``RuntimeError: Inplace update to inference tensor outside InferenceMode is not allowed``
from the second ``HiggsAudioServeEngine.generate`` (or ``generate_delta_stream``) on one engine, in
its ``_prepare_kv_caches`` (``kv_cache.reset()`` -> ``keys.zero_()``).

Cause: from 4.56 a static cache allocates its tensors at its first update, which happens inside
boson's ``HiggsAudioModel.generate``, decorated ``@torch.inference_mode()``: they are inference
tensors. The engine resets its caches before each generation under ``torch.no_grad()`` only, where
an inference tensor cannot change in place. Before 4.56 a static cache allocated its tensors when it
was built, as normal tensors, and the reset worked.

Change: ``Cache.reset()`` of a cache that holds an inference tensor runs in ``torch.inference_mode()``,
as the ``generate`` that filled it. Any other reset runs as it did (a reset that makes new tensors
must not make them inference tensors where autograd may use them later). Patched here rather than
in the engine's ``_prepare_kv_caches``: its module imports boson's audio tokenizer (torchaudio), and
any code that resets the caches it handed to boson's ``generate`` meets the same error.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch


def in_inference_mode(original: Callable[..., Any], options: Mapping[str, Any]):
    """Layer on ``Cache.reset``."""

    def wrapper(wrapped, instance, args, kwargs):
        if torch.is_inference_mode_enabled() or not _holds_inference_tensors(instance):
            return wrapped(*args, **kwargs)
        with torch.inference_mode():
            return wrapped(*args, **kwargs)

    return wrapper


def _holds_inference_tensors(cache: Any) -> bool:
    for layer in getattr(cache, "layers", None) or ():
        for tensor in vars(layer).values():
            if isinstance(tensor, torch.Tensor) and tensor.is_inference():
                return True
    return False
