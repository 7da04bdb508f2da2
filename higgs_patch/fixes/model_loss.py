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
``higgs_audio_loss(outputs, batch)`` with the same settings returns it. With ``return_dict=False``
(or a config whose ``use_return_dict`` is False) the call returns upstream's tuple with the loss in
front, ``(loss, logits, ...)``, as Hugging Face causal LMs do: the Trainer reads ``outputs[0]``.
Calls without labels (generation, inference) are upstream's, untouched.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from ..loss import WEIGHTS, HiggsAudioLoss, higgs_audio_loss

LABELS = ("label_ids", "labels", "label_audio_ids")


def return_loss(original: Callable[..., Any], options: Mapping[str, Any]):
    weights = {name: options[name] for name in WEIGHTS}  # as loss.settings() reads them while applied

    def wrapper(wrapped, instance, args, kwargs):
        if not any(kwargs.get(name) is not None for name in LABELS):
            return wrapped(*args, **kwargs)
        as_tuple = not _returns_dict(instance, kwargs)
        outputs = wrapped(*args, **{**kwargs, "return_dict": True}) if as_tuple else wrapped(*args, **kwargs)
        if not isinstance(outputs, Mapping):
            return outputs
        if outputs.get("loss") is None:
            upstream = outputs.to_tuple() if as_tuple else ()
            result = higgs_audio_loss(outputs, kwargs, **weights)  # label smoothing: the Trainer's, while it computes
            if as_tuple:
                return (result.loss, *upstream)  # upstream's tuple, the loss first, as Hugging Face models return it
            put_first(outputs, fields(result))
        return outputs.to_tuple() if as_tuple else outputs

    return wrapper


def _returns_dict(model: Any, kwargs: Mapping[str, Any]) -> bool:
    """What upstream's forward returns for this call: a model output, or (``return_dict=False``) a tuple."""
    chosen = kwargs.get("return_dict")
    return bool(model.config.use_return_dict if chosen is None else chosen)


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
