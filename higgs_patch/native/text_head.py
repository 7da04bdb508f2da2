"""native-text-head

Symptom: ``HiggsAudioV2ForConditionalGeneration.from_pretrained(dir)`` of a checkpoint trained with
``use_text_head=True`` loads without its ``text_lm_head``, and says nothing: the text loss and the
trained head are gone.

Cause: the head exists only when the constructor is given ``use_text_head=True``, which the config does
not remember, and the class lists ``text_lm_head.weight`` in ``_keys_to_ignore_on_load_unexpected``, so
the checkpoint's head is dropped without the usual warning.

Change: loading a local checkpoint whose weights hold ``text_lm_head.weight``, without ``use_text_head``
given, builds the model with the head and loads it, and logs that it did (``use_text_head=False``
given explicitly still drops it, as asked).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable, Mapping

log = logging.getLogger("higgs_patch")

HEAD = "text_lm_head.weight"


def keep_text_head(original: Callable[..., Any], options: Mapping[str, Any]):
    """Layer on ``HiggsAudioV2ForConditionalGeneration.from_pretrained`` (a classmethod)."""

    def wrapper(wrapped, instance, args, kwargs):
        path = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        if "use_text_head" not in kwargs and isinstance(path, (str, os.PathLike)):
            folder = os.path.join(path, kwargs.get("subfolder") or "")
            if os.path.isdir(folder) and has_text_head(folder):
                log.info("(native-text-head) %s holds a trained text_lm_head: loaded with use_text_head=True", folder)
                kwargs = {**kwargs, "use_text_head": True}
        return wrapped(*args, **kwargs)

    return wrapper


def has_text_head(folder: str) -> bool:
    """Whether the safetensors checkpoint in ``folder`` (single file or sharded) holds the text head."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as handle:
            return HEAD in json.load(handle).get("weight_map", {})
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(single):
        from safetensors import safe_open

        with safe_open(single, framework="pt") as weights:
            return HEAD in weights.keys()
    return False
