"""llama-attention-classes (transformers 4.48 and later)

Symptom: ``ImportError: cannot import name 'LLAMA_ATTENTION_CLASSES' from
'transformers.models.llama.modeling_llama'`` when boson_multimodal's model is imported, before any
of its code runs.

Cause: transformers 4.48 folded LlamaAttention, LlamaSdpaAttention and LlamaFlashAttention2 into
one LlamaAttention that picks its attention function from its config at every call, and dropped the
table boson imports at module level and indexes with the model's attention implementation. The new
forward returns (output, weights) where boson unpacks three values (output, weights, cache), and
names its cache argument ``past_key_values`` from 4.56 and ``cache`` from 5.24, where boson passes
``past_key_value`` (an unknown keyword is swallowed silently: the cache would never be written).

Change: the module gets the table back, one class per implementation 4.46 had, named as 4.46 named
them. Each is a LlamaAttention (same weights, same state-dict keys) that runs the implementation
its name says, whatever the text config says (4.46's LlamaSdpaAttention ran SDPA although boson's
text config said eager), takes 4.46's call, hands the cache on under the name the installed
LlamaAttention takes, and returns 4.46's three values (the cache it was given as the third, as
4.46 did). Revert removes the table. Each class is made once per LlamaAttention and found by its name
on this module, so a model holding such layers deep-copies, pickles and ``torch.save``s.
"""

from __future__ import annotations

import copy
import functools
from types import ModuleType
from typing import Any, Mapping

from . import CACHE_KEYWORDS, keyword

#: 4.46's table: implementation name -> the class name it had there.
CLASS_NAMES = {"eager": "LlamaAttention", "flash_attention_2": "LlamaFlashAttention2", "sdpa": "LlamaSdpaAttention"}


def attention_classes(holder: ModuleType, options: Mapping[str, Any]) -> dict[str, type]:
    """``LLAMA_ATTENTION_CLASSES`` for ``transformers.models.llama.modeling_llama`` (``holder``)."""
    base = holder.LlamaAttention
    cache = keyword(base.forward, CACHE_KEYWORDS)
    return {implementation: _adapter(base, implementation, name, cache) for implementation, name in CLASS_NAMES.items()}


def __getattr__(name: str) -> type:
    """A class of the table by its 4.46 name: what pickle looks up to save (and load) a layer of it."""
    implementation = {class_name: key for key, class_name in CLASS_NAMES.items()}.get(name)
    if implementation is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from transformers.models.llama import modeling_llama

    return attention_classes(modeling_llama, {})[implementation]


@functools.cache  # one class per base and implementation: the one pickle finds by name is the one the layers have
def _adapter(base: type, implementation: str, name: str, cache_keyword: str) -> type:
    def __init__(self, config, layer_idx=None):
        pinned = copy.copy(config)  # this layer's own view: the implementation is the class's, as on 4.46
        pinned._attn_implementation = implementation
        base.__init__(self, pinned, layer_idx)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None,
                output_attentions=False, use_cache=False, cache_position=None, position_embeddings=None, **kwargs):
        output, weights = base.forward(
            self, hidden_states=hidden_states, position_embeddings=position_embeddings, attention_mask=attention_mask,
            position_ids=position_ids, output_attentions=output_attentions, use_cache=use_cache,
            cache_position=cache_position, **{cache_keyword: past_key_value}, **kwargs,
        )
        return output, weights, past_key_value

    doc = f"LlamaAttention running {implementation!r} attention, called and returning as 4.46's {name} did."
    return type(name, (base,), {"__init__": __init__, "forward": forward, "__doc__": doc, "__module__": __name__,
                                "__qualname__": name})
