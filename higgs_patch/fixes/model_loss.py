"""model-loss

Symptom: ``KeyError: 'loss'`` (or ``outputs.loss`` is None) in a Trainer subclass that reads the
model's own loss, as the widely copied community trainers do; ``ValueError: The model did not return
a loss`` for a plain Trainer around a wrapper module that holds the model as ``.model``.

Cause: ``HiggsAudioModel.forward`` takes labels (``label_ids``, ``label_audio_ids``) but returns
``loss=None``, unlike every Hugging Face causal LM. A Trainer hook alone cannot help: a subclass that
overrides ``compute_loss`` never reaches it, and a wrapper module hides the model's class from it.

Change: when the forward is called with labels and returns a model output without a loss, the output
gets ``loss`` from :func:`higgs_patch.higgs_audio_loss` (shifted text and audio, the patch's weights,
the Trainer's label smoothing while it computes a loss), placed first as Hugging Face outputs have
it, and the components in upstream's own fields ``llm_loss``, ``audio_loss`` and ``codebook_losses``
(detached: they are for logs). The loss is computed once per forward: a later
``higgs_audio_loss(outputs, batch)`` with the same settings returns it. Calls without labels
(generation, inference) and ``return_dict=False`` tuples are upstream's, untouched.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from ..loss import HiggsAudioLoss, higgs_audio_loss, trainer_label_smoothing

LABELS = ("label_ids", "labels", "label_audio_ids")
WEIGHTS = ("text_loss_weight", "audio_loss_weight")


def return_loss(original: Callable[..., Any], options: Mapping[str, Any]):
    weights = {name: weight(options[name]) for name in WEIGHTS}

    def wrapper(wrapped, instance, args, kwargs):
        outputs = wrapped(*args, **kwargs)
        if not any(kwargs.get(name) is not None for name in LABELS) or not isinstance(outputs, Mapping):
            return outputs
        if outputs.get("loss") is not None:
            return outputs
        result = higgs_audio_loss(outputs, kwargs, **weights, label_smoothing=trainer_label_smoothing.get())
        put_first(outputs, fields(result))
        return outputs

    return wrapper


def weight(value: Any) -> float | None:
    return None if value is False or value is None else float(value)


def fields(result: HiggsAudioLoss) -> dict[str, Any]:
    return {
        "loss": result.loss,
        "llm_loss": result.text,
        "audio_loss": result.audio,
        "codebook_losses": result.audio_per_codebook,
    }


def put_first(outputs: Any, values: dict[str, Any]) -> None:
    """Set fields of a model output in front of the others, in order (``outputs[0]`` is the loss)."""
    for name, value in reversed(values.items()):
        if value is not None:
            outputs[name] = value
            outputs.move_to_end(name, last=False)
