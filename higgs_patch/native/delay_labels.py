"""native-delay-labels

Symptom: the text loss of ``HiggsAudioV2ForConditionalGeneration`` (``use_text_head=True``) trains the
text head to predict ``<|reserved_special_token_6|>`` after every audio segment, and under the Trainer
those tokens count in ``num_items_in_batch``.

Cause: ``HiggsAudioV2Processor(..., output_labels=True)`` writes -100 over ``<|AUDIO_OUT|>``, padding and
``<|audio_out_bos|>`` in ``labels``, but keeps the delay token (``audio_delay_token_id``) that stands for
the last K - 1 frames of every audio segment: audio positions, scored as text.

Change: after the processor, ``labels`` are -100 at every delay token too.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

IGNORE_INDEX = -100


def drop_delay_labels(original: Callable[..., Any], options: Mapping[str, Any]):
    """Layer on ``HiggsAudioV2Processor.__call__``."""

    def wrapper(wrapped, instance, args, kwargs):
        data = wrapped(*args, **kwargs)
        labels = data.get("labels")
        if labels is not None:
            labels = labels.clone()
            labels[data["input_ids"] == instance.audio_delay_token_id] = IGNORE_INDEX
            data["labels"] = labels
        return data

    return wrapper
