"""sparse-text-logits (opt-in)

Symptom: out of memory inside the loss when fine-tuning (a 1.45 GiB allocation for logits of
2,076 x 128,256), and ~43 GB for LoRA on a model whose weights are a fraction of that.

Cause: ``HiggsAudioDecoderProjector.forward`` applies ``text_lm_head`` to every position of the
expanded sequence, batch x length x 128,256, and the loss's log-softmax and the logits' gradient are
each that size again. In text-to-speech fine-tuning only a handful of positions, around 2%, carry a
supervised text label; most of the sequence is audio.

Change: while a ``HiggsAudioModel`` trains with labels (training mode, ``label_ids`` or ``labels``
given, no cache, dict outputs), the projector applies ``text_lm_head`` only at the positions whose
next token is supervised. The output's ``logits`` is then that compact ``(K, vocab)`` tensor and
``text_logit_positions`` holds their flat positions ``b * length + t`` in the expanded sequence;
:func:`higgs_patch.higgs_audio_loss` consumes that form, with the same value and gradients as the
dense path. Evaluation, generation and calls without labels get upstream's outputs exactly.

The expanded labels are read where the model computes them (``merge_input_ids_with_audio_features``,
as the modeling module calls it) and handed to the projector through a context variable that lives
for one forward call.
"""

from __future__ import annotations

import contextvars
from typing import Any, Callable, Mapping

import torch

from ..loss import IGNORE_INDEX, next_token_targets

POSITIONS = "text_logit_positions"


class _Pass:
    """What one training forward call learns on its way: the expanded labels, then the positions."""

    labels: torch.Tensor | None = None
    positions: torch.Tensor | None = None


_current: contextvars.ContextVar[_Pass | None] = contextvars.ContextVar("higgs_patch_sparse_pass", default=None)


def activate(original: Callable[..., Any], options: Mapping[str, Any]):
    """Layer on ``HiggsAudioModel.forward``: open a sparse pass for a training call with labels."""

    def wrapper(wrapped, instance, args, kwargs):
        if not _wants_sparse(instance, kwargs):
            return wrapped(*args, **kwargs)
        state = _Pass()
        token = _current.set(state)
        try:
            outputs = wrapped(*args, **kwargs)
        finally:
            _current.reset(token)
        if state.positions is not None:
            outputs[POSITIONS] = state.positions
        return outputs

    return wrapper


def capture_labels(original: Callable[..., Any], options: Mapping[str, Any]):
    """Layer on the modeling module's ``merge_input_ids_with_audio_features``: keep the expanded labels."""

    def wrapper(wrapped, instance, args, kwargs):
        merged = wrapped(*args, **kwargs)
        state = _current.get()
        if state is not None:
            state.labels = merged[2]
        return merged

    return wrapper


def project_sparse(original: Callable[..., Any], options: Mapping[str, Any]):
    """Layer on ``HiggsAudioDecoderProjector.forward``: text logits only where text is supervised."""

    def wrapper(wrapped, instance, args, kwargs):
        state = _current.get()
        call = _bind(*args, **kwargs)
        if state is None or state.labels is None or instance.config.audio_decoder_proj_num_layers > 0 or call["use_cache"]:
            return wrapped(*args, **kwargs)
        hidden, audio_out_mask = call["hidden_states"], call["audio_out_mask"]
        targets = next_token_targets(state.labels).flatten()
        state.positions = (targets != IGNORE_INDEX).nonzero().squeeze(1)
        logits = instance.text_lm_head(hidden.flatten(0, 1).index_select(0, state.positions))
        audio_hidden = hidden[audio_out_mask]
        return (
            logits,
            instance.audio_lm_head(audio_hidden),
            () if call["output_attentions"] else None,
            () if call["output_hidden_states"] else None,
            audio_hidden if call["output_audio_hidden_states"] else None,
            None,
        )

    return wrapper


def _wants_sparse(model: Any, kwargs: dict) -> bool:
    has_labels = kwargs.get("label_ids") is not None or kwargs.get("labels") is not None
    return_dict = kwargs.get("return_dict")
    if return_dict is None:
        return_dict = model.config.use_return_dict
    return bool(model.training and has_labels and return_dict and not kwargs.get("use_cache"))


def _bind(
    hidden_states,
    audio_out_mask,
    label_audio_ids=None,
    attention_mask=None,
    position_ids=None,
    past_key_values=None,
    use_cache=None,
    output_attentions=None,
    output_hidden_states=None,
    output_audio_hidden_states=False,
    cache_position=None,
) -> dict[str, Any]:
    return dict(locals())
