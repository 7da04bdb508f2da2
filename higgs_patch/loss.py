"""The Higgs Audio training loss, as one public function the Trainer hook and user code share.

Labels are aligned with inputs, not shifted: logits at t predict the token at t + 1, for text
(``expanded_labels``) and for audio (``label_audio_ids`` along the concatenated audio-out stream,
where every segment starts with -100, so one shift never crosses into the next segment). We shift
the labels, never the logits: slicing then reshaping, or boolean-mask indexing, would copy logits
that are gigabytes at training lengths. All codebooks are scored in one call.

With the opt-in ``sparse-text-logits`` patch the model's ``logits`` are compact, one row per
supervised text position, listed in ``text_logit_positions``; the same function scores them.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import weakref
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F

from . import in_force
from .errors import InputError

log = logging.getLogger("higgs_patch")

IGNORE_INDEX = -100

#: The Trainer's ``label_smoothing_factor`` while it computes a loss for a Higgs Audio model: set by
#: trainer-compute-loss around its training and prediction steps and its compute_loss.
trainer_label_smoothing: ContextVar[float] = ContextVar("higgs_patch_label_smoothing", default=0.0)
#: The losses computed during one Trainer training step, for its logs (opened by trainer-compute-loss).
step_losses: ContextVar["list[HiggsAudioLoss] | None"] = ContextVar("higgs_patch_step_losses", default=None)

#: The patch whose options weight the total (patches/model-loss.toml), and the names of those options.
WEIGHTS_PATCH = "model-loss"
WEIGHTS = ("text_loss_weight", "audio_loss_weight")

_CACHE = "_higgs_patch_losses"  # attribute of a model output: the losses already computed from it


@dataclass(frozen=True)
class HiggsAudioLoss:
    """The loss to back-propagate and its components (detached, for logging).

    A component is None when the batch supervises none of its tokens.
    """

    loss: torch.Tensor
    text: torch.Tensor | None
    audio: torch.Tensor | None
    audio_per_codebook: torch.Tensor | None
    text_tokens: int
    audio_tokens: int

    def components(self) -> dict[str, float]:
        """The components as plain numbers, named as they appear in the Trainer's logs."""
        found: dict[str, float] = {}
        if self.text is not None:
            found["text_loss"] = float(self.text)
        if self.audio is not None:
            found["audio_loss"] = float(self.audio)
            for index, value in enumerate(self.audio_per_codebook.tolist()):
                if value == value:  # NaN marks a codebook without supervised tokens
                    found[f"audio_loss_cb{index}"] = value
        return found


@dataclass(frozen=True)
class LossSettings:
    """The objective a loss trains: each weight (None: off) and the label smoothing."""

    text_loss_weight: float | None
    audio_loss_weight: float | None
    label_smoothing: float


def settings(
    text_loss_weight: float | bool | None = None,
    audio_loss_weight: float | bool | None = None,
    label_smoothing: float | None = None,
) -> LossSettings:
    """The objective a Higgs Audio loss computed now trains, whoever computes it.

    Each setting comes from the first of: the keyword given here (a weight ``False`` is off); the options
    of the applied ``model-loss`` patch (``apply(audio_loss_weight=...)``); for label smoothing, the
    Trainer's ``label_smoothing_factor`` while it computes a loss; else off (the mean of the components,
    no smoothing). After ``revert()`` no patch is applied: only keywords count.
    """
    applied = in_force.options(WEIGHTS_PATCH) or {}
    weights = [_weight(name, value if value is not None else applied.get(name, False))
               for name, value in zip(WEIGHTS, (text_loss_weight, audio_loss_weight))]
    if label_smoothing is None:
        label_smoothing = trainer_label_smoothing.get()
    if isinstance(label_smoothing, bool) or not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be a number in [0, 1), got {label_smoothing!r}")
    return LossSettings(*weights, float(label_smoothing))


def _weight(name: str, value: Any) -> float | None:
    if value is False:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise ValueError(f"{name} must be a finite number >= 0, or False (the mean of the components); got {value!r}")
    return float(value)


def higgs_audio_loss(
    outputs: Any,
    batch: Any,
    *,
    text_loss_weight: float | bool | None = None,
    audio_loss_weight: float | bool | None = None,
    label_smoothing: float | None = None,
) -> HiggsAudioLoss:
    """Cross-entropy of a ``HiggsAudioModel`` output against the batch it was computed from.

    ``outputs`` is the model's output (it must carry ``expanded_labels`` whenever the batch has
    ``label_ids``, and one row of ``audio_logits`` per audio-out token whenever it has
    ``label_audio_ids``: a missing one is an error, never a silently dropped component); ``batch``
    is the collated batch, a mapping or upstream's ``HiggsAudioBatchInput``.
    The total is the mean of the components that have supervised tokens; with either weight set it
    is the weighted sum ``text_loss_weight * text + audio_loss_weight * audio`` instead (a weight that
    is off counts 1). With no supervised token at all the loss is an exact zero, still connected to
    the graph, and a warning is logged. ``label_smoothing`` smooths text and audio targets as the
    Trainer's ``label_smoothing_factor`` does. A setting not given is the one in force (:func:`settings`):
    the weights ``apply()`` gave the model-loss patch, the Trainer's label smoothing in its steps.

    The result is remembered on ``outputs``: asking again with the same settings for the very tensors
    it scored (logits, audio logits, expanded labels, audio labels; unchanged in place) returns it
    instead of scoring twice (the model's own loss, then a trainer's call).
    """
    chosen = settings(text_loss_weight, audio_loss_weight, label_smoothing)
    _check_inputs(outputs, batch)
    scored = _scored_tensors(outputs, batch)
    result = _remembered(outputs, scored, chosen)
    if result is None:
        result = _score(outputs, batch, chosen)
        _remember(outputs, scored, chosen, result)
    recorded = step_losses.get()
    if recorded is not None and all(item is not result for item in recorded):
        recorded.append(result)
    return result


def _score(outputs: Any, batch: Any, chosen: LossSettings) -> HiggsAudioLoss:
    text_loss_weight, audio_loss_weight = chosen.text_loss_weight, chosen.audio_loss_weight
    text_sum, text_count = _text_terms(outputs, batch, chosen.label_smoothing)
    audio_sum, audio_count, per_codebook = _audio_terms(outputs, batch, chosen.label_smoothing)
    text_tokens, audio_tokens = _host_counts(text_count, audio_count)

    text = text_sum / text_tokens if text_tokens else None
    audio = audio_sum / audio_tokens if audio_tokens else None
    present = [c for c in (text, audio) if c is not None]
    if not present:
        log.warning("(no-supervised-tokens) batch has no supervised text or audio token; its loss is 0")
        total = text_sum + audio_sum  # exact zeros, connected to the graph
    else:
        if text_loss_weight is None and audio_loss_weight is None:
            total = sum(present) / len(present)
        else:
            weights = (1.0 if text_loss_weight is None else text_loss_weight,
                       1.0 if audio_loss_weight is None else audio_loss_weight)
            total = sum(w * c for w, c in zip(weights, (text, audio)) if c is not None)
        # A head with nothing to score still takes part (DDP waits for every parameter): its exact zero.
        for unscored, count in ((text_sum, text_tokens), (audio_sum, audio_tokens)):
            if not count:
                total = total + unscored.to(total.dtype)
    return HiggsAudioLoss(
        loss=total,
        text=None if text is None else text.detach(),
        audio=None if audio is None else audio.detach(),
        audio_per_codebook=None if audio is None else per_codebook.detach(),
        text_tokens=text_tokens,
        audio_tokens=audio_tokens,
    )


def _host_counts(text_count: torch.Tensor, audio_count: torch.Tensor) -> tuple[int, int]:
    """The supervised token counts as Python ints, which decide the components present. Read outside
    any compiled graph: torch 2.9's dynamo otherwise raises GuardOnDataDependentSymNode on the branch."""
    if torch.compiler.is_compiling():
        return _outside_the_graph()(text_count, audio_count)
    return _counts(text_count, audio_count)


def _counts(text_count: torch.Tensor, audio_count: torch.Tensor) -> tuple[int, int]:
    text_tokens, audio_tokens = torch.stack([text_count, audio_count]).tolist()
    return int(text_tokens), int(audio_tokens)


@functools.cache
def _outside_the_graph() -> Callable[[torch.Tensor, torch.Tensor], tuple[int, int]]:
    return torch.compiler.disable(_counts)  # made on first use: the decorator imports dynamo (seconds)


#: What a loss is computed from: fields of the model output, then of the batch.
_SCORED_OUTPUTS = ("logits", "audio_logits", "expanded_labels", "text_logit_positions")
_SCORED_BATCH = ("label_audio_ids",)


def _scored_tensors(outputs: Any, batch: Any) -> tuple["_Scored", ...]:
    found = [field(outputs, name) for name in _SCORED_OUTPUTS] + [field(batch, name) for name in _SCORED_BATCH]
    return tuple(_Scored(value) for value in found)


def _remembered(outputs: Any, scored: tuple["_Scored", ...], chosen: LossSettings) -> HiggsAudioLoss | None:
    for then, settings_then, result in getattr(outputs, _CACHE, ()):
        if settings_then == chosen and all(old.same_as(new.value()) for old, new in zip(then, scored)):
            return result
    return None


class _Scored:
    """One field the loss read, held weakly (a cache entry keeps no logits alive), with its in-place version."""

    __slots__ = ("_ref", "_version")

    def __init__(self, value: Any) -> None:
        self._version = _in_place_version(value)
        try:
            self._ref = weakref.ref(value) if value is not None else None
        except TypeError:  # not a tensor (the checks or the scoring refuse it): held as it is
            self._ref = lambda: value

    def value(self) -> Any:
        return None if self._ref is None else self._ref()

    def same_as(self, value: Any) -> bool:
        """Whether ``value`` is the very object read then, unchanged in place since."""
        if self._ref is None:
            return value is None
        return (value is not None and self._ref() is value and self._version is not None
                and _in_place_version(value) == self._version)


def _in_place_version(value: Any) -> int | None:
    """How often ``value`` was changed in place; None where torch does not count it (a tensor made under
    ``torch.inference_mode()``, whose ``_version`` raises): such a field is scored afresh every time."""
    if isinstance(value, torch.Tensor) and value.is_inference():
        return None
    return getattr(value, "_version", 0)


class _Remembered(tuple):
    """The losses remembered on an output. Its entries hold the scored tensors weakly, which nothing can
    copy or pickle: a copy of the output (``copy.deepcopy``, ``pickle``, ``torch.save``) remembers nothing,
    as a plain empty tuple, which needs no plugin to unpickle. Its tensors are new ones anyway."""

    __slots__ = ()

    def __reduce__(self):
        return tuple, ()

    def __deepcopy__(self, memo):
        return ()


def _remember(outputs: Any, scored: tuple, chosen: LossSettings, result: HiggsAudioLoss) -> None:
    entry = (scored, chosen, result)
    try:  # a model output takes attributes; a plain dict or tuple does not, and is simply not cached
        object.__setattr__(outputs, _CACHE, _Remembered(getattr(outputs, _CACHE, ()) + (entry,)))
    except (AttributeError, TypeError):
        pass


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """Labels aligned with inputs, shifted so that position t holds the target of the logits at t."""
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


def field(container: Any, name: str) -> Any:
    if isinstance(container, Mapping):
        return container.get(name)
    return getattr(container, name, None)


def _check_inputs(outputs: Any, batch: Any) -> None:
    """Refuse, saying what to pass instead, what the loss would otherwise misread or score only in part."""
    if not isinstance(batch, Mapping) and not (dataclasses.is_dataclass(batch) and not isinstance(batch, type)):
        raise InputError(
            f"the batch is a {type(batch).__name__}: higgs_audio_loss reads label_ids and label_audio_ids by name, "
            "so it needs a mapping or upstream's HiggsAudioBatchInput (a tuple would lose the audio labels). "
            "Pass the collator's output, or a dict of its fields"
        )
    if isinstance(outputs, (tuple, list)):
        raise InputError(
            f"the model output is a {type(outputs).__name__}, which has no field names to find logits, "
            "expanded_labels and audio_logits by: the model was called with return_dict=False (or its config "
            "has use_return_dict=False). Call it with return_dict=True and pass its output as it is"
        )
    if field(outputs, "logits") is None:
        raise InputError(
            "the model output has no logits: pass HiggsAudioModel's output as it is, or a mapping with its "
            "logits, expanded_labels and audio_logits"
        )
    _check_text_shapes(field(outputs, "logits"), field(outputs, "expanded_labels"), field(outputs, "text_logit_positions"))


def _check_text_shapes(logits: torch.Tensor, labels: torch.Tensor | None, positions: torch.Tensor | None) -> None:
    if labels is None:
        return
    shapes = f"logits {tuple(logits.shape)} and expanded_labels {tuple(labels.shape)}"
    if positions is not None:
        if logits.dim() != 2 or logits.shape[0] != positions.numel():
            raise InputError(
                f"{shapes} with text_logit_positions {tuple(positions.shape)} do not line up: compact logits "
                "(sparse-text-logits) have one row per listed position. Pass the logits and text_logit_positions "
                "of the same output, as the model returned them"
            )
    elif logits.dim() == 2:
        raise InputError(
            f"{shapes} do not line up: these logits have one row per position, as sparse-text-logits makes "
            "them, but the output has no text_logit_positions to place them. Pass the model's output as it "
            "is, or keep its text_logit_positions with the logits"
        )
    elif logits.shape[:2] != labels.shape:
        raise InputError(
            f"{shapes} do not line up: the loss needs logits (batch, length, vocab) over the expanded sequence "
            "and expanded_labels (batch, length) from the same forward call. Pass the model's logits as they "
            "are: the loss shifts the labels itself, so logits shifted or sliced (logits[:, :-1]) do not "
            "match, nor do labels from another call or batch"
        )


def _text_terms(outputs: Any, batch: Any, label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    logits = field(outputs, "logits")
    labels = field(outputs, "expanded_labels")
    if labels is None:
        if field(batch, "label_ids") is not None or field(batch, "labels") is not None:
            raise ValueError(
                "the batch has text labels but the model output has no expanded_labels: the model was "
                "called without label_ids. Pass label_ids (or labels, with the forward-kwargs-filter patch)."
            )
        return _zero(logits), torch.zeros((), dtype=torch.long, device=logits.device)
    targets = next_token_targets(labels).flatten()
    positions = field(outputs, "text_logit_positions")
    if positions is None:
        logits = logits.flatten(0, 1)
    else:  # sparse-text-logits: one row of logits per listed position of the expanded sequence
        targets = targets[positions]
    total = F.cross_entropy(
        logits, targets, ignore_index=IGNORE_INDEX, reduction="sum", label_smoothing=label_smoothing
    )
    return total, (targets != IGNORE_INDEX).sum()


def _audio_terms(
    outputs: Any, batch: Any, label_smoothing: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    logits = field(outputs, "audio_logits")
    labels = field(batch, "label_audio_ids")
    if labels is None or labels.numel() == 0:  # no audio-out token in the batch: upstream's audio_logits are empty
        anchor = field(outputs, "logits") if logits is None else logits
        return _zero(anchor), torch.zeros((), dtype=torch.long, device=anchor.device), None
    if logits is None:
        raise ValueError(
            "the batch has label_audio_ids but the model output has no audio_logits: the model was called "
            "without the batch's audio_out_ids"
        )
    labels = labels.to(logits.device)
    if labels.shape != (logits.shape[1], logits.shape[0]):
        raise ValueError(
            f"label_audio_ids has shape {tuple(labels.shape)} but audio_logits {tuple(logits.shape)} needs "
            f"(num_codebooks, num_audio_out_tokens) = {(logits.shape[1], logits.shape[0])}: pass the batch "
            "the model was called with (its audio_out_ids make the audio logits), with label_audio_ids as the "
            "collator made them, codebooks first"
        )
    targets = next_token_targets(labels).t()  # (tokens, codebooks)
    losses = F.cross_entropy(
        logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none",
        label_smoothing=label_smoothing,
    ).view_as(targets)
    supervised = targets != IGNORE_INDEX
    per_codebook = losses.sum(0) / supervised.sum(0)  # NaN where a codebook has no supervised token
    return losses.sum(), supervised.sum(), per_codebook


def _zero(tensor: torch.Tensor) -> torch.Tensor:
    """An exact zero in the graph of ``tensor``: the sum of an empty view (no copy, no NaN * 0)."""
    return tensor.flatten()[:0].sum()


def as_kwargs(batch: Any) -> dict[str, Any]:
    """A fresh dict of the batch's fields, from a mapping or a dataclass such as HiggsAudioBatchInput."""
    if isinstance(batch, Mapping):
        return dict(batch)
    if dataclasses.is_dataclass(batch):
        return {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    raise TypeError(f"expected a mapping or upstream's HiggsAudioBatchInput, got {type(batch).__name__}")
