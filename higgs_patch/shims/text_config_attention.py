"""text-config-attention (transformers 4.54 and later)

Symptom: ``KeyError: None`` in the first forward of a Higgs Audio model with plain Llama decoder
layers (``audio_adapter_type="stack"``, or DualFFN on some layers only).

Cause: a Llama layer picks its attention function by its config's ``_attn_implementation``, here
boson's text config. Until 4.53 an unset implementation read as ``"eager"``; from 4.54 it reads as
None, and only the model's own config is set when the model is built, together with the sub-configs
it declares: ``HiggsAudioConfig`` declares none, so its text config stays None.

Change: when a ``HiggsAudioModel`` is built from a config whose text config has no attention
implementation, the text config gets ``"eager"``, what it read as on every line before 4.54 (so its
Llama layers compute as they did there). An implementation the user set is kept.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

#: What an unset implementation read as before transformers 4.54.
UNSET_READS_AS = "eager"


def default_text_attention(original: Callable[..., Any], options: Mapping[str, Any]):
    """Layer on ``HiggsAudioModel.__init__``: the text config's implementation is set before the model is built."""
    signature = inspect.signature(original)

    def wrapper(wrapped, instance, args, kwargs):
        config = signature.bind(instance, *args, **kwargs).arguments["config"]
        text_config = getattr(config, "text_config", None)
        if text_config is not None and text_config._attn_implementation is None:
            text_config._attn_implementation = UNSET_READS_AS
        return wrapped(*args, **kwargs)

    return wrapper
