"""rotary-buffers-on-load (transformers 5.0 and later)

Symptom: ``HiggsAudioModel.from_pretrained(...)`` gives a model whose rotary position frequencies
(``rotary_emb.inv_freq``) are uninitialised memory (values like 1e11 or 1e31): every position is
rotated at random, silently. Training and generation run; the logits are not the saved model's.

Cause: from 5.0, ``from_pretrained`` builds the model without its buffers' values and fills what
the checkpoint does not hold (``inv_freq`` is not persistent) through the model's
``_init_weights``. transformers' own computes a rotary embedding's frequencies from its config;
boson's override (``HiggsAudioPreTrainedModel._init_weights``) knows Linear, Conv1d and Embedding
modules only, and leaves them as allocated.

Change: after boson's ``_init_weights`` of a rotary embedding, transformers' own rule for that
module runs (``PreTrainedModel._init_weights``): the frequencies its config gives, as the model's
constructor computes them. Every other module gets boson's initialisation alone, as before.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping


def is_rotary_embedding(module: Any) -> bool:
    """What transformers' own ``_init_weights`` takes for a rotary embedding (from 5.0)."""
    return "RotaryEmbedding" in type(module).__name__ and hasattr(module, "original_inv_freq")


def compute_rotary_buffers(original: Callable[..., Any], options: Mapping[str, Any]):
    """Layer on ``HiggsAudioPreTrainedModel._init_weights``."""
    from transformers.modeling_utils import PreTrainedModel  # boson's module, being patched, has imported it

    def wrapper(wrapped, instance, args, kwargs):
        result = wrapped(*args, **kwargs)
        module = args[0] if args else kwargs["module"]
        if is_rotary_embedding(module):
            PreTrainedModel._init_weights(instance, module)
        return result

    return wrapper
