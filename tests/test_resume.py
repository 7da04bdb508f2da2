"""Resume: ``trainer.train(resume_from_checkpoint=...)`` continues exactly where an uninterrupted run was.

Each test trains once with checkpoints (the uninterrupted run), then resumes a fresh Trainer and a
fresh model from one of those checkpoints and compares: the weights at the end, the order in which
the samples were seen after the checkpoint (the RNG state the checkpoint holds decides it), and
the reported ``train_loss`` (the mean loss of the steps this ``train()`` call ran).
"""

from __future__ import annotations

import os
import pickle
import random

import numpy as np
import pytest
import torch
import transformers
from packaging.version import Version
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments

import higgs_patch
import needed
import tiny

SAMPLES = 6


def full_model():
    return tiny.model()


def lora_model():
    return get_peft_model(tiny.model(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))


MODELS = {"full fine-tune": full_model, "LoRA": lora_model}


class Run:
    """One Trainer run on the tiny model that records which samples each forward saw."""

    def __init__(self, output_dir, model, *, resume=None, samples=SAMPLES, **overrides) -> None:
        self.samples = tiny.samples(samples)
        index = {tuple(s.input_ids.tolist()): i for i, s in enumerate(self.samples)}
        self.seen: list[list[int]] = []

        def record(module, args, kwargs):
            if module.training:
                self.seen.append([index[tuple(row[row != tiny.PAD].tolist())] for row in kwargs["input_ids"]])

        model.register_forward_pre_hook(record, with_kwargs=True)  # the Trainer calls it, PEFT or not
        settings = dict(
            output_dir=str(output_dir), use_cpu=True, report_to=[], remove_unused_columns=False, disable_tqdm=True,
            seed=0, logging_steps=1, per_device_train_batch_size=2, num_train_epochs=2, learning_rate=3e-3,
            save_strategy="steps", save_steps=1, dataloader_drop_last=False,
        )
        settings.update(overrides)
        self.model = model
        self.trainer = Trainer(model=model, args=TrainingArguments(**settings), train_dataset=self.samples,
                               data_collator=tiny.DictCollator(tiny.collator()))
        self.output = self.trainer.train(resume_from_checkpoint=resume)

    def weights(self) -> torch.Tensor:
        return torch.cat([p.detach().flatten() for p in self.model.parameters()])

    def step_losses(self) -> dict[int, float]:
        return {e["step"]: e["loss"] for e in self.trainer.state.log_history if "loss" in e}


def resumed_against_uninterrupted(tmp_path, make_model, checkpoint_step, **overrides) -> tuple[Run, Run]:
    whole = Run(tmp_path / "whole", make_model(), **overrides)
    checkpoint = tmp_path / "whole" / f"checkpoint-{checkpoint_step}"
    assert checkpoint.is_dir()
    resumed = Run(tmp_path / "resumed", make_model(), resume=str(checkpoint), **overrides)
    return whole, resumed


# (samples per micro-batch, accumulation steps, the checkpoint, micro-batches before it) in 2 epochs of 6 samples
WHERE = {
    "mid-epoch": (dict(), 2, 2),
    "at an epoch end": (dict(), 3, 3),
    "after an epoch end": (dict(), 4, 4),
    "accumulation 2, across an epoch end": (
        dict(per_device_train_batch_size=1, gradient_accumulation_steps=2), 2, 4),
    "accumulation 2, at an epoch end": (dict(per_device_train_batch_size=1, gradient_accumulation_steps=2), 3, 6),
}
ON_EVERY_LINE = "accumulation 2, across an epoch end"


def without(patch_id: str) -> list[str]:
    return [s.id for s in higgs_patch.status() if s.default and s.id != patch_id]


def serves_here(patch_id: str) -> bool:
    """Whether the patch's [serves] holds on this stack (off it, a bare apply() passes over it as not needed)."""
    return patch_id not in needed.not_needed()


@pytest.mark.parametrize("kind", MODELS, ids=list(MODELS))
@pytest.mark.parametrize("where", [pytest.param(w, marks=pytest.mark.core) if w == ON_EVERY_LINE else w for w in WHERE],
                         ids=list(WHERE))
def test_resume_equals_the_uninterrupted_run(tmp_path, kind, where):
    overrides, checkpoint_step, micro_batches_before = WHERE[where]
    with higgs_patch.applied():
        whole, resumed = resumed_against_uninterrupted(tmp_path, MODELS[kind], checkpoint_step, **overrides)
    assert resumed.trainer.state.global_step == whole.trainer.state.global_step
    assert resumed.seen == whole.seen[micro_batches_before:]  # the data order, from the restored RNG state
    assert len({tuple(batch) for batch in whole.seen}) > 1
    assert torch.equal(resumed.weights(), whole.weights())
    untrained = torch.cat([p.detach().flatten() for p in MODELS[kind]().parameters()])
    assert not torch.equal(whole.weights(), untrained)  # it did train
    logged = resumed.step_losses()
    for step, loss in whole.step_losses().items():
        if step > checkpoint_step:
            assert logged[step] == pytest.approx(loss, abs=1e-4), step


# 5 micro-batches an epoch, accumulation 2: two full windows and a short last one, 3 updates an epoch.
SHORT_WINDOW = dict(samples=5, per_device_train_batch_size=1, gradient_accumulation_steps=2, num_train_epochs=3)


@pytest.mark.core
@pytest.mark.skipif(
    Version("4.47") <= Version(transformers.__version__) < Version("4.57"),
    reason="not established between 4.47 and 4.56: 4.47.1 counts 3 updates an epoch yet resumes step 1 two "
           "micro-batches early (measured); measured exact on 4.57.6 and 5.x, as documented on 4.46")
def test_resume_where_an_epoch_ends_in_a_short_window_is_exact_unless_the_line_miscounts_its_updates(tmp_path):
    """transformers 4.46 counts an epoch's updates as 5 // 2 = 2 while its loop makes 3 (the short window
    steps too): resuming from step s it skips s // 2 epochs and (s % 2) * 2 micro-batches, so from step 2
    on it resumes at the wrong place, with or without the plugin (its own bookkeeping, for any model).
    Before step 2 it resumes exactly; lines that count 3 updates an epoch (5.24) resume exactly everywhere."""
    with higgs_patch.applied():
        whole = Run(tmp_path / "whole", full_model(), **SHORT_WINDOW)
        miscounts = whole.trainer.state.max_steps == (5 // 2) * 3  # the line's own count of updates per epoch
        assert miscounts or whole.trainer.state.max_steps == 3 * 3
        for step in (1, 2, 4):
            resumed = Run(tmp_path / f"resumed-{step}", full_model(), resume=str(tmp_path / "whole" / f"checkpoint-{step}"),
                          **SHORT_WINDOW)
            before = 2 * step if miscounts else (step // 3) * 5 + (step % 3) * 2
            exact = not miscounts or step < 5 // 2
            if exact:
                assert resumed.seen == whole.seen[before:], step
                assert torch.equal(resumed.weights(), whole.weights()), step
            else:
                assert resumed.seen != whole.seen[-len(resumed.seen):], step
                assert not torch.equal(resumed.weights(), whole.weights()), step


@pytest.mark.core
def test_unpatched_resume_fails_to_load_the_rng_state_exactly_where_the_patch_serves(tmp_path):
    """The symptom: transformers 4.46 loads rng_state.pth with torch.load's default, weights-only from torch 2.6.
    Every later line allowlists numpy's RNG state itself: there resume is exact without the patch, not needed."""
    with higgs_patch.applied():
        state = {s.id: s.state for s in higgs_patch.status()}["resume-rng-state"]
    assert state == ("applied" if serves_here("resume-rng-state") else "not-needed")
    with higgs_patch.applied(*without("resume-rng-state")):
        whole = Run(tmp_path / "whole", full_model(), num_train_epochs=1)
        if serves_here("resume-rng-state"):
            with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
                Run(tmp_path / "resumed", full_model(), resume=str(tmp_path / "whole" / "checkpoint-2"),
                    num_train_epochs=1)
            return
        resumed = Run(tmp_path / "resumed", full_model(), resume=str(tmp_path / "whole" / "checkpoint-2"),
                      num_train_epochs=1)
    assert resumed.seen == whole.seen[2:]  # the data order, from the RNG state the Trainer restored itself
    assert torch.equal(resumed.weights(), whole.weights())


@pytest.mark.parametrize("where", ["mid-epoch", pytest.param("after an epoch end", marks=pytest.mark.core)])
def test_train_loss_after_a_resume_is_the_mean_of_the_steps_it_ran(tmp_path, where):
    overrides, checkpoint_step, _ = WHERE[where]
    with higgs_patch.applied():
        whole, resumed = resumed_against_uninterrupted(tmp_path, full_model, checkpoint_step, **overrides)
    per_step = whole.step_losses()
    assert whole.output.training_loss == pytest.approx(np.mean(list(per_step.values())), abs=1e-4)
    after = [loss for step, loss in per_step.items() if step > checkpoint_step]
    expected = np.mean(after)
    assert resumed.output.training_loss == pytest.approx(expected, abs=1e-4)
    assert resumed.output.metrics["train_loss"] == resumed.output.training_loss
    final = next(e for e in resumed.trainer.state.log_history if "train_loss" in e)
    assert final["train_loss"] == resumed.output.training_loss  # what callbacks and the log history got


@pytest.mark.core
def test_without_the_fix_train_loss_after_a_resume_divides_by_every_step_where_the_patch_serves(tmp_path):
    """The symptom: transformers before 5.19 divides the loss of the steps after the resume by all steps;
    5.19 and later divide by the steps trained, as the patch does (there it is not needed)."""
    with higgs_patch.applied():
        Run(tmp_path / "whole", full_model())
    with higgs_patch.applied(*without("resume-train-loss")):
        resumed = Run(tmp_path / "resumed", full_model(), resume=str(tmp_path / "whole" / "checkpoint-4"))
    after = [loss for step, loss in resumed.step_losses().items() if step > 4]
    assert len(after) == 2
    expected = sum(after) / 6 if serves_here("resume-train-loss") else np.mean(after)
    assert resumed.output.training_loss == pytest.approx(expected, abs=1e-4)


# --- the RNG file is the only thing the load allows -------------------------------------------------------


def rng_file(path, extra=None) -> str:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
    if extra is not None:
        state["extra"] = extra
    torch.save(state, path)
    return str(path)


class Unexpected:
    """A global no RNG state holds."""


def test_only_the_trainers_own_rng_load_is_allowed(tmp_path):
    import transformers.trainer

    path = rng_file(tmp_path / "rng_state.pth")
    before = torch.serialization.get_safe_globals()
    with higgs_patch.applied():
        with pytest.raises(pickle.UnpicklingError):
            torch.load(path)  # everyone else's torch.load is as strict as before
        with pytest.raises(pickle.UnpicklingError):
            transformers.trainer.torch.load(path)  # the Trainer's module too, outside _load_rng_state
        assert torch.serialization.get_safe_globals() == before  # nothing was allowed process-wide
    assert transformers.trainer.torch is torch  # reverted: the Trainer's module sees torch itself again


@pytest.mark.core
def test_an_rng_file_holding_anything_else_is_refused_naming_what(tmp_path):
    """Where the patch serves, it refuses naming the file; elsewhere the Trainer's own weights-only load does."""
    checkpoint = tmp_path / "checkpoint-1"
    checkpoint.mkdir()
    rng_file(checkpoint / "rng_state.pth", extra=Unexpected())
    trainer = Trainer(model=tiny.model(), args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]))
    says = r"rng_state\.pth.*test_resume\.Unexpected" if serves_here("resume-rng-state") else r"test_resume\.Unexpected"
    with higgs_patch.applied():
        with pytest.raises(pickle.UnpicklingError, match=says):
            trainer._load_rng_state(str(checkpoint))


#: What the Trainer's own load raises for an unreadable RNG file, on the lines where the patch does not serve.
UPSTREAM_UNREADABLE = {b"": EOFError, b"not a checkpoint": pickle.UnpicklingError}


@pytest.mark.core
@pytest.mark.parametrize("content", UPSTREAM_UNREADABLE, ids=["empty", "garbage"])
def test_an_rng_file_torch_cannot_read_is_refused_naming_the_file_and_the_fix(tmp_path, content):
    """Where the patch serves, torch's scanner gave a bare ValueError naming no file; elsewhere the Trainer's
    own load raises torch's bare error (upstream's behaviour, left as it is)."""
    checkpoint = tmp_path / "checkpoint-1"
    checkpoint.mkdir()
    (checkpoint / "rng_state.pth").write_bytes(content)
    trainer = Trainer(model=tiny.model(), args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]))
    with higgs_patch.applied():
        if not serves_here("resume-rng-state"):
            with pytest.raises(UPSTREAM_UNREADABLE[content]):
                trainer._load_rng_state(str(checkpoint))
            return
        with pytest.raises(pickle.UnpicklingError) as caught:
            trainer._load_rng_state(str(checkpoint))
    message = str(caught.value)
    assert str(checkpoint / "rng_state.pth") in message and "cannot read it" in message and "Delete it" in message


@pytest.mark.core
def test_the_rng_state_is_restored_from_the_checkpoint(tmp_path):
    checkpoint = tmp_path / "checkpoint-1"
    checkpoint.mkdir()
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    rng_file(checkpoint / "rng_state.pth")
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())))
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    trainer = Trainer(model=tiny.model(), args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]))
    with higgs_patch.applied():
        trainer._load_rng_state(str(checkpoint))
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected
    assert os.path.isfile(checkpoint / "rng_state.pth")
