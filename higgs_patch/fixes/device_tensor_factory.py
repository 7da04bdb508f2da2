"""device-tensor-factory

Symptom: ``Expected all tensors to be on the same device, but found at least two devices, cpu and
cuda:0`` from ``torch.cat`` in the collator when the samples' audio codes live on a GPU (on a
CPU-only machine the ``meta`` device shows the same failure).

Cause: the collator module creates the bos/eos columns, labels and offsets with ``torch.full``,
``torch.tensor``, ``torch.zeros`` ... and no ``device``, so they are always CPU tensors.

Change: while a collator call runs, the factories read through that module's ``torch`` (named in
the declaration) make their tensors on the device of the batch's audio codes, chosen per call; an
explicit ``device=`` is left alone. The batch is read once and handed on as a list, so a generator
reaches upstream whole. All-CPU batches take upstream's path untouched. The module's
``torch`` is a view only inside that module; every other user of torch sees nothing.
"""

from __future__ import annotations

import contextvars
from typing import Any, Callable, Mapping

import torch

from . import collator_batch

_device: contextvars.ContextVar[torch.device | None] = contextvars.ContextVar("higgs_patch_collate_device", default=None)


def choose_device(original: Callable[..., Any], options: Mapping[str, Any]):
    """Layer on the collator's ``__call__``: remember the device of this batch's audio codes."""

    def wrapper(wrapped, instance, args, kwargs):
        samples, args, kwargs = collator_batch(args, kwargs)
        device = _audio_device(samples)
        if device is None or device.type == "cpu":
            return wrapped(samples, *args, **kwargs)
        token = _device.set(device)
        try:
            return wrapped(samples, *args, **kwargs)
        finally:
            _device.reset(token)

    return wrapper


def place_on_device(original: Any, options: Mapping[str, Any]):
    """Layer on the module's ``torch``: factories without ``device=`` use the remembered device."""

    def wrapper(wrapped, instance, args, kwargs):
        device = _device.get()
        if device is not None and "device" not in kwargs:
            kwargs = {**kwargs, "device": device}
        return wrapped(*args, **kwargs)

    return wrapper


def _audio_device(batch: Any) -> torch.device | None:
    for sample in batch:
        codes = getattr(sample, "audio_ids_concat", None)
        if isinstance(codes, torch.Tensor) and codes.numel():
            return codes.device
    return None
