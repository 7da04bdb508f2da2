"""trainer-compute-loss

Symptom: ``ValueError: The model did not return a loss from the inputs`` as soon as the Trainer
trains a Higgs Audio model; hand-written fixes then train with a dummy zero loss, copy the audio
targets (no shift), or take k times too large a step under k-step gradient accumulation.

Cause: ``HiggsAudioModel.forward`` returns logits and labels but ``loss=None``. And transformers
4.46 neither divides the loss by the accumulation steps nor passes ``num_items_in_batch`` for a
model whose forward takes no ``**loss_kwargs``: it only divides the value it logs.

Change: for a model that is, under its DDP / Accelerate / PEFT wrappers, a ``HiggsAudioModel``
returning no loss, compute :func:`higgs_patch.higgs_audio_loss`. Under accumulation over a window of
w micro-batches (w = the accumulation steps, or fewer in an epoch's last window, read where the
Trainer draws them) the gradient is scaled by 1 / w, so the update is that of one large batch, and
the value by steps / w, so the Trainer's own division of the logged value by the steps gives the
window's mean. Component losses reach the Trainer's logs at its logging steps. Every other model
goes to the original ``compute_loss``.
"""

from __future__ import annotations

import sys
import threading
import weakref
from typing import Any, Callable, Mapping

import torch

from ..loss import as_kwargs, higgs_audio_loss

HIGGS_MODULE = "boson_multimodal.model.higgs_audio.modeling_higgs_audio"


def compute_loss(original: Callable[..., Any], options: Mapping[str, Any]):
    weights = {name: _weight(options[name]) for name in ("text_loss_weight", "audio_loss_weight")}

    def wrapper(wrapped, instance, args, kwargs):
        model, inputs, return_outputs, num_items_in_batch = _bind(*args, **kwargs)
        if not _is_higgs_audio(instance, model):
            return wrapped(*args, **kwargs)
        batch = as_kwargs(inputs)
        labels = batch.pop("labels", None)
        if batch.get("label_ids") is None and labels is not None:
            batch["label_ids"] = labels
        outputs = model(**batch)
        if outputs.get("loss") is not None:
            loss = outputs["loss"]
        else:
            result = higgs_audio_loss(outputs, batch, **weights)
            loss = result.loss
            if model.training:
                _pending(instance).add(result.components())
        steps = instance.args.gradient_accumulation_steps
        window = _windows.get(instance, steps)
        if (steps > 1 or window > 1) and num_items_in_batch is None and model.training and torch.is_grad_enabled():
            loss = _Scale.apply(loss, steps / window, 1.0 / window)
        return (loss, outputs) if return_outputs else loss

    return wrapper


def remember_window(original: Callable[..., Any], options: Mapping[str, Any]):
    """Layer on ``Trainer.get_batch_samples``: how many micro-batches the next update accumulates."""

    def wrapper(wrapped, instance, args, kwargs):
        batches, num_items = wrapped(*args, **kwargs)
        if batches:
            _windows[instance] = len(batches)
        return batches, num_items

    return wrapper


def log_components(original: Callable[..., Any], options: Mapping[str, Any]):
    """Layer on ``Trainer.log``: training logs also carry the mean components since the last log."""

    def wrapper(wrapped, instance, args, kwargs):
        logs = args[0] if args else kwargs.pop("logs")
        if "loss" in logs:
            means = _pending(instance).drain()
            if means:
                logs = {**logs, **means}
        return wrapped(logs, *args[1:], **kwargs)

    return wrapper


def _bind(model, inputs, return_outputs=False, num_items_in_batch=None):
    return model, inputs, return_outputs, num_items_in_batch


def _weight(value: Any) -> float | None:
    return None if value is False or value is None else float(value)


def _is_higgs_audio(trainer: Any, model: Any) -> bool:
    module = sys.modules.get(HIGGS_MODULE)
    if module is None:
        return False
    accelerator = getattr(trainer, "accelerator", None)
    inner = accelerator.unwrap_model(model) if accelerator is not None else model
    if hasattr(inner, "get_base_model"):  # PEFT
        inner = inner.get_base_model()
    return isinstance(inner, module.HiggsAudioModel)


class _Scale(torch.autograd.Function):
    """Multiplies the value by ``value_scale`` and, independently, the gradient by ``grad_scale``."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, value_scale: float, grad_scale: float) -> torch.Tensor:
        ctx.grad_scale = grad_scale
        return tensor.view_as(tensor) if value_scale == 1.0 else tensor * value_scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.grad_scale, None, None


class _Components:
    """Sums of component losses over the micro-batches since the Trainer last logged."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}

    def add(self, components: dict[str, float]) -> None:
        with self._lock:
            for name, value in components.items():
                self._sums[name] = self._sums.get(name, 0.0) + value
                self._counts[name] = self._counts.get(name, 0) + 1

    def drain(self) -> dict[str, float]:
        with self._lock:
            means = {name: round(total / self._counts[name], 4) for name, total in self._sums.items()}
            self._sums.clear()
            self._counts.clear()
        return means


_windows: "weakref.WeakKeyDictionary[Any, int]" = weakref.WeakKeyDictionary()
_components: "weakref.WeakKeyDictionary[Any, _Components]" = weakref.WeakKeyDictionary()
_components_lock = threading.Lock()


def _pending(trainer: Any) -> _Components:
    with _components_lock:
        found = _components.get(trainer)
        if found is None:
            found = _components[trainer] = _Components()
        return found
