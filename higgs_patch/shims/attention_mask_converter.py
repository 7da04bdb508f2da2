"""attention-mask-converter (transformers 5.24; 5.25 ships the module again)

Symptom: ``ModuleNotFoundError: No module named 'transformers.modeling_attn_mask_utils'`` when
boson_multimodal's model is imported.

Cause: boson imports ``AttentionMaskConverter`` from that module at module level, and uses two of its
static helpers in its forward: ``_ignore_causal_mask_sdpa`` (whether SDPA's own causal flag can stand
in for a mask) and ``_unmask_unattended`` (fully masked rows attend everywhere, for SDPA's
memory-efficient kernel on CUDA). 5.24 removed the module; its successor (``masking_utils``) has other
functions, with other arguments. 5.25 ships the module again, both helpers included: there the shim
is not needed (its ``[serves]`` ends before 5.25).

Change: ``transformers.modeling_attn_mask_utils`` exists again, with an ``AttentionMaskConverter``
holding those two helpers, written here to decide and compute exactly as 4.46's did. Revert removes
the module.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Mapping

import torch


class AttentionMaskConverter:
    """The two static helpers boson_multimodal calls, as transformers 4.46 defined them."""

    @staticmethod
    def _ignore_causal_mask_sdpa(attention_mask, inputs_embeds, past_key_values_length, sliding_window=None,
                                 is_training=False) -> bool:
        """True when SDPA's ``is_causal`` can replace the mask: nothing is padded and every query sees the same keys."""
        query_length = inputs_embeds.shape[1]
        key_value_length = query_length + past_key_values_length
        square = query_length == 1 or key_value_length == query_length
        within_window = sliding_window is None or key_value_length < sliding_window
        tracing = _tracing(inputs_embeds)
        if attention_mask is None:
            return (is_training or not tracing) and square and within_window
        if not within_window or attention_mask.dim() == 4 or tracing:
            return False
        return bool(torch.all(attention_mask == 1)) and square

    @staticmethod
    def _unmask_unattended(expanded_mask: torch.Tensor, min_dtype: float) -> torch.Tensor:
        """Rows of a float mask that attend to nothing attend to everything (SDPA's memory-efficient kernel)."""
        if expanded_mask.dtype == torch.bool:
            raise ValueError("AttentionMaskConverter._unmask_unattended expects a float `expanded_mask`, got a BoolTensor.")
        return expanded_mask.mul(~torch.all(expanded_mask == min_dtype, dim=-1, keepdim=True))


def _tracing(tensor: torch.Tensor) -> bool:
    return torch.jit.is_tracing() or isinstance(tensor, torch.fx.Proxy) or torch.compiler.is_compiling()


def converter_module(holder: ModuleType, options: Mapping[str, Any]) -> ModuleType:
    """The module ``transformers.modeling_attn_mask_utils`` for the package ``holder``."""
    module = ModuleType(f"{holder.__name__}.modeling_attn_mask_utils", "Put back by higgs_patch: " + __doc__.splitlines()[0])
    module.AttentionMaskConverter = AttentionMaskConverter
    return module
