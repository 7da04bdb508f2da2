"""resume-train-loss

Symptom: after ``trainer.train(resume_from_checkpoint=...)`` the reported ``train_loss`` is far too
low (1.815 where the steps trained averaged 4.5): the larger the share of steps done before the
checkpoint, the lower it is.

Cause: transformers before 5.19 sums the losses of the steps this ``train()`` call ran and divides
the sum by ``state.global_step``, which counts the steps before the checkpoint too. The checkpoint
does not hold the losses of those earlier steps (only their logged, rounded values in
``state.log_history``), so their mean cannot be rebuilt exactly.

Change: ``train_loss`` is the mean loss of the optimizer steps this call trained, as transformers
5.19 and later report it: in the final log (what callbacks and ``state.log_history`` get), in the
metrics and in the ``TrainOutput`` that ``train()`` returns. A run that did not resume is unchanged.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Callable, Mapping


def note_first_step(original: Callable[..., Any], options: Mapping[str, Any]):
    """Layer on ``Trainer.training_step``: the global step a run's first micro-batch starts from."""

    def wrapper(wrapped, instance, args, kwargs):
        state = instance.state
        start = _starts.get(instance)
        if start is None or start[0] is not state:  # the Trainer makes a new TrainerState for every train()
            with _lock:
                _starts[instance] = (state, state.global_step)
        return wrapped(*args, **kwargs)

    return wrapper


def mean_of_steps_trained(original: Callable[..., Any], options: Mapping[str, Any]):
    """Layer on ``Trainer.log``: the final ``train_loss`` divides by the steps this call trained."""

    def wrapper(wrapped, instance, args, kwargs):
        logs = args[0] if args else kwargs.get("logs")
        if isinstance(logs, dict) and "train_loss" in logs:
            start = _starts.get(instance)
            if start is not None and start[0] is instance.state:
                first, last = start[1], instance.state.global_step
                if first > 0 and last > first:
                    # in place: the Trainer returns this very dict as train()'s metrics
                    logs["train_loss"] = logs["train_loss"] * max(last, 0.001) / (last - first)
        return wrapped(*args, **kwargs)

    return wrapper


def report_train_loss(original: Callable[..., Any], options: Mapping[str, Any]):
    """Layer on ``Trainer.train``: the ``TrainOutput`` says what the final log said."""

    def wrapper(wrapped, instance, args, kwargs):
        output = wrapped(*args, **kwargs)
        metrics = getattr(output, "metrics", None)
        if isinstance(metrics, dict) and "train_loss" in metrics and hasattr(output, "_replace"):
            output = output._replace(training_loss=metrics["train_loss"])
        return output

    return wrapper


_lock = threading.Lock()
_starts: "weakref.WeakKeyDictionary[Any, tuple[Any, int]]" = weakref.WeakKeyDictionary()
