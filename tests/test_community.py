"""The shapes real community trainers have, under the real Trainer, unpatched and patched.

- a Trainer subclass whose compute_loss reads the model's own loss (train-higgs-audio);
- a plain Trainer around an nn.Module that holds the model as ``.model`` (their HiggsAudioModelWrapper);
- a subclass that calls ``higgs_audio_loss`` itself (the README's advice);
- a class-level replacement of ``HiggsAudioModel.forward`` made after import (thucth-qt's trainers).
Plus the model's own loss (model-loss) on its own: same as higgs_audio_loss, once per forward,
untouched outputs without labels, with sparse-text-logits in either order, and revert.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
import transformers
from boson_multimodal.model.higgs_audio.modeling_higgs_audio import HiggsAudioModel
from packaging.version import Version
from peft import LoraConfig, get_peft_model
from test_accumulation import CallsHiggsAudioLoss, HoldsTheModel, ReadsModelLoss
from transformers import Trainer, TrainingArguments

import higgs_patch
import tiny


def train(tmp_path, model, trainer_class=Trainer, steps=12, **overrides):
    settings = dict(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no", remove_unused_columns=False,
        disable_tqdm=True, seed=0, logging_steps=1, per_device_train_batch_size=2, max_steps=steps,
        learning_rate=3e-3,
    )
    settings.update(overrides)
    trainer = trainer_class(
        model=model, args=TrainingArguments(**settings), train_dataset=tiny.samples(8),
        data_collator=tiny.DictCollator(tiny.collator()),
    )
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def assert_learns(losses, steps=12) -> None:
    assert len(losses) == steps and all(math.isfinite(v) and v > 0 for v in losses)
    assert sum(losses[-4:]) < sum(losses[:4])


# transformers >= 4.47 hands a forward(**kwargs) num_items_in_batch: the wrapper passes it on to Higgs Audio's
# forward, which takes no such argument; 4.46 passes nothing, and the Trainer finds no loss in the outputs
WRAPPED_UNPATCHED = ((TypeError, "unexpected keyword argument 'num_items_in_batch'")
                     if Version(transformers.__version__) >= Version("4.47") else (ValueError, "did not return a loss"))
SHAPES = {
    "subclass reads outputs['loss']": (ReadsModelLoss, lambda m: m, KeyError, "loss"),
    "plain Trainer, model inside a wrapper module": (Trainer, HoldsTheModel, *WRAPPED_UNPATCHED),
}


@pytest.mark.parametrize("shape", SHAPES, ids=list(SHAPES))
def test_a_community_trainer_shape_fails_unpatched_and_trains_patched(tmp_path, shape):
    trainer_class, wrap, error, message = SHAPES[shape]
    with pytest.raises(error, match=message):  # upstream as installed
        train(tmp_path, wrap(tiny.model()), trainer_class, steps=1)
    with higgs_patch.applied():
        assert_learns(train(tmp_path, wrap(tiny.model()), trainer_class))


def test_a_subclass_that_calls_higgs_audio_loss_trains_under_lora(tmp_path):
    model = get_peft_model(tiny.model(), LoraConfig(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    with higgs_patch.applied():
        assert_learns(train(tmp_path, model, CallsHiggsAudioLoss, learning_rate=1e-2))


def test_a_wrapper_module_around_a_peft_model_trains_under_accumulation(tmp_path):
    model = HoldsTheModel(get_peft_model(tiny.model(), LoraConfig(target_modules=["q_proj", "v_proj"])))
    with higgs_patch.applied():
        assert_learns(train(tmp_path, model, learning_rate=1e-2, gradient_accumulation_steps=2,
                            per_device_train_batch_size=1))


# --- the model's own loss --------------------------------------------------------------------------


def batch_of(count=3):
    return tiny.fields(tiny.collator()(tiny.samples(count)))


def test_the_models_loss_is_higgs_audio_loss_and_is_computed_once_per_forward():
    model, batch = tiny.model().train(), batch_of()
    unpatched = model(**batch)
    assert unpatched.loss is None
    with higgs_patch.applied():
        outputs = model(**batch)
        again = higgs_patch.higgs_audio_loss(outputs, batch)
    expected = higgs_patch.higgs_audio_loss(unpatched, batch)
    torch.testing.assert_close(outputs.loss, expected.loss)
    assert list(outputs.keys())[:4] == ["loss", "llm_loss", "audio_loss", "codebook_losses"]
    assert outputs[0] is outputs.loss  # first, as in every Hugging Face output
    torch.testing.assert_close(outputs.llm_loss, expected.text)
    torch.testing.assert_close(outputs.audio_loss, expected.audio)
    assert again.loss is outputs.loss  # the same tensor: not scored twice
    weighted = higgs_patch.higgs_audio_loss(outputs, batch, audio_loss_weight=2.0)
    assert weighted.loss is not outputs.loss  # other settings are scored afresh


def test_the_loss_weights_reach_the_models_loss():
    model, batch = tiny.model(), batch_of()
    with higgs_patch.applied(text_loss_weight=0.25, audio_loss_weight=2.0):
        loss = model(**batch).loss
    plain = higgs_patch.higgs_audio_loss(model(**batch), batch)
    torch.testing.assert_close(loss, 0.25 * plain.text + 2.0 * plain.audio)


def same_output(got, expected) -> None:
    assert list(got.keys()) == list(expected.keys())
    for name, value in expected.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(got[name], value, rtol=0, atol=0)


def test_outputs_without_labels_are_upstreams_and_revert_restores_upstream():
    model, batch = tiny.model().eval(), batch_of()
    without = {k: v for k, v in batch.items() if k not in ("label_ids", "label_audio_ids")}
    with torch.no_grad():
        before, before_labelled = model(**without), model(**batch)
        with higgs_patch.applied():
            patched = model(**without)
            assert model(**batch).loss is not None
        after, after_labelled = model(**without), model(**batch)
    same_output(patched, before)
    same_output(after, before)
    same_output(after_labelled, before_labelled)
    assert after_labelled.loss is None


@pytest.mark.parametrize("order", ["sparse first", "sparse last"])
def test_the_models_loss_works_with_sparse_text_logits_applied_in_either_order(order):
    model, batch = tiny.model().train(), batch_of()
    dense = higgs_patch.higgs_audio_loss(model(**batch), batch).loss
    calls = [("sparse-text-logits",), ()]
    with higgs_patch.applied(*calls[order == "sparse last"]), higgs_patch.applied(*calls[order == "sparse first"]):
        outputs = model(**batch)
    assert "text_logit_positions" in outputs and outputs.logits.dim() == 2
    torch.testing.assert_close(outputs.loss, dense)


# --- class-level replacements of the forward ---------------------------------------------------------


def maps_labels(original):
    """thucth-qt's trainer_ddp.py: labels -> label_ids, then the forward it replaced."""

    def wrapped_forward(self, labels=None, **kwargs):
        if labels is not None and "label_ids" not in kwargs:
            kwargs["label_ids"] = labels
        return original(self, **kwargs)

    return wrapped_forward


def strips_labels(original):
    """thucth-qt's trainer.py: both label arguments removed, then the forward it replaced."""

    def patched_forward_method(self, *args, **kwargs):
        kwargs.pop("labels", None)
        kwargs.pop("label_ids", None)
        return original(self, *args, **kwargs)

    return patched_forward_method


@pytest.fixture
def restore_forward():
    saved = vars(HiggsAudioModel)["forward"]
    yield
    HiggsAudioModel.forward = saved


def states() -> dict[str, str]:
    return {s.id: s.state for s in higgs_patch.status()}


def test_a_forward_replaced_after_apply_is_reported_once_and_still_trains_if_it_calls_through(
    tmp_path, restore_forward, patch_log
):
    with higgs_patch.applied():
        HiggsAudioModel.forward = maps_labels(HiggsAudioModel.forward)
        losses = train(tmp_path, tiny.model())
        train(tmp_path, tiny.model(), steps=1)  # a second run says nothing new
        report = {s.id: s for s in higgs_patch.status()}
    assert_learns(losses)
    for patch_id in ("forward-kwargs-filter", "model-loss"):
        assert report[patch_id].state == "bypassed"
        assert "HiggsAudioModel.forward was replaced after apply()" in report[patch_id].reason
        assert "wrapped_forward" in report[patch_id].reason
    assert report["collator-audio-index"].state == "applied"
    warnings = [r.getMessage() for r in patch_log.records if "(patch-bypassed)" in r.getMessage()]
    assert len(warnings) == 2 and all("maps_labels.<locals>.wrapped_forward" in w for w in warnings)


def test_a_forward_replaced_after_apply_that_strips_the_labels_is_reported_and_loses_the_text_loss(
    tmp_path, restore_forward, patch_log
):
    """What the bypass warning is for: the replacement drops label_ids, so text is no longer supervised."""
    with higgs_patch.applied():
        HiggsAudioModel.forward = strips_labels(HiggsAudioModel.forward)
        trainer = Trainer(
            model=tiny.model(), args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[],
                                                       remove_unused_columns=False, max_steps=1, logging_steps=1),
            train_dataset=tiny.samples(2), data_collator=tiny.DictCollator(tiny.collator()),
        )
        trainer.train()
        assert states()["model-loss"] == "bypassed"
    logged = next(e for e in trainer.state.log_history if "loss" in e)
    assert "audio_loss" in logged and "text_loss" not in logged
    assert any("(patch-bypassed)" in r.getMessage() and "patched_forward_method" in r.getMessage()
               for r in patch_log.records if r.levelno == logging.WARNING)


def test_unpatched_the_label_stripping_replacement_leaves_logits_and_labels_misaligned(restore_forward):
    """The symptom: without label_ids the model returns no expanded_labels; raw labels are shorter."""
    HiggsAudioModel.forward = strips_labels(HiggsAudioModel.forward)
    model, batch = tiny.model(), batch_of()
    outputs = model(**batch)
    assert outputs.expanded_labels is None
    assert outputs.logits.shape[1] > batch["label_ids"].shape[1]


def test_doctor_in_that_process_shows_the_bypass(restore_forward):
    from higgs_patch.commands import doctor

    with higgs_patch.applied():
        HiggsAudioModel.forward = maps_labels(HiggsAudioModel.forward)
        report = doctor.run()
    by_id = {p.declaration.id: p for p in report.patches}
    check = next(c for c in by_id["model-loss"].checks if c.name == "this process")
    assert check.level == doctor.WARN and check.detail.startswith("bypassed (") and "wrapped_forward" in check.detail
    assert not report.ok(strict=True)
