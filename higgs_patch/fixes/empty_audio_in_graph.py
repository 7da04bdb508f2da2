"""empty-audio-in-graph

Symptom: under ``torchrun``, training hangs without an error at the first step in which one rank's
batch has no audio token, with ``ddp_find_unused_parameters=False`` (DDP's own advice) or with
gradient checkpointing (where the Trainer chooses ``False``).

Cause: upstream embeds a batch's audio codes (and runs its audio tower) even when there are none,
but ``merge_input_ids_with_audio_features`` drops a zero-length embedding, so the audio codebook
embeddings (and the tower) take no part in that step's graph. DDP with ``find_unused_parameters=False``
waits for their gradients, and the ranks that had audio wait for it.

Change: while gradients are enabled, the merged embeddings get the exact zero sum of every zero-length
audio embedding added: values unchanged, and each of those parameters receives a zero gradient in
every step, as DDP expects. (The heads are the loss's part: a component with nothing to score adds an
exact zero in the graph of its logits, see :mod:`higgs_patch.loss`.)
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

EMBEDDINGS = ("audio_features_embed", "audio_in_embed", "audio_out_embed")  # upstream's first, third, fifth argument


def keep_empty_audio(original: Callable[..., Any], options: Mapping[str, Any]):
    """Layer on the modeling module's ``merge_input_ids_with_audio_features``."""

    def wrapper(wrapped, instance, args, kwargs):
        merged = wrapped(*args, **kwargs)
        if not torch.is_grad_enabled():
            return merged
        empty = [e for e in _embeddings(args, kwargs) if e is not None and e.shape[0] == 0 and e.requires_grad]
        if not empty:
            return merged
        embeddings = merged[0]
        zero = sum(e.sum() for e in empty).to(embeddings.dtype)  # the sum of no element: exactly 0
        return (embeddings + zero, *merged[1:])

    return wrapper


def _embeddings(args: tuple, kwargs: dict) -> list:
    positional = dict(zip(("audio_features_embed", "audio_features_length", "audio_in_embed", "audio_in_ids_start",
                           "audio_out_embed"), args))
    return [kwargs.get(name, positional.get(name)) for name in EMBEDDINGS]
