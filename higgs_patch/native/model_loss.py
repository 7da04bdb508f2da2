"""native-loss

Symptom: under gradient accumulation one update of ``HiggsAudioV2ForConditionalGeneration`` is 0.24x to
2.54x the mean of its micro-batches, depending on how many audio frames the batch has per text label
(text head on or off, a bare model or LoRA); and the total is the text loss plus the *sum* of the
codebooks' losses, with no way to train boson's objective or see the components in the Trainer's logs.

Cause: the forward takes ``**kwargs``, so the Trainer counts ``num_items_in_batch`` from the text
``labels`` and hands it over; the forward divides the summed loss of every codebook (and the text's) by
that one count. A subclass or PEFT hands it over the same way.

Change: with labels, the loss is computed here from the same logits: each term the mean over its own
supervised tokens, whatever count the caller hands over (trainer-compute-loss then makes the update the
mean of its micro-batches, as for boson's model). ``native_objective``: ``"transformers"`` (default)
is upstream's total, text + the sum over codebooks; ``"boson"`` is boson's, (text + audio) / 2 with
audio the mean over every codebook's tokens, or ``native_text_loss_weight * text +
native_audio_loss_weight * audio`` when a weight is set (as model-loss's weights do). The components
reach the Trainer's logs (``text_loss``, ``audio_loss``, ``audio_loss_cb*``). Calls without labels are
upstream's, untouched.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F

from ..errors import OptionError
from ..loss import IGNORE_INDEX, HiggsAudioLoss, step_losses

log = logging.getLogger("higgs_patch")


def mean_loss(original: Callable[..., Any], options: Mapping[str, Any]):
    """Layer on ``HiggsAudioV2ForConditionalGeneration.forward``."""
    objective = options["native_objective"]
    weights = (options["native_text_loss_weight"], options["native_audio_loss_weight"])
    if objective != "boson" and any(w is not False for w in weights):
        raise OptionError("native_text_loss_weight and native_audio_loss_weight weigh boson's objective: "
                          "pass native_objective='boson' with them")
    names = list(inspect.signature(original).parameters)[1:]  # the positional order, without self

    def wrapper(wrapped, instance, args, kwargs):
        call = {**dict(zip(names, args)), **kwargs}
        labels, audio_labels = call.pop("labels", None), call.pop("audio_labels", None)
        if labels is None and audio_labels is None:
            return wrapped(*args, **kwargs)
        call.pop("num_items_in_batch", None)  # each term is a mean over its own tokens
        hidden: list[torch.Tensor] = []
        handle = instance.audio_lm_head.register_forward_hook(lambda module, given, out: hidden.append(given[0]))
        try:
            outputs = wrapped(**call)
        finally:
            handle.remove()
        result = score(instance, outputs[0], hidden[-1], call, labels, audio_labels, objective, weights)
        recorded = step_losses.get()
        if recorded is not None:
            recorded.append(result)
        if isinstance(outputs, tuple):
            return (result.loss, *outputs)
        return type(outputs)(loss=result.loss, **dict(outputs))

    return wrapper


def score(model: Any, logits: torch.Tensor, hidden: torch.Tensor, call: Mapping[str, Any], labels: Any,
          audio_labels: Any, objective: str, weights: tuple[Any, Any]) -> HiggsAudioLoss:
    """The loss of one forward: text and every codebook, each a mean over its supervised tokens."""
    text = audio = per_codebook = codebooks_total = None
    text_tokens = audio_tokens = 0
    if audio_labels is not None:
        sums, counts = _audio_terms(model, logits, call, audio_labels)
        audio_tokens = int(counts.sum())
        if audio_tokens:
            per_codebook = sums / counts  # NaN where a codebook has no supervised token
            audio = sums.sum() / audio_tokens
            codebooks_total = (sums / counts.clamp(min=1)).sum()  # upstream's: the sum of the codebooks' means
    if labels is not None:
        if model.text_lm_head is None:
            log.warning("(native-text-head-off) labels given to %s without a text head (use_text_head=False): "
                        "text labels are not scored", type(model).__name__)
        else:
            text_logits = model.text_lm_head(hidden)
            targets = F.pad(labels.to(text_logits.device)[:, 1:], (0, 1), value=IGNORE_INDEX)
            text_tokens = int((targets != IGNORE_INDEX).sum())
            if text_tokens:
                text = F.cross_entropy(text_logits.flatten(0, 1).float(), targets.flatten(),
                                       ignore_index=IGNORE_INDEX, reduction="sum") / text_tokens
    loss = _total(text, audio, codebooks_total, objective, weights)
    if loss is None:  # nothing supervised: an exact zero, in the graph
        loss = logits.flatten()[:0].sum()
    return HiggsAudioLoss(loss, _detached(text), _detached(audio), _detached(per_codebook), text_tokens, audio_tokens)


def _detached(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach()


def _total(text, audio, codebooks_total, objective: str, weights: tuple[Any, Any]):
    if objective == "transformers":
        present = [c for c in (text, codebooks_total) if c is not None]
        return sum(present[1:], present[0]) if present else None
    components = [(c, w) for c, w in zip((text, audio), weights) if c is not None]
    if not components:
        return None
    if all(w is False for w in weights):
        return sum(c for c, _ in components) / len(components)
    return sum(c * (1.0 if w is False else w) for c, w in components)


def _audio_terms(model: Any, logits: torch.Tensor, call: Mapping[str, Any], audio_labels: torch.Tensor):
    """Per codebook: the summed cross-entropy of the shifted audio labels, and how many were supervised."""
    codebooks, size = model.config.num_codebooks, model.config.codebook_size
    frames = call.get("audio_input_ids_mask")
    placeholder = model.model.get_placeholder_mask(call.get("input_ids"), call.get("inputs_embeds"), frames)
    audio_labels = audio_labels.to(logits.device)
    if placeholder is None:  # audio-only mode: the frames are the sequence
        expanded = audio_labels
    else:
        expanded = audio_labels.new_full((*placeholder.shape, codebooks), IGNORE_INDEX)
        expanded[placeholder.to(logits.device)] = (audio_labels[frames.to(logits.device).bool()] if frames is not None
                                                   else audio_labels.reshape(-1, codebooks))
    targets = F.pad(expanded[:, 1:], (0, 0, 0, 1), value=IGNORE_INDEX)  # position t holds the code at t + 1
    losses = F.cross_entropy(logits.reshape(-1, size).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                             reduction="none").view(targets.shape)
    return losses.sum((0, 1)), (targets != IGNORE_INDEX).sum((0, 1))
