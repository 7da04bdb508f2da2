"""Mixed precision: accelerate's autocast rebinds the model's forward on the instance; the patches still run.

accelerate's native AMP (the Trainer's ``bf16=True`` / ``fp16=True``, ``Accelerator(mixed_precision=...)``)
does ``model.forward = MethodType(autocast(model.forward.__func__), model)``. With wrapt's own bound
wrapper, ``__func__`` is the original function and every forward patch is skipped. Proven here on the
DualFFN tiny model, full fine-tune and LoRA, under the stock Trainer and a custom Accelerator loop,
with the batch carrying ``labels`` only (so the output's ``expanded_labels`` shows that the filter
translated them) and the loss checked against ``higgs_audio_loss``. Something else that takes the
forward's place on the instance (a user's assignment, accelerate's ``unwrap_model(...,
keep_fp32_wrapper=False)``) is reported: ``status()`` says ``bypassed``, naming it.
"""

from __future__ import annotations

import functools
import logging
import math
from types import MethodType

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from boson_multimodal.model.higgs_audio.modeling_higgs_audio import HiggsAudioModel
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments

import higgs_patch
import tiny

FORWARD_PATCHES = ("forward-kwargs-filter", "model-loss")
UPSTREAM_FORWARD = vars(HiggsAudioModel)["forward"]


class LabelsOnly(tiny.DictCollator):
    """The Trainer's usual batch: ``labels``, no ``label_ids`` (only the filter makes them label_ids)."""

    def __call__(self, batch):
        out = super().__call__(batch)
        del out["label_ids"]
        return out


class ChecksEveryStep(Trainer):
    """Records, for every training step, whether the patched forward produced the loss the Trainer used."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True)
        self.steps = getattr(self, "steps", []) + [reached_the_patches(outputs, inputs, loss)]
        return (loss, outputs) if return_outputs else loss


def reached_the_patches(outputs, inputs, loss) -> dict:
    """What shows that forward-kwargs-filter and model-loss ran for this output."""
    expected = higgs_patch.higgs_audio_loss(outputs, inputs).loss
    return {
        "labels translated": outputs.get("expanded_labels") is not None,
        "model's loss": outputs.get("loss") is not None and outputs.get("llm_loss") is not None,
        "loss is higgs_audio_loss": math.isclose(loss.item(), expected.item(), rel_tol=2e-3),
    }


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def lora(model):
    return get_peft_model(model, LoraConfig(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))


def higgs_audio_model_in(model) -> HiggsAudioModel:
    return next(m for m in model.modules() if isinstance(m, HiggsAudioModel))


def train_bf16(tmp_path, model, steps=8, **overrides):
    settings = dict(
        output_dir=str(tmp_path), use_cpu=True, bf16=True, report_to=[], save_strategy="no",
        remove_unused_columns=False, disable_tqdm=True, seed=0, logging_steps=1, per_device_train_batch_size=2,
        max_steps=steps, learning_rate=3e-3,
    )
    settings.update(overrides)
    trainer = ChecksEveryStep(model=model, args=TrainingArguments(**settings), train_dataset=tiny.samples(8),
                              data_collator=LabelsOnly(tiny.collator()))
    trainer.train()
    return trainer, [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def assert_learns(losses, steps) -> None:
    assert len(losses) == steps and all(math.isfinite(v) and v > 0 for v in losses)
    assert sum(losses[-3:]) < sum(losses[:3])


def assert_patched(status=None) -> None:
    states = {s.id: s.state for s in status or higgs_patch.status()}
    assert all(states[patch_id] == "applied" for patch_id in FORWARD_PATCHES), states


def accelerate_rebound(model) -> bool:
    """Whether accelerate's mixed precision replaced the forward on the instance (the path this file is about)."""
    return isinstance(vars(model).get("forward"), MethodType)


# --- the symptom ------------------------------------------------------------------------------------------


@pytest.mark.core
def test_unpatched_bf16_rebinds_the_forward_to_upstreams_which_rejects_the_labels(tmp_path):
    with pytest.raises(TypeError, match="unexpected keyword argument 'labels'"):
        train_bf16(tmp_path, tiny.model(), steps=1)


# --- the stock Trainer ---------------------------------------------------------------------------------------


@pytest.mark.core
@pytest.mark.parametrize("kind", ["full fine-tune", "LoRA"])
def test_bf16_training_under_the_trainer_runs_every_forward_patch(tmp_path, kind):
    with higgs_patch.applied():
        model = tiny.model() if kind == "full fine-tune" else lora(tiny.model())
        trainer, losses = train_bf16(tmp_path, model)
        assert_patched()
    assert accelerate_rebound(trainer.model)  # accelerate's autocast took the instance's forward
    assert_learns(losses, 8)
    assert all(all(step.values()) for step in trainer.steps), trainer.steps


def test_bf16_runs_the_layers_in_bfloat16(tmp_path):
    """The autocast accelerate installs reaches the layers the patches call: their projections compute in bf16."""
    seen = []
    with higgs_patch.applied():
        model = tiny.model()
        projection = model.layers[0].self_attn.q_proj
        hook = projection.register_forward_hook(lambda module, args, output: seen.append(output.dtype))
        train_bf16(tmp_path, model, steps=1)
        hook.remove()
    assert seen and set(seen) == {torch.bfloat16}


# --- a custom Accelerator loop ------------------------------------------------------------------------------


def accelerator_loop(model, steps=8, mixed_precision="bf16"):
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    batch = LabelsOnly(tiny.collator())(tiny.samples(4))
    losses, checks = [], []
    for _ in range(steps):
        outputs = model(**batch)
        checks.append(reached_the_patches(outputs, batch, outputs.loss))
        accelerator.backward(outputs.loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(outputs.loss))
    return accelerator, model, losses, checks


@pytest.mark.core
@pytest.mark.parametrize("kind", ["full fine-tune", "LoRA"])
def test_bf16_training_in_an_accelerator_loop_runs_every_forward_patch(kind):
    with higgs_patch.applied():
        model = tiny.model() if kind == "full fine-tune" else lora(tiny.model())
        accelerator, prepared, losses, checks = accelerator_loop(model)
        assert_patched()
    assert accelerator.native_amp and accelerate_rebound(prepared)
    assert_learns(losses, 8)
    assert all(all(step.values()) for step in checks), checks


def test_fp16_autocast_rebound_as_accelerate_does_runs_the_patches():
    """accelerate runs fp16 natively only on accelerators; on a CPU the same rebinding with fp16 autocast."""
    with higgs_patch.applied():
        model = tiny.model().train()
        model.forward = MethodType(torch.autocast("cpu", dtype=torch.float16)(model.forward.__func__), model)
        batch = LabelsOnly(tiny.collator())(tiny.samples(2))
        outputs = model(**batch)
        assert_patched()
    assert outputs.logits.dtype == torch.float16
    assert all(reached_the_patches(outputs, batch, outputs.loss).values())
    outputs.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


# --- what does bypass the patches is reported ------------------------------------------------------------


def own_loss_forward(model):
    """A user's forward set on the instance: upstream's own function, its own loss; reaches no forward patch."""

    def forward(**batch):
        batch["label_ids"] = batch.pop("labels")
        outputs = UPSTREAM_FORWARD(model, **batch)
        outputs["loss"] = higgs_patch.higgs_audio_loss(outputs, batch).loss
        return outputs

    return forward


def test_a_forward_assigned_on_the_instance_is_reported_bypassed_when_training_starts(tmp_path, patch_log):
    with higgs_patch.applied():
        model = tiny.model()
        model.forward = own_loss_forward(model)
        assert_patched()  # nothing has seen the model yet
        trainer = Trainer(model=model, train_dataset=tiny.samples(4), data_collator=LabelsOnly(tiny.collator()),
                          args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=2,
                                                 remove_unused_columns=False, save_strategy="no", disable_tqdm=True))
        trainer.train()
        report = {s.id: s for s in higgs_patch.status()}
    for patch_id in FORWARD_PATCHES:
        assert report[patch_id].state == "bypassed"
        assert "on the HiggsAudioModel instance" in report[patch_id].reason
        assert "own_loss_forward.<locals>.forward" in report[patch_id].reason
        assert "del model.forward" in report[patch_id].reason
    warnings = [r.getMessage() for r in patch_log.records if r.levelno == logging.WARNING and "(patch-bypassed)" in r.getMessage()]
    assert len(warnings) == len(FORWARD_PATCHES)


def test_unwrapping_without_the_fp32_wrapper_puts_upstreams_forward_on_the_instance_and_is_reported(tmp_path):
    with higgs_patch.applied():
        accelerator, prepared, _, _ = accelerator_loop(tiny.model(), steps=1)
        model = accelerator.unwrap_model(prepared, keep_fp32_wrapper=False)
        assert vars(model)["forward"].__func__ is UPSTREAM_FORWARD
        AcceleratorState._reset_state(reset_partial_state=True)
        with pytest.raises(TypeError, match="unexpected keyword argument 'labels'"):  # upstream's, as on main
            train_bf16(tmp_path, model, steps=1, bf16=False)
        reasons = {s.id: s.reason for s in higgs_patch.status() if s.state == "bypassed"}
        assert set(reasons) == set(FORWARD_PATCHES)
        assert "by upstream's own, unpatched, function, boson_multimodal.model.higgs_audio.modeling_higgs_audio." \
               "HiggsAudioModel.forward" in reasons["model-loss"]
        del model.forward  # what the reason says to do: the class's (patched) forward again
        assert_patched()
        _, losses = train_bf16(tmp_path, model, steps=2, bf16=False)
    assert len(losses) == 2


@pytest.mark.parametrize("how", ["the bound method itself", "functools.partial of the class's", "functools.wraps"])
def test_an_instance_forward_that_leads_to_the_patched_one_is_not_a_bypass(how):
    with higgs_patch.applied():
        model = tiny.model()
        bound = model.forward
        model.forward = {
            "the bound method itself": bound,
            "functools.partial of the class's": functools.partial(type(model).forward, model),
            "functools.wraps": functools.wraps(bound)(lambda **kwargs: bound(**kwargs)),
        }[how]
        higgs_patch.engine.watch(model)
        assert_patched()
        assert model(**LabelsOnly(tiny.collator())(tiny.samples(2))).loss is not None
