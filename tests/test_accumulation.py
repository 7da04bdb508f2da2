"""Gradient accumulation under the real Trainer: every update is the mean over what the Trainer accumulated.

transformers 4.46 steps when its running count of micro-batches reaches a multiple of the
accumulation steps k (or at the end of an epoch shorter than k), so a window can hold fewer than k
micro-batches or span an epoch end. Each test records the parameters after every update and the
micro-batches each update was made of (a forward pre-hook on the model sees them), and compares
each update with one SGD step on one large batch of the same samples from the same parameters.
"""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

import higgs_patch
import tiny

LR = 0.1
WITHOUT_TRAINER_HOOK = tuple(s.id for s in higgs_patch.status() if s.default and s.id != "trainer-compute-loss")


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()]).clone()


class Snapshots(TrainerCallback):
    """The parameters after every optimizer step, and how many forwards had run by then."""

    def __init__(self, model, seen) -> None:
        self.model, self.seen = model, seen
        self.params = [flat(model)]
        self.boundaries = [0]

    def on_step_end(self, args, state, control, **kwargs):
        self.params.append(flat(self.model))
        self.boundaries.append(len(self.seen))


class ReadsModelLoss(Trainer):
    """train-higgs-audio's shape: its own compute_loss, which reads the model's loss."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        batch = {("label_ids" if k == "labels" else k): v for k, v in inputs.items()}
        outputs = model(**batch)
        loss = outputs["loss"]
        return (loss, outputs) if return_outputs else loss


class CallsHiggsAudioLoss(Trainer):
    """The docs' advice (docs/your-trainer.md) for a trainer that overrides compute_loss: call higgs_audio_loss."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        batch = {k: v for k, v in inputs.items() if k != "labels"}
        outputs = model(**batch)
        loss = higgs_patch.higgs_audio_loss(outputs, batch).loss
        return (loss, outputs) if return_outputs else loss


class CallsSuper(Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def train_recorded(tmp_path, samples, steps, trainer_class=Trainer, **overrides):
    """Train with SGD; return the parameters after each update, the samples of each update, the logs."""
    model = tiny.model()
    index = {tuple(s.input_ids.tolist()): i for i, s in enumerate(samples)}
    seen: list[list[int]] = []

    def record(module, args, kwargs):
        seen.append([index[tuple(row[row != tiny.PAD].tolist())] for row in kwargs["input_ids"]])

    model.register_forward_pre_hook(record, with_kwargs=True)
    snapshots = Snapshots(model, seen)
    settings = dict(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no", remove_unused_columns=False,
        disable_tqdm=True, seed=0, logging_steps=1, per_device_train_batch_size=1, gradient_accumulation_steps=steps,
        optim="sgd", learning_rate=LR, lr_scheduler_type="constant", max_grad_norm=0,
    )
    settings.update(overrides)
    trainer = trainer_class(
        model=model, args=TrainingArguments(**settings), train_dataset=samples,
        data_collator=tiny.DictCollator(tiny.collator()), callbacks=[snapshots],
    )
    trainer.train()
    windows = [
        [i for batch in seen[a:b] for i in batch] for a, b in zip(snapshots.boundaries, snapshots.boundaries[1:])
    ]
    logs = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return snapshots.params, windows, logs


def one_large_batch(params_before: torch.Tensor, samples) -> tuple[torch.Tensor, float]:
    """The parameters after one SGD step on one batch of ``samples``, and that batch's loss."""
    model = tiny.model()
    torch.nn.utils.vector_to_parameters(params_before, model.parameters())
    model.train()
    with higgs_patch.applied("collator-audio-index"):  # upstream's collator would erase the samples' audio labels
        batch = tiny.fields(tiny.collator()(samples))
    loss = higgs_patch.higgs_audio_loss(model(**batch), batch).loss
    loss.backward()
    with torch.no_grad():
        after = torch.cat([(p - LR * p.grad).flatten() for p in model.parameters()])
    return after, float(loss.detach())


def mismatches(params, windows, logs, samples) -> list[str]:
    """Each update that is not one large batch's update, described; [] when all are."""
    found = []
    for step, window in enumerate(windows):
        expected, expected_loss = one_large_batch(params[step], [samples[i] for i in window])
        got = params[step + 1]
        if not torch.allclose(got, expected, rtol=1e-4, atol=1e-6):
            ratio = float((got - params[step]).norm() / (expected - params[step]).norm())
            found.append(f"update {step + 1} of {window}: {ratio:.3f}x the large batch's step")
        if logs[step] != pytest.approx(expected_loss, rel=1e-3, abs=1e-4):
            found.append(f"update {step + 1} of {window}: logged loss {logs[step]} vs {expected_loss:.4f}")
    return found


# (micro-batches per epoch, accumulation steps, Trainer arguments, the windows' sizes as the Trainer makes them)
WINDOW_SHAPES = {
    "inside an epoch": (6, 3, dict(max_steps=2), [3, 3]),
    "across an epoch end": (5, 3, dict(max_steps=2), [3, 3]),
    "an epoch shorter than the window": (2, 3, dict(num_train_epochs=2), [2, 1]),
    "max_steps mid-epoch": (6, 2, dict(max_steps=2), [2, 2]),
    "the last window of training": (4, 3, dict(num_train_epochs=2), [3, 3]),
}


@pytest.mark.parametrize("shape", WINDOW_SHAPES, ids=list(WINDOW_SHAPES))
def test_every_update_is_one_large_batch_of_the_micro_batches_it_holds(tmp_path, shape):
    count, steps, arguments, sizes = WINDOW_SHAPES[shape]
    samples = tiny.samples(count)
    with higgs_patch.applied():
        params, windows, logs = train_recorded(tmp_path, samples, steps, **arguments)
    assert [len(w) for w in windows] == sizes
    assert mismatches(params, windows, logs, samples) == []


def test_without_the_trainer_hook_the_updates_are_not_the_mean(tmp_path):
    """The failure being fixed: across an epoch end, transformers 4.46 alone takes 3x the step."""
    samples = tiny.samples(5)
    with higgs_patch.applied(*WITHOUT_TRAINER_HOOK):
        params, windows, logs = train_recorded(tmp_path, samples, 3, max_steps=2)
    found = mismatches(params, windows, logs, samples)
    assert any("update 2 of" in line and "3.000x" in line for line in found), found


@pytest.mark.parametrize("trainer_class", [Trainer, ReadsModelLoss, CallsHiggsAudioLoss, CallsSuper])
def test_accumulating_two_batches_of_one_is_one_batch_of_two_whoever_computes_the_loss(tmp_path, trainer_class):
    samples = tiny.samples(2)
    with higgs_patch.applied():
        params, windows, logs = train_recorded(tmp_path, samples, 2, trainer_class=trainer_class, max_steps=1)
    assert [len(w) for w in windows] == [2]
    assert mismatches(params, windows, logs, samples) == []


@pytest.mark.parametrize("trainer_class", [ReadsModelLoss, CallsHiggsAudioLoss])
def test_unpatched_a_subclass_gets_twice_the_update(tmp_path, trainer_class):
    samples = tiny.samples(2)
    with higgs_patch.applied(*WITHOUT_TRAINER_HOOK):
        params, windows, logs = train_recorded(tmp_path, samples, 2, trainer_class=trainer_class, max_steps=1)
    found = mismatches(params, windows, logs, samples)
    assert len(found) == 1 and "2.000x" in found[0], found
