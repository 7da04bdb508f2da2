"""wrapper-state-dicts

Symptom: ``HiggsAudioModel.from_pretrained`` on the state dict of a module that holds the model (keys
prefixed by its attribute, as ``Trainer.save_model`` writes a wrapper without ``wrapper-checkpoints``)
fails with the misleading ``AssertionError: Padding_idx must be within num_embeddings`` or, with a
config.json beside it, loads freshly initialised weights (uninitialised memory on 5.x) with only
transformers' generic missing-keys warning.

Cause: ``from_pretrained`` matches keys by name, and strips only the class's own
``base_model_prefix``: none of a wrapper's prefixed keys is the model's.

Change: before a Higgs Audio class's ``from_pretrained`` loads a local checkpoint, the tensor names of
the file it would load are read (a safetensors header, a sharded checkpoint's index, a ``.bin``
loaded weights-only onto the meta device; ``subfolder=``, ``variant=`` and ``use_safetensors=False``
as transformers reads them, or a ``state_dict=`` given): where every key of the model carries a prefix
transformers would not strip, an ``InputError`` names the file and the prefix and says how to load it.
The patch has one target, in ``transformers.modeling_utils``: it is in force in a script that never
imports the Trainer.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable, Mapping

from ..errors import InputError
from .wrapper_checkpoints import HIGGS_MODULE

EMBEDDINGS = "embed_tokens.weight"  # every HiggsAudioModel state dict has it, at its top level

#: The files transformers loads a local checkpoint from, in the order it prefers them: (name, is an index).
SAFETENSORS = (("model.safetensors.index.json", True), ("model.safetensors", False))
PICKLED = (("pytorch_model.bin.index.json", True), ("pytorch_model.bin", False))


def refuse_prefixed_state_dict(original: Callable[..., Any], options: Mapping[str, Any]):
    """Layer on ``PreTrainedModel.from_pretrained``: a wrapper's state dict is named as such."""

    def wrapper(wrapped, instance, args, kwargs):
        module = sys.modules.get(HIGGS_MODULE)
        if module is not None and isinstance(instance, type) and issubclass(instance, module.HiggsAudioModel):
            path = args[0] if args else kwargs.get("pretrained_model_name_or_path")
            given = kwargs.get("state_dict")
            if isinstance(given, Mapping):
                _check_not_prefixed(set(given), "the state_dict passed to from_pretrained", True, instance)
            elif isinstance(path, (str, os.PathLike)) and os.path.isdir(path):
                folder = os.path.join(path, kwargs.get("subfolder") or "")
                keys, file = _checkpoint_keys(folder, kwargs.get("variant"), kwargs.get("use_safetensors"))
                _check_not_prefixed(keys, file, os.path.isfile(os.path.join(folder, "config.json")), instance)
        return wrapped(*args, **kwargs)

    return wrapper


def _check_not_prefixed(keys: set[str], file: str, has_config: bool, model_class: type) -> None:
    """Refuse a state dict whose keys carry a prefix that from_pretrained would not strip.

    transformers strips the class's own ``base_model_prefix`` when a config.json is there; any other
    prefix, or no config.json, would fail misleadingly or load freshly initialised weights.
    """
    if not keys or EMBEDDINGS in keys:
        return
    prefixes = sorted({key[: -len(EMBEDDINGS)] for key in keys if key.endswith("." + EMBEDDINGS)})
    if not prefixes:
        return
    prefix, class_name = prefixes[0], model_class.__name__
    if prefix == f"{model_class.base_model_prefix}." and has_config:
        return
    raise InputError(
        f"{file} is not a {class_name} checkpoint: it is the state dict of a module that holds the model, every "
        f"key of the model prefixed {prefix!r} (as Trainer.save_model writes a wrapper module without "
        f"higgs-patch's wrapper-checkpoints patch). Load it into that wrapper with "
        f"wrapper.load_state_dict(...) (safetensors.torch.load_file or torch.load of {file!r}; every shard an "
        f"index lists), then save the inner model with wrapper.{prefix.rstrip('.')}.save_pretrained(folder) and "
        f"load that folder with {class_name}.from_pretrained"
    )


def _checkpoint_keys(folder: str, variant: str | None, use_safetensors: bool | None) -> tuple[set[str], str]:
    """The tensor names of the checkpoint transformers would load from ``folder``, and its file."""
    layouts = PICKLED if use_safetensors is False else SAFETENSORS + PICKLED
    for name, is_index in layouts:
        file = os.path.join(folder, _with_variant(name, variant))
        if os.path.isfile(file):
            return (_index_keys(file) if is_index else _file_keys(file)), file
    return set(), folder


def _with_variant(name: str, variant: str | None) -> str:
    """transformers' naming: the variant goes before the last suffix (``model.fp16.safetensors``,
    ``model.safetensors.index.fp16.json``)."""
    if not variant:
        return name
    stem, _, suffix = name.rpartition(".")
    return f"{stem}.{variant}.{suffix}"


def _index_keys(file: str) -> set[str]:
    with open(file, encoding="utf-8") as handle:
        return set(json.load(handle).get("weight_map", {}))


def _file_keys(file: str) -> set[str]:
    if file.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(file, framework="pt") as handle:
            return set(handle.keys())
    import torch

    try:  # weights only: nothing in the file runs; the meta device and mmap: no tensor data is read
        return set(torch.load(file, map_location="meta", weights_only=True, mmap=True))
    except Exception:  # noqa: BLE001 - not a state dict torch can read so: transformers' own load says why
        return set()
