"""evaluation-loss

Symptom: ``trainer.evaluate()`` returns no ``eval_loss``, without any error or warning, for a
Higgs Audio model inside the user's wrapper module (``forward(**kwargs)``), for a PEFT model made
without a task type, and for any of them, the bare model included, when the batch gives its text
labels only as ``labels``.

Cause: the Trainer scores an evaluation batch only if it carries every one of its ``label_names``,
which it reads from the signature of the outer model's forward: none for ``forward(**kwargs)``,
``labels`` for PEFT's causal-LM wrapper, ``label_ids`` and ``label_audio_ids`` for the bare model.

Change: for a model that holds a ``HiggsAudioModel`` (and no ``TrainingArguments.label_names`` of
the user's), a batch that does not carry the Trainer's label names but carries Higgs Audio labels
is evaluated with those as its label names: ``label_ids`` and ``label_audio_ids`` (the bare model's),
else ``labels``. The loss is the model's own, so it equals the bare model's ``eval_loss``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from .wrapper_checkpoints import holds_higgs_audio

#: The bare model's label names (its forward's), then what forward-kwargs-filter passes on as label_ids.
HIGGS_LABELS = ("label_ids", "label_audio_ids")
FALLBACK = ("labels",)


def label_higgs_batches(original: Callable[..., Any], options: Mapping[str, Any]):
    """Layer on ``Trainer.prediction_step``: a batch with Higgs Audio labels is scored."""

    def wrapper(wrapped, instance, args, kwargs):
        model, inputs = _bind(*args, **kwargs)
        names = instance.label_names
        if (instance.args.label_names is not None or not isinstance(inputs, Mapping) or not holds_higgs_audio(model)
                or (names and all(inputs.get(name) is not None for name in names))):
            return wrapped(*args, **kwargs)
        present = [n for n in HIGGS_LABELS if inputs.get(n) is not None] or [n for n in FALLBACK if inputs.get(n) is not None]
        if not present:
            return wrapped(*args, **kwargs)
        instance.label_names = present
        try:
            return wrapped(*args, **kwargs)
        finally:
            instance.label_names = names

    return wrapper


def _bind(model, inputs, prediction_loss_only=None, ignore_keys=None):
    return model, inputs
