"""forward-kwargs-filter

Symptom: ``HiggsAudioModel.forward() got an unexpected keyword argument 'labels'`` as soon as the
Trainer, or PEFT's causal-LM wrapper (which passes ``labels=`` on every call), calls the model.

Cause: the forward names its labels ``label_ids`` / ``label_audio_ids`` and takes no ``**kwargs``,
while the Hugging Face stack adds ``labels``, ``num_items_in_batch`` and whatever else it likes.

Change: drop the keyword arguments the forward does not accept, each name logged once per process;
pass ``labels`` on as ``label_ids`` when no ``label_ids`` is given. ``label_ids`` itself is kept:
without it the model returns no ``expanded_labels`` and text labels no longer line up with the
expanded logits (the seed dropped it). The accepted names come from the original forward's own
signature, once, never from a wrapper's (PEFT's would drop every audio input).
"""

from __future__ import annotations

import inspect
import logging
import threading
from typing import Any, Callable, Mapping

log = logging.getLogger("higgs_patch")

_reported: set[str] = set()
_reported_lock = threading.Lock()


def filter_kwargs(original: Callable[..., Any], options: Mapping[str, Any]):
    parameters = inspect.signature(original).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return _pass_through
    accepted = frozenset(p.name for p in parameters)

    def wrapper(wrapped, instance, args, kwargs):
        if accepted.issuperset(kwargs):
            return wrapped(*args, **kwargs)
        kwargs = dict(kwargs)
        if "labels" not in accepted and kwargs.get("labels") is not None and kwargs.get("label_ids") is None:
            kwargs["label_ids"] = kwargs.pop("labels")
            _report_once("labels->label_ids", "passing 'labels' to HiggsAudioModel.forward as 'label_ids'")
        dropped = sorted(name for name in kwargs if name not in accepted)
        for name in dropped:
            del kwargs[name]
            _report_once(name, f"dropping keyword argument {name!r}: HiggsAudioModel.forward does not accept it")
        return wrapped(*args, **kwargs)

    return wrapper


def _pass_through(wrapped, instance, args, kwargs):
    return wrapped(*args, **kwargs)


def _report_once(key: str, message: str) -> None:
    with _reported_lock:
        if key in _reported:
            return
        _reported.add(key)
    log.info("%s (logged once per process)", message)
