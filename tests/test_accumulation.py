"""Gradient accumulation under the real Trainer: every update is the mean over what the Trainer accumulated.

On every transformers line. Where a window ends differs: transformers 4.46 steps when its running
count of micro-batches reaches a multiple of the accumulation steps k (or at the end of an epoch
shorter than k), so a window can span an epoch end; from 4.47 an epoch's last window is short. What
the Trainer alone does with the loss differs too (the issue's table, ``ALONE`` below). Each test
records the parameters after every update and the micro-batches each update was made of (a forward
pre-hook on the model sees them), and compares each update with one SGD step on one large batch of
the same samples from the same parameters.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments

import higgs_patch
import tiny

pytestmark = pytest.mark.core

LR = 0.1
WITHOUT_TRAINER_HOOK = tuple(s.id for s in higgs_patch.status() if s.default and s.id != "trainer-compute-loss")


def on_this_line(by_line: dict):
    """The value of ``{"transformers range": value}`` for the installed transformers (exactly one must hold)."""
    found = [value for spec, value in by_line.items() if Version(transformers.__version__) in SpecifierSet(spec)]
    assert len(found) == 1, f"transformers {transformers.__version__}: {len(found)} entries of {by_line}"
    return found[0]


class HoldsTheModel(torch.nn.Module):
    """Their wrapper module: the model as ``.model``, labels renamed, everything else passed through.

    Its ``forward(**kwargs)`` makes transformers >= 4.47 hand it ``num_items_in_batch`` and trust it to
    divide by it; Higgs Audio's forward drops it (forward-kwargs-filter) and returns a mean.
    """

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    def forward(self, **kwargs):
        if "labels" in kwargs:
            kwargs["label_ids"] = kwargs.pop("labels")
        return self.model(**kwargs)


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


def train_recorded(tmp_path, samples, steps, trainer_class=Trainer, wrap=None, compute_loss_func=None, **overrides):
    """Train with SGD; return the parameters after each update, the samples of each update, the logs.

    ``wrap``: makes the trained model from the tiny one (a wrapper module, PEFT).
    """
    inner = tiny.model()
    model = wrap(inner) if wrap else inner
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
        data_collator=tiny.DictCollator(tiny.collator()), callbacks=[snapshots], compute_loss_func=compute_loss_func,
    )
    trainer.train()
    windows = [
        [i for batch in seen[a:b] for i in batch] for a, b in zip(snapshots.boundaries, snapshots.boundaries[1:])
    ]
    logs = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return snapshots.params, windows, logs


def one_large_batch(params_before: torch.Tensor, samples, wrap=None) -> tuple[torch.Tensor, float]:
    """The parameters after one SGD step on one batch of ``samples``, and that batch's loss.

    Only parameters that train move (``wrap`` = LoRA: the adapters); the tiny model computes the loss.
    """
    inner = tiny.model()
    model = wrap(inner) if wrap else inner
    torch.nn.utils.vector_to_parameters(params_before, model.parameters())
    model.train()
    with higgs_patch.applied("collator-audio-index"):  # upstream's collator would erase the samples' audio labels
        batch = tiny.fields(tiny.collator()(samples))
    loss = higgs_patch.higgs_audio_loss(inner(**batch), batch).loss
    loss.backward()
    with torch.no_grad():
        after = torch.cat([(p if p.grad is None else p - LR * p.grad).flatten() for p in model.parameters()])
    return after, float(loss.detach())


def ratios(params, windows, samples, wrap=None) -> list[float]:
    """Each update's size as a multiple of one large batch's (1.0: the mean's step)."""
    found = []
    for step, window in enumerate(windows):
        expected, _ = one_large_batch(params[step], [samples[i] for i in window], wrap)
        found.append(round(float((params[step + 1] - params[step]).norm() / (expected - params[step]).norm()), 3))
    return found


def mismatches(params, windows, logs, samples, wrap=None) -> list[str]:
    """Each update that is not one large batch's update, described; [] when all are."""
    found = []
    for step, window in enumerate(windows):
        expected, expected_loss = one_large_batch(params[step], [samples[i] for i in window], wrap)
        got = params[step + 1]
        if not torch.allclose(got, expected, rtol=1e-4, atol=1e-6):
            ratio = float((got - params[step]).norm() / (expected - params[step]).norm())
            found.append(f"update {step + 1} of {window}: {ratio:.3f}x the large batch's step")
        if logs[step] != pytest.approx(expected_loss, rel=1e-3, abs=1e-4):
            found.append(f"update {step + 1} of {window}: logged loss {logs[step]} vs {expected_loss:.4f}")
    return found


# (micro-batches per epoch, accumulation steps, Trainer arguments, the windows' sizes as each line makes them)
WINDOW_SHAPES = {
    "inside an epoch": (6, 3, dict(max_steps=2), {">=4.46": [3, 3]}),
    "at an epoch end (k=3 over 5)": (5, 3, dict(max_steps=2), {"<4.47": [3, 3], ">=4.47": [3, 2]}),
    "an epoch shorter than the window": (2, 3, dict(num_train_epochs=2), {"<4.47": [2, 1], ">=4.47": [2, 2]}),
    "max_steps mid-epoch": (6, 2, dict(max_steps=2), {">=4.46": [2, 2]}),
    # from 4.52 an epoch of 4 counts as 2 updates (3 + 1), so 2 epochs make 4
    "the last window of training": (
        4, 3, dict(num_train_epochs=2), {"<4.47": [3, 3], ">=4.47,<4.52": [3, 1], ">=4.52": [3, 1, 3, 1]}
    ),
}

# The Trainer alone, "at an epoch end (k=3 over 5)": each update as a multiple of the mean's, and the logged
# loss as a multiple of the mean loss (issue 19's table: the model's forward takes no **kwargs).
ALONE = {
    "<4.47": ([3.0, 3.0], [1.0, 1.0]),  # never divides the gradient; divides the logged loss by k
    ">=4.47,<4.48": ([3.0, 2.0], [3.0, 2.0]),  # counts num_items_in_batch, so divides neither
    ">=4.48,<4.55": ([1.0, 0.667], [1.0, 0.667]),  # divides by k, even the short window
    ">=4.55": ([1.0, 1.0], [1.0, 1.0]),  # divides by the window's size: exact
}


@pytest.mark.parametrize("shape", WINDOW_SHAPES, ids=list(WINDOW_SHAPES))
def test_every_update_is_one_large_batch_of_the_micro_batches_it_holds(tmp_path, shape):
    count, steps, arguments, sizes = WINDOW_SHAPES[shape]
    samples = tiny.samples(count)
    with higgs_patch.applied():
        params, windows, logs = train_recorded(tmp_path, samples, steps, **arguments)
    assert [len(w) for w in windows] == on_this_line(sizes)
    assert mismatches(params, windows, logs, samples) == []


@pytest.mark.parametrize("trainer_class", [Trainer, ReadsModelLoss, CallsHiggsAudioLoss], ids=lambda c: c.__name__)
def test_without_the_trainer_hook_each_line_does_what_the_issue_measured(tmp_path, trainer_class):
    """The failure being fixed, per line: across an epoch end (4.46), every window (4.47), the short one (4.48-4.54)."""
    samples = tiny.samples(5)
    with higgs_patch.applied(*WITHOUT_TRAINER_HOOK):
        params, windows, logs = train_recorded(tmp_path, samples, 3, trainer_class, max_steps=2)
    updates, logged = on_this_line(ALONE)
    assert ratios(params, windows, samples) == pytest.approx(updates, abs=2e-3)
    means = [one_large_batch(params[step], [samples[i] for i in window])[1] for step, window in enumerate(windows)]
    assert [round(log / mean, 3) for log, mean in zip(logs, means)] == pytest.approx(logged, abs=2e-3)


@pytest.mark.parametrize("shape", ["inside an epoch", "max_steps mid-epoch", "at an epoch end (k=3 over 5)"])
def test_where_the_trainer_alone_is_exact_the_hook_leaves_the_update_as_it_is(tmp_path, shape):
    """Never divides twice: where the line's Trainer already makes the mean, the patched run is bit for bit
    the unpatched one (full windows from 4.48, every window from 4.55)."""
    count, steps, arguments, _ = WINDOW_SHAPES[shape]
    exact_from = "4.55" if shape.startswith("at an epoch end") else "4.48"
    if Version(transformers.__version__) < Version(exact_from):
        pytest.skip(f"transformers {transformers.__version__} alone is not exact here (from {exact_from})")
    samples = tiny.samples(count)
    with higgs_patch.applied(*WITHOUT_TRAINER_HOOK):
        alone, _, alone_logs = train_recorded(tmp_path, samples, steps, **arguments)
    with higgs_patch.applied():
        hooked, windows, logs = train_recorded(tmp_path, samples, steps, **arguments)
    assert all(torch.equal(a, b) for a, b in zip(alone, hooked)) and logs == alone_logs
    assert mismatches(hooked, windows, logs, samples) == []


@pytest.mark.parametrize("trainer_class", [Trainer, ReadsModelLoss, CallsHiggsAudioLoss, CallsSuper])
def test_accumulating_two_batches_of_one_is_one_batch_of_two_whoever_computes_the_loss(tmp_path, trainer_class):
    samples = tiny.samples(2)
    with higgs_patch.applied():
        params, windows, logs = train_recorded(tmp_path, samples, 2, trainer_class=trainer_class, max_steps=1)
    assert [len(w) for w in windows] == [2]
    assert mismatches(params, windows, logs, samples) == []


def test_a_wrapper_module_taking_kwargs_gets_the_mean_update(tmp_path):
    """transformers >= 4.47 hands a ``forward(**kwargs)`` the item count and leaves the division to it; the
    Higgs Audio model under it returns a mean: k times the update, on every line, unless the hook corrects it."""
    samples = tiny.samples(5)
    with higgs_patch.applied(*WITHOUT_TRAINER_HOOK):
        params, windows, logs = train_recorded(tmp_path, samples, 3, wrap=HoldsTheModel, max_steps=2)
    assert ratios(params, windows, samples) == pytest.approx(on_this_line({"<4.47": [3.0, 3.0], ">=4.47": [3.0, 2.0]}))
    with higgs_patch.applied():
        params, windows, logs = train_recorded(tmp_path, samples, 3, wrap=HoldsTheModel, max_steps=2)
    assert mismatches(params, windows, logs, samples) == []


def test_gradient_checkpointing_gives_the_same_exact_updates(tmp_path):
    count, steps, arguments, _ = WINDOW_SHAPES["at an epoch end (k=3 over 5)"]
    samples = tiny.samples(count)
    with higgs_patch.applied():
        plain, _, plain_logs = train_recorded(tmp_path, samples, steps, **arguments)
        params, windows, logs = train_recorded(tmp_path, samples, steps, gradient_checkpointing=True, **arguments)
    assert mismatches(params, windows, logs, samples) == []
    torch.testing.assert_close(params[-1], plain[-1], rtol=1e-5, atol=1e-7)
    assert logs == pytest.approx(plain_logs, rel=1e-5)


def lora(model):
    return get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                                            init_lora_weights=False))


def test_lora_adapters_get_the_mean_update(tmp_path):
    """PEFT with task_type="CAUSAL_LM" (labels= on every call); only the adapters move, by the mean's step."""
    samples = tiny.samples(5)
    with higgs_patch.applied():
        params, windows, logs = train_recorded(tmp_path, samples, 3, wrap=lora, max_steps=2)
    assert [len(w) for w in windows] == on_this_line(WINDOW_SHAPES["at an epoch end (k=3 over 5)"][3])
    assert not torch.equal(params[0], params[-1])
    assert mismatches(params, windows, logs, samples, wrap=lora) == []


def test_a_compute_loss_func_that_divides_by_the_item_count_is_left_to_do_so(tmp_path):
    """A compute_loss_func is given num_items_in_batch (from 4.47, with labels) and scales by it: the hook
    stands aside there and the update is its own; without a count (4.46) its loss is a mean the hook averages."""
    def divides_by_the_count(outputs, labels, num_items_in_batch=None):
        if num_items_in_batch is None:
            return outputs["loss"]
        return outputs["loss"] * labels.ne(-100).sum() / num_items_in_batch  # every sample has as many labels

    samples = tiny.samples(5)
    with higgs_patch.applied():
        params, windows, logs = train_recorded(tmp_path, samples, 3, compute_loss_func=divides_by_the_count,
                                               max_steps=2)
    assert mismatches(params, windows, logs, samples) == []
