"""native-audio-eos

Symptom: a fine-tuned ``HiggsAudioV2ForConditionalGeneration`` never learns to stop: greedy
``generate`` runs to ``max_new_tokens`` without one end-of-stream frame, however well the codes are learnt.

Cause: ``HiggsAudioV2Processor(..., output_labels=True)`` writes -100 over every end-of-stream code
(``audio_stream_eos_id``) in ``audio_labels``, as over the begin-of-stream ones. Nothing ever trains
the audio head to emit it.

Change: after the processor, each codebook of each audio segment supervises its first end-of-stream
code again (the one that ends the codebook's stream under the delay pattern); the begin-of-stream
codes, the end-of-stream codes that only pad the delay pattern, and the frames that pad the batch
stay -100. One EOS per segment and codebook, as boson's labels have it.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

IGNORE_INDEX = -100


def supervise_eos(original: Callable[..., Any], options: Mapping[str, Any]):
    """Layer on ``HiggsAudioV2Processor.__call__``."""

    def wrapper(wrapped, instance, args, kwargs):
        data = wrapped(*args, **kwargs)
        if data.get("audio_labels") is not None and data.get("audio_input_ids") is not None:
            data["audio_labels"] = with_eos(data["audio_labels"], data["audio_input_ids"],
                                            data.get("audio_input_ids_mask"), instance.audio_stream_eos_id)
        return data

    return wrapper


def with_eos(labels: torch.Tensor, codes: torch.Tensor, mask: torch.Tensor | None, eos: int) -> torch.Tensor:
    """``labels`` (batch, frames, codebooks) with each stream's first EOS code of ``codes`` supervised."""
    is_eos = codes == eos
    before = torch.nn.functional.pad(is_eos, (0, 0, 1, 0), value=False)[:, :-1]  # the same codebook, one frame earlier
    first = is_eos & ~before
    if mask is not None:
        first &= mask.to(first.device).bool()[..., None]
    labels = labels.clone()
    labels[first] = eos
    return labels
