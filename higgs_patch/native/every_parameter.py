"""native-every-parameter

Symptom: under ``torchrun`` on data mixing text-only and audio samples, training of
``HiggsAudioV2ForConditionalGeneration`` hangs without an error at the first step where one rank's batch
has no audio (or only audio labels), with ``ddp_find_unused_parameters=False`` or gradient checkpointing.

Cause: a batch without audio never reaches ``embed_audio_tokens``, and without ``audio_labels`` the
audio head's logits are not in the loss; with ``audio_labels`` alone ``text_lm_head`` is not used.
Those parameters get no gradient in that step; DDP, told every parameter takes part, waits for them,
and the other ranks wait with it.

Change: in training with gradients on, the loss (or, without labels, the logits) gets the exact zero
sum of an empty view of every trainable parameter outside the decoder layers (embeddings, norm, heads):
values unchanged, and each of them receives a zero gradient in every step, as DDP expects. The decoder
layers' parameters are left alone: their DualFFN runs on empty selections and stays in the graph, and a
second path into a checkpointed layer would be a second gradient under reentrant checkpointing.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch


def keep_every_parameter(original: Callable[..., Any], options: Mapping[str, Any]):
    """Layer on ``HiggsAudioV2ForConditionalGeneration.forward``, outside native-loss."""

    def wrapper(wrapped, instance, args, kwargs):
        outputs = wrapped(*args, **kwargs)
        if not (instance.training and torch.is_grad_enabled()):
            return outputs
        inside = {id(p) for p in instance.model.layers.parameters()}
        outer = [p for p in instance.parameters() if p.requires_grad and id(p) not in inside]
        if not outer:
            return outputs
        zero = sum(p.flatten()[:0].sum() for p in outer)  # the sum of no element: exactly 0
        if isinstance(outputs, tuple):
            return (outputs[0] + zero.to(outputs[0].dtype), *outputs[1:])
        name = "loss" if outputs.get("loss") is not None else "logits"
        outputs[name] = outputs[name] + zero.to(outputs[name].dtype)
        return outputs

    return wrapper
