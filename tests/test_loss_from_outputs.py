"""A Higgs Audio model whose forward returns no loss still trains, on the model's own loss.

A class-level replacement of ``HiggsAudioModel.forward`` made after ``apply()`` that calls the
upstream function (status ``bypassed``), or a subclass whose forward is upstream's, never reaches
model-loss: its outputs carry logits but no loss. The Trainer hook scores them, with the
model-loss patch's weights and the Trainer's label smoothing, so every update is the one the
patched forward gives.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from packaging.version import Version
from boson_multimodal.model.higgs_audio.modeling_higgs_audio import HiggsAudioModel
from transformers import Trainer, TrainingArguments

import higgs_patch
import tiny

UPSTREAM_FORWARD = vars(HiggsAudioModel)["forward"]  # read at import, before anything is applied


def without_loss(self, labels=None, **kwargs):
    """What a copied or replaced forward does: labels mapped, upstream's forward, no loss.

    Its ``**kwargs`` make transformers >= 4.47 take it for a model that divides by ``num_items_in_batch``
    and pass it the count, which upstream's forward rejects (TypeError): the hook passes no count to a
    Higgs Audio model, whose loss is a mean whatever it is given.
    """
    if labels is not None and "label_ids" not in kwargs:
        kwargs["label_ids"] = labels
    return UPSTREAM_FORWARD(self, **kwargs)


def without_loss_or_count(self, labels=None, num_items_in_batch=None, **kwargs):
    """The same, dropping the count itself, as such a forward must without the hook on 4.47 and later."""
    return without_loss(self, labels, **kwargs)


class CopiedForward(HiggsAudioModel):
    """A subclass carrying its own copy of upstream's forward (never patched)."""

    forward = without_loss


@pytest.fixture
def restore_forward():
    saved = vars(HiggsAudioModel)["forward"]
    yield
    HiggsAudioModel.forward = saved


def train(tmp_path, model, **overrides):
    settings = dict(output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no",
                    remove_unused_columns=False, disable_tqdm=True, seed=0, logging_steps=1,
                    per_device_train_batch_size=2, max_steps=3, optim="sgd", learning_rate=0.1,
                    lr_scheduler_type="constant", max_grad_norm=0)
    settings.update(overrides)
    trainer = Trainer(model=model, args=TrainingArguments(**settings), train_dataset=tiny.samples(6),
                      data_collator=tiny.DictCollator(tiny.collator()))
    trainer.train()
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    return weights, [e["loss"] for e in trainer.state.log_history if "loss" in e]


SETTINGS = {
    "defaults": ({}, {}),
    "loss weights": ({"text_loss_weight": 0.5, "audio_loss_weight": 2.0}, {}),
    "label smoothing": ({}, {"label_smoothing_factor": 0.1}),
    "accumulation 2": ({}, {"gradient_accumulation_steps": 2, "per_device_train_batch_size": 1}),
}


@pytest.mark.core
@pytest.mark.parametrize("how", ["replaced after apply()", "a subclass with upstream's forward"])
@pytest.mark.parametrize("setting", SETTINGS, ids=list(SETTINGS))
def test_a_forward_without_loss_trains_on_the_models_own_loss(tmp_path, restore_forward, how, setting):
    options, arguments = SETTINGS[setting]
    with higgs_patch.applied(**options):
        expected, expected_logs = train(tmp_path, tiny.model(), **arguments)
        if how == "replaced after apply()":
            HiggsAudioModel.forward = without_loss
            model = tiny.model()
            assert {s.id: s.state for s in higgs_patch.status()}["model-loss"] == "bypassed"
        else:
            torch.manual_seed(0)
            model = CopiedForward(tiny.config())
        got, logs = train(tmp_path, model, **arguments)
    assert logs == pytest.approx(expected_logs, abs=1e-4)
    torch.testing.assert_close(got, expected)
    assert not torch.equal(got, torch.cat([p.detach().flatten() for p in tiny.model().parameters()]))


@pytest.mark.core
def test_without_the_hook_a_forward_without_loss_stops_the_trainer(tmp_path, restore_forward):
    with higgs_patch.applied(*[s.id for s in higgs_patch.status() if s.default and s.id != "trainer-compute-loss"]):
        HiggsAudioModel.forward = without_loss_or_count
        with pytest.raises(ValueError, match="did not return a loss"):
            train(tmp_path, tiny.model())


@pytest.mark.core
def test_without_the_hook_a_forward_taking_kwargs_is_handed_the_count_where_the_trainer_passes_it(
        tmp_path, restore_forward):
    """transformers 4.47 and later pass num_items_in_batch to a forward that takes **kwargs (4.46: only one
    naming **loss_kwargs): upstream's forward, given it, raises."""
    with higgs_patch.applied(*[s.id for s in higgs_patch.status() if s.default and s.id != "trainer-compute-loss"]):
        HiggsAudioModel.forward = without_loss
        if Version(transformers.__version__) < Version("4.47"):
            with pytest.raises(ValueError, match="did not return a loss"):
                train(tmp_path, tiny.model())
        else:
            with pytest.raises(TypeError, match="unexpected keyword argument 'num_items_in_batch'"):
                train(tmp_path, tiny.model())


@pytest.mark.core
def test_outputs_without_logits_still_say_the_model_returned_no_loss(tmp_path, restore_forward):
    def no_logits(self, **kwargs):
        return {"audio_logits": without_loss(self, **kwargs).audio_logits}

    with higgs_patch.applied():
        HiggsAudioModel.forward = no_logits
        with pytest.raises(ValueError, match="did not return a loss"):
            train(tmp_path, tiny.model())
