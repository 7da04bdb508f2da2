"""whisper-layer-calls (transformers 5.0 and later)

Symptom: with the audio tower (``skip_audio_tower=False``, Whisper features in): from 5.0
``TypeError: WhisperEncoderLayer.forward() got an unexpected keyword argument 'layer_head_mask'`` (or,
under gradient checkpointing, ``takes 3 positional arguments but 5 were given``); from 5.18
``RuntimeError`` in the encoder's ``permute``, or worse, features of batch row 0 only.

Cause: boson's ``HiggsAudioEncoder.forward`` calls each Whisper layer as 4.46 did: ``(hidden_states,
attention_mask, layer_head_mask, output_attentions)``, positionally under gradient checkpointing, and
takes ``layer_outputs[0]``. 5.0 removed head masks from the layer; 5.18 also removed
``output_attentions`` and returns the hidden states as a bare tensor, whose ``[0]`` is the first row.

Change: while boson's encoder runs, a Whisper encoder layer it calls is given what it takes of that
call (a head mask other than None is an error: the installed layer cannot apply one) and returns a tuple
as before: ``(hidden_states,)``, with None for the attention weights when they were asked for and the
layer no longer gives them. Gradient checkpointing's recompute in backward, outside the encoder, makes
the same call with more positions than the layer takes: it is given what it takes too. Other calls of
Whisper layers are untouched.
"""

from __future__ import annotations

import contextvars
import inspect
from typing import Any, Callable, Mapping

import torch

from . import scope

#: The Whisper encoder layer's parameters as boson calls them (4.46's order).
CALLED_AS = ("hidden_states", "attention_mask", "layer_head_mask", "output_attentions")

_in_boson_encoder: contextvars.ContextVar[bool] = contextvars.ContextVar("higgs_patch_boson_encoder", default=False)

#: Layer on ``HiggsAudioEncoder.forward``: its Whisper layers are called the 4.46 way inside it.
scope_encoder = scope(_in_boson_encoder, "HiggsAudioEncoder.forward")


def call_as_before(original: Callable[..., Any], options: Mapping[str, Any]):
    """Layer on ``WhisperEncoderLayer.forward``: inside boson's encoder, 4.46's call and a tuple back."""
    parameters = inspect.signature(inspect.unwrap(original)).parameters
    takes = set(parameters)
    positional = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in parameters.values()) - 1  # self

    def wrapper(wrapped, instance, args, kwargs):
        inside = _in_boson_encoder.get()
        # Gradient checkpointing recomputes the layer in backward, outside the encoder, with 4.46's positional call.
        if not inside and len(args) <= positional:
            return wrapped(*args, **kwargs)
        called = {**dict(zip(CALLED_AS, args)), **kwargs}
        if called.get("layer_head_mask") is not None and "layer_head_mask" not in takes:
            raise ValueError("this transformers' WhisperEncoderLayer takes no head mask (removed in 5.0): "
                             "call the Higgs Audio encoder without head_mask")
        given = {name: value for name, value in called.items() if name in takes or name not in CALLED_AS}
        outputs = wrapped(given.pop("hidden_states"), given.pop("attention_mask", None), **given)
        if inside and isinstance(outputs, torch.Tensor):
            return (outputs, None) if called.get("output_attentions") else (outputs,)
        return outputs

    return wrapper
