"""generation-attention-mask (transformers 5.18 and later)

Symptom: ``AttributeError: 'NoneType' object has no attribute 'dtype'`` in the first forward of
``HiggsAudioModel.generate`` (boson's ``merge_input_ids_with_audio_features`` is given no attention mask),
for a prompt without padding.

Cause: from 5.18 ``generate()`` replaces an attention mask of all ones by None before it starts the
decoding loop (the model is then expected to need none). Boson's loop and forward use the mask to
place the audio features and extend it by one at every step.

Change: boson's decoding loop (``HiggsAudioModel._sample``) gets the mask back that ``generate()``
dropped: all ones over the prompt, as ``generate()`` made it (``torch.long``, on the prompt's device).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

MASK = "attention_mask"


def restore_mask(original: Callable[..., Any], options: Mapping[str, Any]):
    """Layer on ``HiggsAudioModel._sample``."""

    def wrapper(wrapped, instance, args, kwargs):
        if MASK in kwargs and kwargs[MASK] is None:
            input_ids = args[0] if args else kwargs["input_ids"]
            kwargs = {**kwargs, MASK: torch.ones(input_ids.shape[:2], dtype=torch.long, device=input_ids.device)}
        return wrapped(*args, **kwargs)

    return wrapper
