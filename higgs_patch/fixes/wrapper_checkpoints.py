"""wrapper-checkpoints

Symptom: ``trainer.save_model()`` (and every checkpoint ``save_steps`` writes) of a Higgs Audio
model held in the user's wrapper module is ``model.safetensors`` with every key prefixed
``model.`` and no ``config.json``; ``HiggsAudioModel.from_pretrained`` on it fails with the
misleading ``AssertionError: Padding_idx must be within num_embeddings`` or, with a config.json
beside it, loads freshly initialised weights with only a warning.

Cause: the Trainer saves ``save_pretrained`` only for a ``PreTrainedModel`` or ``PeftModel``;
anything else gets its plain state dict, keys named from the wrapper. ``from_pretrained`` matches
keys by name: none of the prefixed ones is the model's.

Change, for a Trainer whose model is a module holding one Higgs Audio model (bare or PEFT) and no
weights of its own:

- ``Trainer._save``: the inner model is what is saved (its ``save_pretrained``: config and keys
  without the wrapper's prefix, or the PEFT adapter); a state dict the Trainer gathered from the
  wrapper (DeepSpeed, FSDP) loses the prefix. A wrapper with weights of its own is saved as before,
  with a warning that says why.
- ``Trainer._load_from_checkpoint`` and ``Trainer._load_best_model``: a checkpoint with the inner
  model's config (or adapter config) is loaded into the inner model, so resume and
  ``load_best_model_at_end`` work; a checkpoint of the wrapper's own state dict loads as before.

A wrapper's state dict saved without this patch is refused by ``from_pretrained``: ``wrapper-state-dicts``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Callable, Iterator, Mapping

import torch

from .. import models

log = logging.getLogger("higgs_patch")

HIGGS_MODULE = models.CLASSES[models.BOSON][0]


def holds_higgs_audio(model: Any) -> bool:
    """Whether boson's ``HiggsAudioModel`` is anywhere in the module tree of ``model``."""
    return models.kind_of(model) == models.BOSON


CONFIGS = ("config.json", "adapter_config.json")


def save_inner_model(original: Callable[..., Any], options: Mapping[str, Any]):
    """Layer on ``Trainer._save``: a wrapper's checkpoint is its inner model's."""

    def wrapper(wrapped, instance, args, kwargs):
        output_dir, state_dict = _bind_save(*args, **kwargs)
        found = inner_model(instance.model)
        if found is None:
            return wrapped(*args, **kwargs)
        prefix, inner = found
        if state_dict is not None:
            state_dict = {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
        with _as_trainer_model(instance, inner):
            return wrapped(output_dir, state_dict=state_dict)

    return wrapper


def load_inner_model(original: Callable[..., Any], options: Mapping[str, Any]):
    """Layer on ``Trainer._load_from_checkpoint``: the inner model's checkpoint goes into the inner model."""

    def wrapper(wrapped, instance, args, kwargs):
        checkpoint, model = _bind_load(*args, **kwargs)
        found = inner_model(model if model is not None else instance.model)
        if found is None or not _has_config(checkpoint):
            return wrapped(*args, **kwargs)
        return wrapped(checkpoint, model=found[1])

    return wrapper


def load_best_inner_model(original: Callable[..., Any], options: Mapping[str, Any]):
    """Layer on ``Trainer._load_best_model``: likewise for ``load_best_model_at_end``."""

    def wrapper(wrapped, instance, args, kwargs):
        found = inner_model(instance.model)
        if found is None or not _has_config(instance.state.best_model_checkpoint):
            return wrapped(*args, **kwargs)
        with _as_trainer_model(instance, found[1]):
            return wrapped(*args, **kwargs)

    return wrapper


def inner_model(model: Any) -> tuple[str, torch.nn.Module] | None:
    """The Higgs Audio model (or the PEFT model around it) a wrapper holds, with its key prefix; None
    when the Trainer saves the model itself (a ``PreTrainedModel`` or ``PeftModel``) or it is no wrapper."""
    from transformers import PreTrainedModel

    kinds = _saveable()
    if isinstance(model, kinds) or not holds_higgs_audio(model):
        return None
    found = [(name, m) for name, m in model.named_modules() if name and isinstance(m, kinds) and holds_higgs_audio(m)]
    outermost = [(name, m) for name, m in found if not any(name.startswith(other + ".") for other, _ in found)]
    if len(outermost) != 1:
        log.warning("(wrapper-checkpoint) %s holds %d Higgs Audio models; its checkpoints are its own state dict",
                    type(model).__name__, len(outermost))
        return None
    name, inner = outermost[0]
    prefix = name + "."
    own = [key for key in model.state_dict() if not key.startswith(prefix)]
    if own:
        log.warning(
            "(wrapper-checkpoint) %s has weights of its own (%s): its checkpoints stay its whole state dict, keys "
            "prefixed %r, which %s.from_pretrained cannot load; save %s yourself for that",
            type(model).__name__, ", ".join(own[:3]), prefix, type(inner).__name__ if isinstance(inner, PreTrainedModel)
            else "PeftModel", f"model.{name}.save_pretrained(...)",
        )
        return None
    return prefix, inner


def _saveable() -> tuple[type, ...]:
    from transformers import PreTrainedModel

    try:
        from peft import PeftModel
    except ImportError:
        return (PreTrainedModel,)
    return (PreTrainedModel, PeftModel)


@contextlib.contextmanager
def _as_trainer_model(trainer: Any, inner: torch.nn.Module) -> Iterator[None]:
    outer = trainer.model
    trainer.model = inner
    try:
        yield
    finally:
        trainer.model = outer


def _has_config(checkpoint: Any) -> bool:
    return isinstance(checkpoint, (str, os.PathLike)) and any(
        os.path.isfile(os.path.join(checkpoint, name)) for name in CONFIGS)


def _bind_save(output_dir=None, state_dict=None):
    return output_dir, state_dict


def _bind_load(resume_from_checkpoint, model=None):
    return resume_from_checkpoint, model
