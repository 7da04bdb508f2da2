"""llama-layer-outputs (transformers 4.54 and later)

Symptom: none that shows. A Higgs Audio model with plain Llama decoder layers (``audio_adapter_type
="stack"``, or ``"dual_ffn"`` with DualFFN on some layers only; not the released layout) trains and
generates on batch row 0 alone: every other sample's hidden states are dropped after the first such
layer. From 5.0 those layers also stop writing the key/value cache in generation.

Cause: from 4.54 ``LlamaDecoderLayer.forward`` returns the hidden states as a bare tensor, where boson's
layer loop (``HiggsAudioModel._forward_core``) takes ``layer_outputs[0]``: the first batch row. And
boson passes the cache as ``past_key_value``, a name the layer stopped taking in 5.0 (``past_key_values``,
then ``cache`` from 5.24); an unknown keyword is swallowed without a word.

Change: while boson's layer loop runs, a Llama layer it calls gets its cache under the name it takes and
returns ``(hidden_states,)`` as it did before 4.54. Llama layers of every other model, and calls outside
that loop, are untouched.
"""

from __future__ import annotations

import contextvars
from typing import Any, Callable, Mapping

import torch

from . import CACHE_KEYWORDS, keyword, scope

_in_boson_loop: contextvars.ContextVar[bool] = contextvars.ContextVar("higgs_patch_boson_layer_loop", default=False)


#: Layer on ``HiggsAudioModel._forward_core``: its Llama layers are called the 4.46 way inside it.
scope_loop = scope(_in_boson_loop, "HiggsAudioModel._forward_core")


def tuple_outputs(original: Callable[..., Any], options: Mapping[str, Any]):
    """Layer on ``LlamaDecoderLayer.forward``: inside boson's loop, 4.46's keyword and 4.46's tuple."""
    cache = keyword(original, CACHE_KEYWORDS)

    def wrapper(wrapped, instance, args, kwargs):
        if not _in_boson_loop.get():
            return wrapped(*args, **kwargs)
        if "past_key_value" in kwargs and cache != "past_key_value":
            kwargs = dict(kwargs)
            kwargs[cache] = kwargs.pop("past_key_value")
        outputs = wrapped(*args, **kwargs)
        return (outputs,) if isinstance(outputs, torch.Tensor) else outputs

    return wrapper
