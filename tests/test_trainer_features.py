"""Trainer features the hook must honour, never silently override: label smoothing, a user's
``compute_loss_func``, ``torch_compile``. Each against the real Trainer and transformers' own code."""

from __future__ import annotations

import pytest
import torch
from test_accumulation import WITHOUT_TRAINER_HOOK, train_recorded
from test_trainer import arguments
from transformers import Trainer
from transformers.trainer_pt_utils import LabelSmoother

import higgs_patch
import tiny
from higgs_patch.loss import next_token_targets

EPSILON = 0.3


def labelled_batch():
    return tiny.DictCollator(tiny.collator())(tiny.samples(3))


def transformers_smoothing(outputs, batch) -> torch.Tensor:
    """transformers' LabelSmoother on text (shifted, as for causal LMs) and on audio, then their mean."""
    smoother = LabelSmoother(epsilon=EPSILON)
    text = smoother({"logits": outputs.logits}, outputs.expanded_labels, shift_labels=True)
    audio = smoother({"logits": outputs.audio_logits}, next_token_targets(batch["label_audio_ids"]).t())
    return (text + audio) / 2


def peaked_model():
    """A tiny model with confident heads, where smoothing changes the loss a lot."""
    model = tiny.model().eval()
    with torch.no_grad():
        model.audio_decoder_proj.text_lm_head.weight.mul_(30)
        model.audio_decoder_proj.audio_lm_head.weight.mul_(30)
    return model


def test_label_smoothing_is_applied_to_text_and_audio_as_transformers_applies_it(tmp_path):
    model, inputs = peaked_model(), labelled_batch()
    trainer = Trainer(model=model, args=arguments(tmp_path, label_smoothing_factor=EPSILON))
    with torch.no_grad(), higgs_patch.applied():
        loss, outputs = trainer.compute_loss(model, dict(inputs), return_outputs=True)
        plain = model(**inputs).loss
    torch.testing.assert_close(loss, transformers_smoothing(outputs, inputs))
    assert abs(float(loss) - float(plain)) > 0.01  # smoothed, not the plain loss (float noise is ~1e-6)


def test_without_the_hook_label_smoothing_scores_expanded_logits_against_raw_labels(tmp_path):
    model, inputs = tiny.model().eval(), labelled_batch()
    trainer = Trainer(model=model, args=arguments(tmp_path, label_smoothing_factor=EPSILON))
    with torch.no_grad(), higgs_patch.applied(*WITHOUT_TRAINER_HOOK):
        with pytest.raises(RuntimeError):  # logits over the expanded sequence, labels over the raw one
            trainer.compute_loss(model, dict(inputs))


def test_label_smoothing_trains(tmp_path):
    samples = tiny.samples(4)
    with higgs_patch.applied():
        trainer = Trainer(
            model=tiny.model(), args=arguments(tmp_path, label_smoothing_factor=EPSILON, max_steps=6,
                                               per_device_train_batch_size=2, learning_rate=3e-3),
            train_dataset=samples, data_collator=tiny.DictCollator(tiny.collator()),
        )
        trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 6 and losses[-1] < losses[0]


def test_a_users_compute_loss_func_is_called_with_what_transformers_gives_it(tmp_path):
    calls = []

    def compute_loss_func(outputs, labels, num_items_in_batch=None):
        calls.append((outputs, labels, num_items_in_batch))
        return outputs["logits"].float().mean() * 0 + 7.0

    model, inputs = tiny.model(), labelled_batch()
    trainer = Trainer(model=model, args=arguments(tmp_path), compute_loss_func=compute_loss_func)
    with higgs_patch.applied():
        loss = trainer.compute_loss(model, dict(inputs))
    assert float(loss) == 7.0 and len(calls) == 1
    outputs, labels, num_items = calls[0]
    assert torch.equal(labels, inputs["labels"]) and num_items is None
    assert outputs.logits.dim() == 3


def test_a_compiled_model_is_recognised_and_gets_the_exact_accumulated_update(tmp_path):
    samples = tiny.samples(2)
    with higgs_patch.applied():
        plain, _, plain_logs = train_recorded(tmp_path, samples, 2, max_steps=1)
        compiled, _, compiled_logs = train_recorded(
            tmp_path, samples, 2, max_steps=1, torch_compile=True, torch_compile_backend="eager"
        )
    torch.testing.assert_close(compiled[1], plain[1], rtol=1e-5, atol=1e-7)
    assert compiled_logs == pytest.approx(plain_logs, rel=1e-4)
