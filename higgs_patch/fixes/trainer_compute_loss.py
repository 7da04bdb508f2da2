"""trainer-compute-loss

Symptom: under k-step gradient accumulation a Higgs Audio model takes k times too large a step
(transformers 4.46, 4.47; a wrapper module with ``forward(**kwargs)`` on every line), or an epoch's
short last window takes 2/3 of its step (4.48 to 4.54), and the logged loss is off by the same factor
(4.47: k times); the Trainer's ``label_smoothing_factor`` scores expanded logits against raw labels;
a forward that returns no loss (replaced or copied, never reaching model-loss) stops training with
"The model did not return a loss"; under DDP a wrapper module with ``forward(**kwargs)`` takes
world-size times the update and logs world-size times its loss (from 4.55, where
``average_tokens_across_devices`` is on by default; before, wherever a user turns it on); the
training logs show one number where text and audio losses move apart.

Cause: each transformers line divides a micro-batch's loss differently before backward (by nothing,
by the accumulation steps k however few micro-batches the window holds, or by the window's size) and
in the value it logs, depending on whether the model takes loss kwargs, whether it counted
``num_items_in_batch`` and whether a ``compute_loss_func`` is given (``trainer_lines`` holds the
rule of each line). A model that takes ``**kwargs`` is handed the count and trusted to divide by it;
Higgs Audio's forward drops it and returns a mean; with ``average_tokens_across_devices`` the
Trainer's ``compute_loss`` then multiplies that mean by the number of processes, to undo DDP's
average of losses it takes for sums over the count of every rank. Its label smoother knows nothing of Higgs Audio's
expanded sequence or audio head. Without a loss in the outputs, its ``compute_loss`` has nothing to
return.

Change, for a model that holds a Higgs Audio model of either upstream anywhere in its module tree
(boson's ``HiggsAudioModel`` or transformers' ``HiggsAudioV2ForConditionalGeneration``, whose loss
native-loss makes a mean; through DDP, Accelerate, PEFT, ``torch.compile``, a user's wrapper module):

- ``training_step``: the Trainer says before each micro-batch whether the optimizer steps after it
  (``accelerator.sync_gradients``). At that micro-batch the gradient accumulated since the last
  step, which the Trainer summed as loss / d over the n micro-batches that made it (d from the
  line's rule, read once at install), is scaled by d / n, and the value returned for logging is
  corrected so that the logged loss is their mean; where d = n already (4.55 on, a bare model) it is
  left as it is, so nothing is divided twice. Every shape of window is therefore one large batch's
  update, whoever computes the loss (the default ``compute_loss``, a subclass reading the model's
  loss, a subclass calling :func:`higgs_patch.higgs_audio_loss`), as long as each micro-batch's loss
  is a mean. A loss the user scales (a ``compute_loss_func`` handed ``num_items_in_batch``,
  ``loss_is_scaled_for_ga = True`` from 5.19) is left to them; so is DeepSpeed, which scales by its own
  accumulation steps.
- ``compute_loss``: with ``label_smoothing_factor`` set (and no ``compute_loss_func``), the labels
  stay in the batch and the model's own loss (model-loss) is smoothed, text and audio, the way the
  Trainer's smoother does it. An output with labels and logits but no loss (a forward that never
  reached model-loss: status ``bypassed``, or a subclass with a copy of upstream's forward) gets the
  loss model-loss would have given it, its weights and the smoothing included, instead of "The model
  did not return a loss". The Trainer's ``compute_loss`` runs as for a model that takes no loss
  kwargs (as transformers' own docstring advises for a loss that does not use the count): no
  ``num_items_in_batch`` is passed to the model, and nothing multiplies its mean by the number of
  processes. A ``compute_loss_func`` is called exactly as transformers calls it.
  The smoothing is in force for the whole of each ``training_step`` and ``prediction_step`` too, so a
  subclass's ``compute_loss`` (reading the model's loss, or calling ``higgs_audio_loss``) trains and
  evaluates the same smoothed objective (``higgs_patch.loss.settings``).
- ``log``: training logs also carry ``text_loss``, ``audio_loss`` and ``audio_loss_cb*``, the mean
  over the micro-batches since the last log of every Higgs Audio loss computed in training steps.

Every other model goes to the original methods untouched.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import weakref
from typing import Any, Callable, Mapping

import torch

from .. import events, models
from ..loss import higgs_audio_loss, step_losses, trainer_label_smoothing
from . import model_loss
from .trainer_lines import Scaling, line_of

def compute_higgs_loss(original: Callable[..., Any], options: Mapping[str, Any]):
    """Layer on ``Trainer.compute_loss``: the model's own loss, smoothed as the Trainer asks, and scored
    from the outputs where a forward that never reached model-loss returned none."""

    def wrapper(wrapped, instance, args, kwargs):
        model, inputs, return_outputs = _bind_compute_loss(*args, **kwargs)
        if getattr(instance, "compute_loss_func", None) is not None or not holds_higgs_audio(model):
            return wrapped(*args, **kwargs)
        smoother = getattr(instance, "label_smoother", None)
        epsilon = float(smoother.epsilon) if smoother is not None else 0.0
        scoring = _ScoresItsOutputs(model, epsilon)
        if smoother is None:  # the Trainer's own compute_loss calls the model
            with _taking_no_loss_kwargs(instance):
                return wrapped(scoring, *args[1:], **kwargs) if args else wrapped(**{**kwargs, "model": scoring})
        outputs = scoring(**inputs)  # the labels stay in the batch: the model's loss is smoothed
        loss = outputs[0] if isinstance(outputs, tuple) else outputs.get("loss") if isinstance(outputs, Mapping) else None
        if loss is None:
            raise ValueError(
                "label_smoothing_factor is set but the Higgs Audio model returned no loss: apply the "
                "model-loss patch (one of higgs_patch.apply()'s defaults) and give the batch its labels"
            )
        return (loss, outputs) if return_outputs else loss

    return wrapper


@contextlib.contextmanager
def _taking_no_loss_kwargs(trainer: Any):
    """The Trainer's ``compute_loss`` as for a model whose loss ignores ``num_items_in_batch``.

    Every line reads ``model_accepts_loss_kwargs`` there for two things only: whether to hand the
    model the count, and (with ``average_tokens_across_devices``) whether to multiply the returned
    loss by the number of processes. A Higgs Audio loss is a mean whatever it is handed, so neither
    applies. ``training_step`` sees the Trainer's own value again (the accumulation rule reads it).
    """
    accepts = getattr(trainer, "model_accepts_loss_kwargs", False)
    if not accepts:
        yield
        return
    trainer.model_accepts_loss_kwargs = False
    try:
        yield
    finally:
        trainer.model_accepts_loss_kwargs = accepts


class _ScoresItsOutputs:
    """The model as ``compute_loss`` calls it: the Trainer's label smoothing reaches the model's loss,
    and an output with labels and logits but no loss (a forward that never reached model-loss: a
    class-level replacement, a subclass with a copy of upstream's forward) is given the loss
    model-loss would have given it, with that patch's weights."""

    def __init__(self, model: torch.nn.Module, epsilon: float) -> None:
        self.model, self.epsilon = model, epsilon

    def __call__(self, *args: Any, **inputs: Any) -> Any:
        token = trainer_label_smoothing.set(self.epsilon)
        try:
            outputs = self.model(*args, **inputs)
            if (isinstance(outputs, Mapping) and outputs.get("loss") is None and outputs.get("logits") is not None
                    and models.kind_of(self.model) == models.BOSON  # the native model scores its own labels
                    and any(inputs.get(name) is not None for name in model_loss.LABELS)):
                batch = dict(inputs)
                if batch.get("label_ids") is None and batch.get("labels") is not None:
                    batch["label_ids"] = batch["labels"]  # as forward-kwargs-filter passes them on
                result = higgs_audio_loss(outputs, batch)  # model-loss's weights and this smoothing: loss.settings()
                model_loss.put_first(outputs, model_loss.fields(result))
        finally:
            trainer_label_smoothing.reset(token)
        return outputs

    def __getattr__(self, name: str) -> Any:  # a subclass's compute_loss may read the model's attributes
        return getattr(self.model, name)


def smooth_predictions(original: Callable[..., Any], options: Mapping[str, Any]):
    """Layer on ``Trainer.prediction_step``: evaluation losses are smoothed as training losses are,
    whoever computes them (a subclass's compute_loss included)."""

    def wrapper(wrapped, instance, args, kwargs):
        with _smoothing(instance, args[0] if args else kwargs.get("model")):
            return wrapped(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def _smoothing(trainer: Any, model: Any):
    """The Trainer's ``label_smoothing_factor`` in force for every Higgs Audio loss computed inside,
    unless it has none, its ``compute_loss_func`` computes the loss, or the model holds no Higgs Audio model."""
    smoother = getattr(trainer, "label_smoother", None)
    if smoother is None or getattr(trainer, "compute_loss_func", None) is not None or not holds_higgs_audio(model):
        yield
        return
    token = trainer_label_smoothing.set(float(smoother.epsilon))
    try:
        yield
    finally:
        trainer_label_smoothing.reset(token)


def exact_accumulation(original: Callable[..., Any], options: Mapping[str, Any]):
    """Layer on ``Trainer.training_step``: each update is the mean over the micro-batches it holds.

    The rule of the running transformers line is read here, once; a line no rule covers fails the install.
    """
    line = line_of(sys.modules["transformers"].__version__)

    def wrapper(wrapped, instance, args, kwargs):
        model, num_items_in_batch = _bind_training_step(*args, **kwargs)
        if not holds_higgs_audio(model):
            return wrapped(*args, **kwargs)
        window = _window(instance, model)
        with _recording() as losses, _smoothing(instance, model):
            value = wrapped(*args, **kwargs)
        _components(instance).add_all(losses)
        if not _accumulates(instance):
            return value
        window.add(value)
        if instance.accelerator.sync_gradients:
            value = window.close(model, line.scaling(instance, num_items_in_batch), value)
        return value

    return wrapper


def log_components(original: Callable[..., Any], options: Mapping[str, Any]):
    """Layer on ``Trainer.log``: training logs also carry the mean components since the last log."""

    def wrapper(wrapped, instance, args, kwargs):
        logs = args[0] if args else kwargs.pop("logs")
        if "loss" in logs:
            means = _components(instance).drain()
            if means:
                logs = {**logs, **means}
        return wrapped(logs, *args[1:], **kwargs)

    return wrapper


def holds_higgs_audio(model: Any) -> bool:
    """Whether a Higgs Audio model of either upstream is anywhere in the module tree of ``model``
    (boson's ``HiggsAudioModel`` or transformers' ``HiggsAudioV2ForConditionalGeneration``: :mod:`higgs_patch.models`)."""
    return models.kind_of(model) is not None


def _accumulates(trainer: Any) -> bool:
    from accelerate.utils import DistributedType

    return (
        trainer.args.gradient_accumulation_steps > 1
        and trainer.accelerator.distributed_type != DistributedType.DEEPSPEED
    )


def _bind_compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
    return model, inputs, return_outputs


def _bind_training_step(model, inputs, num_items_in_batch=None):
    return model, num_items_in_batch


@contextlib.contextmanager
def _recording():
    losses: list = []
    token = step_losses.set(losses)
    try:
        yield losses
    finally:
        step_losses.reset(token)


class _Window:
    """The micro-batches accumulated since the optimizer last stepped, in one training run."""

    def __init__(self, state: Any) -> None:
        self.state = state  # the Trainer makes a new TrainerState for every train()
        self.count = 0
        self.logged: Any = 0.0  # the values returned to the Trainer for its logs, summed (on device)

    def add(self, value: Any) -> None:
        self.count += 1
        if value is not None:
            self.logged = self.logged + value.detach()

    def close(self, model: torch.nn.Module, scaling: Scaling, value: Any) -> Any:
        """Make the accumulated gradient and the logged values the mean over the window's micro-batches."""
        count, logged = self.count, self.logged
        self.count, self.logged = 0, 0.0
        if scaling.users:
            return value
        if scaling.backward != count:  # the gradient is the sum of loss / backward over count micro-batches
            with torch.no_grad():
                for parameter in model.parameters():
                    if parameter.grad is not None:
                        parameter.grad.div_(count / scaling.backward)
        if value is None or scaling.logged == count:
            return value
        # Each value was loss / logged; the window's values must sum to its mean loss instead.
        return value + logged * (scaling.logged / count - 1)


def _window(trainer: Any, model: Any) -> _Window:
    with _lock:
        window = _windows.get(trainer)
        starts = window is None or window.state is not trainer.state
        if starts:
            window = _windows[trainer] = _Window(trainer.state)
    if starts:  # a new training run: the engine checks the model and says (once) if a patched function was replaced
        events.announce(events.TRAINING_STARTS, model)
        _refuse_what_ddp_cannot_run(model)
    return window


def _refuse_what_ddp_cannot_run(model: Any) -> None:
    """Reentrant checkpointing under DDP's search for unused parameters fails in the first backward
    (``Expected to mark a variable ready only once``): say so, and what to set, before the first step."""
    if not isinstance(model, torch.nn.parallel.DistributedDataParallel) or not model.find_unused_parameters:
        return
    if any(getattr(m, "gradient_checkpointing", False) is True and _reentrant(m) for m in model.modules()):
        raise ValueError(
            "gradient checkpointing with use_reentrant=True (transformers' default before 5.0) cannot run under DDP "
            "with ddp_find_unused_parameters=True: DDP would take the checkpointed layers' parameters for unused, "
            "then see their gradients (RuntimeError: Expected to mark a variable ready only once). With higgs-patch "
            "every parameter of a Higgs Audio model takes part in every step, so set ddp_find_unused_parameters=False "
            "(the Trainer's choice for a bare model with checkpointing; a PEFT model needs it said), or pass "
            "gradient_checkpointing_kwargs={'use_reentrant': False}"
        )


def _reentrant(module: torch.nn.Module) -> bool:
    checkpoint = getattr(module, "_gradient_checkpointing_func", None)
    return getattr(checkpoint, "keywords", {}).get("use_reentrant") is not False  # torch's default is reentrant


class _Components:
    """Sums of component losses over the micro-batches since the Trainer last logged."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}

    def add_all(self, losses: list) -> None:
        for result in losses:
            components = result.components()
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


_lock = threading.Lock()
_windows: "weakref.WeakKeyDictionary[Any, _Window]" = weakref.WeakKeyDictionary()
_components_by_trainer: "weakref.WeakKeyDictionary[Any, _Components]" = weakref.WeakKeyDictionary()


def _components(trainer: Any) -> _Components:
    with _lock:
        found = _components_by_trainer.get(trainer)
        if found is None:
            found = _components_by_trainer[trainer] = _Components()
        return found
