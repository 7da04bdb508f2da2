"""gradient-checkpointing (default on; inert until checkpointing is switched on)

Symptom: on the released config (no audio tower), ``model.gradient_checkpointing_enable()`` and
``TrainingArguments(gradient_checkpointing=True)`` raise ``ValueError: HiggsAudioModel is not
compatible with gradient checkpointing``. With an audio tower the call succeeds, but only the Whisper
encoder is checkpointed: the decoder layers, where the memory goes, keep every activation.

Cause: transformers switches checkpointing on by setting ``gradient_checkpointing`` on each module
that has that attribute, and raises when none has; ``HiggsAudioModel`` declares none, and its layer
loop (``_forward_core``) never calls a checkpoint function.

Change: the model gets the switch (``gradient_checkpointing = False``) when transformers sets it, so
both switches and ``gradient_checkpointing_disable()`` work and set the encoder's too; a model switched
on before ``apply()`` (possible with an audio tower) takes the tower's switch over at its next forward.
A revert that leaves a model switched on says so once (``(checkpointing-reverted)``). While such a
model trains with gradients, each of its decoder layers (DualFFN or Llama) runs under transformers'
checkpoint function, which carries ``use_reentrant`` and the user's other kwargs: keyword arguments
are bound to positions (reentrant checkpointing takes no keywords), and a layer input that needs no
gradient is given one, so that adapters inside reentrant checkpoints still get theirs when the
embeddings are frozen (LoRA). ``use_cache=True`` is turned off there, with one warning. PEFT's
``enable_input_require_grads()`` call, made when it wraps a model already checkpointing, finds the
text embeddings. Layers of other models, evaluation, generation and calls under ``torch.no_grad()``
are untouched.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import logging
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from .. import events, in_force

log = logging.getLogger("higgs_patch")

SWITCH = "gradient_checkpointing"  # transformers' name for a module's checkpointing flag


@dataclass(frozen=True)
class _Scope:
    """The layers of the model whose forward is running with checkpointing, and its checkpoint function."""

    layers: frozenset[int]
    checkpoint: Callable[..., Any]


_scope: contextvars.ContextVar[_Scope | None] = contextvars.ContextVar("higgs_patch_checkpoint_scope", default=None)
_warned_cache = False


def declare_switch(original: Callable[..., Any], options: Mapping[str, Any]):
    """Layer on ``HiggsAudioModel._set_gradient_checkpointing``: the model has the switch transformers sets.

    From transformers 4.52 some layers (``GradientCheckpointingLayer``: Llama's, Whisper's) checkpoint
    themselves when their own switch is on, and transformers sets it on every one of them. Inside a Higgs
    Audio model those layers are checkpointed already (its decoder layers here, the Whisper encoder's by
    the encoder): their own switch stays off, so that no layer is recomputed twice.
    """

    def wrapper(wrapped, instance, args, kwargs):
        if not hasattr(instance, SWITCH):
            setattr(instance, SWITCH, False)
        result = wrapped(*args, **kwargs)
        for module in _self_checkpointing(instance):
            setattr(module, SWITCH, False)
        if getattr(instance, SWITCH):
            _switched_on.add(instance)
        return result

    return wrapper


def _self_checkpointing(model: Any) -> list[Any]:
    """The layers of ``model`` that would checkpoint themselves (transformers' own mechanism, from 4.52)."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # transformers before 4.52: no layer checkpoints itself
        return []
    return [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]


def hook_text_embeddings(original: Callable[..., Any], options: Mapping[str, Any]):
    """Layer on ``HiggsAudioModel.enable_input_require_grads``: hook the text embeddings it cannot find.

    PEFT calls it when it wraps a model whose checkpointing is already on, and transformers' version
    asks ``get_input_embeddings()``, which ``HiggsAudioModel`` does not implement (NotImplementedError).
    Only this call learns where the embeddings are; ``get_input_embeddings()`` itself is left as it is.
    """

    def wrapper(wrapped, instance, args, kwargs):
        try:
            return wrapped(*args, **kwargs)
        except NotImplementedError:
            instance._require_grads_hook = instance.embed_tokens.register_forward_hook(_require_grad)
            return None

    return wrapper


def _require_grad(module, inputs, output) -> None:
    output.requires_grad_(True)


def scope_layers(original: Callable[..., Any], options: Mapping[str, Any]):
    """Layer on ``HiggsAudioModel._forward_core``: its decoder layers are checkpointed during this call.

    A layer recomputed in backward would write its keys and values into the cache a second time, so the
    layers run without one (the cache the forward returns stays empty), as transformers' own models do.
    """

    def wrapper(wrapped, instance, args, kwargs):
        if not checkpointing(instance):
            return wrapped(*args, **kwargs)
        cache = kwargs.get("past_key_values")
        if cache is not None and cache.get_seq_length() > 0:
            raise ValueError(
                f"gradient checkpointing recomputes each decoder layer in backward and cannot continue a key/value "
                f"cache that already holds {cache.get_seq_length()} positions; train without past_key_values, or "
                f"call model.gradient_checkpointing_disable() first"
            )
        if kwargs.get("use_cache"):
            _warn_cache_once()
        if cache is not None or kwargs.get("use_cache"):
            kwargs = {**kwargs, "use_cache": False, "past_key_values": None}
        token = _scope.set(_Scope(frozenset(map(id, instance.layers)), instance._gradient_checkpointing_func))
        try:
            return wrapped(*args, **kwargs)
        finally:
            _scope.reset(token)

    return wrapper


def checkpoint_layer(original: Callable[..., Any], options: Mapping[str, Any]):
    """Layer on a decoder layer's ``forward``: run it under the checkpoint function of its model's scope."""
    parameters = list(inspect.signature(original).parameters.values())[1:]  # without self
    signature = inspect.Signature(parameters)

    def wrapper(wrapped, instance, args, kwargs):
        scope = _scope.get()
        if scope is None or id(instance) not in scope.layers:
            return wrapped(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        hidden_states, *rest = bound.args
        if not hidden_states.requires_grad:
            hidden_states = hidden_states.detach().requires_grad_()
        function = functools.partial(wrapped, **bound.kwargs) if bound.kwargs else wrapped
        return scope.checkpoint(function, hidden_states, *rest)

    return wrapper


def checkpointing(model: Any) -> bool:
    """Whether ``model`` recomputes its decoder layers in this call: switched on, training, with gradients."""
    return bool(model.training and torch.is_grad_enabled() and _switch(model))


def _switch(model: Any) -> bool:
    """The model's switch. A model switched on before apply() has none of its own: upstream's switch then
    set only its audio tower's, and the model takes that over (checkpoint function included), so the
    decoder follows the switch whichever came first; ``gradient_checkpointing_disable()`` turns off both."""
    if not hasattr(model, SWITCH):
        tower = getattr(model, "audio_tower", None)
        if not getattr(tower, SWITCH, False):
            return False
        model._gradient_checkpointing_func = tower._gradient_checkpointing_func
        setattr(model, SWITCH, True)
    if getattr(model, SWITCH):
        _switched_on.add(model)
        return True
    return False


def _tell_if_reverted() -> None:
    """Once the patch is gone: say that models still switched on no longer recompute their decoder layers."""
    if in_force.options(PATCH) is not None:
        return
    models = [model for model in list(_switched_on) if getattr(model, SWITCH, False)]
    _switched_on.clear()
    if models:
        log.warning(
            "(checkpointing-reverted) the gradient-checkpointing patch is no longer applied (reverted, or its module "
            "reloaded): %d model(s) with checkpointing "
            "switched on (is_gradient_checkpointing is True) no longer recompute their decoder layers in backward "
            "(upstream checkpoints only the audio tower). Call model.gradient_checkpointing_disable() to make the "
            "switch say so, or higgs_patch.apply() again to recompute them", len(models),
        )


PATCH = "gradient-checkpointing"  # this module's patch (patches/gradient-checkpointing.toml)
_switched_on: "weakref.WeakSet[Any]" = weakref.WeakSet()  # models seen with checkpointing on while applied
events.listen(events.APPLIED_CHANGED, _tell_if_reverted)


def _warn_cache_once() -> None:
    global _warned_cache
    if not _warned_cache:
        _warned_cache = True
        log.warning(
            "(checkpointing-disables-cache) use_cache=True is incompatible with gradient checkpointing while "
            "training; the decoder layers of HiggsAudioModel run without a cache (logged once per process)"
        )
