"""One objective whoever computes the loss: the model (model-loss), a user's compute_loss calling
higgs_audio_loss, the Trainer's own compute_loss; and a remembered loss only for the tensors it scored.

Precedence (higgs_patch/loss.py): a keyword passed to higgs_audio_loss, else the options of the applied
model-loss patch, else (label smoothing) the Trainer's label_smoothing_factor while it computes a loss,
else the mean without smoothing. After revert() nothing is applied: the mean again.
"""

from __future__ import annotations

import pytest
import torch
from test_accumulation import CallsHiggsAudioLoss, ReadsModelLoss
from transformers import Trainer, TrainingArguments

import higgs_patch
import tiny

AUDIO_HEAD = "audio_decoder_proj.audio_lm_head.weight"


def batch_of(count=3):
    return tiny.fields(tiny.collator()(tiny.samples(count)))


def parts(outputs, batch):
    """Text and audio components computed afresh, to build the expected totals from."""
    plain = higgs_patch.higgs_audio_loss(dict(outputs), batch, text_loss_weight=False, audio_loss_weight=False)
    return plain.text, plain.audio


# --- item 1: the applied weights reach every loss -----------------------------------------------------


def test_higgs_audio_loss_trains_the_objective_the_patch_was_applied_with():
    model, batch = tiny.model().train(), batch_of()
    with higgs_patch.applied(audio_loss_weight=0.0):
        outputs = model(**batch)
        text, audio = parts(outputs, batch)
        torch.testing.assert_close(outputs.loss, text)  # the model's loss: text only
        asked = higgs_patch.higgs_audio_loss(outputs, batch)
        assert asked.loss is outputs.loss  # the same objective, not scored twice
        fresh = higgs_patch.higgs_audio_loss(dict(model(**batch)), batch)
        torch.testing.assert_close(fresh.loss, text)  # a fresh output (no cache) scored with the same weights
        explicit = higgs_patch.higgs_audio_loss(outputs, batch, audio_loss_weight=1.0)
        torch.testing.assert_close(explicit.loss, text + audio)  # a keyword wins (text weight still the patch's)
        mean = higgs_patch.higgs_audio_loss(outputs, batch, text_loss_weight=False, audio_loss_weight=False)
        torch.testing.assert_close(mean.loss, (text + audio) / 2)  # False: the mean, whatever was applied
    after = higgs_patch.higgs_audio_loss(dict(outputs), batch)
    torch.testing.assert_close(after.loss, (text + audio) / 2)  # reverted: nothing applied, the mean


def arguments(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no", remove_unused_columns=False,
                    disable_tqdm=True, seed=0, logging_steps=1, per_device_train_batch_size=2, max_steps=2,
                    learning_rate=1e-2)
    settings.update(overrides)
    return TrainingArguments(**settings)


@pytest.mark.parametrize("trainer_class", [Trainer, ReadsModelLoss, CallsHiggsAudioLoss],
                         ids=["stock Trainer", "subclass reads outputs['loss']", "subclass calls higgs_audio_loss"])
def test_an_audio_head_switched_off_is_not_trained_whoever_computes_the_loss(tmp_path, trainer_class):
    model = tiny.model()
    head = model.get_parameter(AUDIO_HEAD).detach().clone()
    with higgs_patch.applied(audio_loss_weight=0.0):
        trainer = trainer_class(model=model, args=arguments(tmp_path), train_dataset=tiny.samples(4),
                                data_collator=tiny.DictCollator(tiny.collator()))
        trainer.train()
    assert torch.equal(model.get_parameter(AUDIO_HEAD), head)  # weight 0: no gradient reaches the audio head
    assert not torch.equal(model.get_parameter("embed_tokens.weight"), tiny.model().get_parameter("embed_tokens.weight"))


EPSILON = 0.1


@pytest.mark.parametrize("trainer_class", [Trainer, ReadsModelLoss, CallsHiggsAudioLoss],
                         ids=["stock Trainer", "subclass reads outputs['loss']", "subclass calls higgs_audio_loss"])
def test_the_trainers_label_smoothing_reaches_every_loss_in_its_steps(tmp_path, trainer_class):
    seen = []

    class Records(trainer_class):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
            batch = {k: v for k, v in inputs.items() if k != "labels"}
            smoothed = higgs_patch.higgs_audio_loss(dict(outputs), batch, label_smoothing=EPSILON).loss
            plain = higgs_patch.higgs_audio_loss(dict(outputs), batch, label_smoothing=0.0).loss
            seen.append((loss.detach(), smoothed.detach(), plain.detach()))
            return (loss, outputs) if return_outputs else loss

    with higgs_patch.applied():
        trainer = Records(model=tiny.model(), args=arguments(tmp_path, label_smoothing_factor=EPSILON, max_steps=1),
                          train_dataset=tiny.samples(2), data_collator=tiny.DictCollator(tiny.collator()))
        trainer.train()
        evaluated = trainer.evaluate(tiny.samples(2))
    (loss, smoothed, plain), *evaluation = seen
    torch.testing.assert_close(loss, smoothed)
    assert abs(float(plain) - float(smoothed)) > 1e-3  # the smoothing is visible at this epsilon
    torch.testing.assert_close(torch.tensor(evaluated["eval_loss"]), evaluation[0][1])  # evaluation smoothed too


def test_outside_a_trainer_no_label_smoothing_is_applied_unless_asked():
    model, batch = tiny.model().train(), batch_of()
    with higgs_patch.applied():
        outputs = model(**batch)
        smoothed = higgs_patch.higgs_audio_loss(outputs, batch, label_smoothing=EPSILON)
        plain = higgs_patch.higgs_audio_loss(dict(outputs), batch, label_smoothing=0.0)
    torch.testing.assert_close(outputs.loss, plain.loss)
    assert abs(smoothed.loss.item() - plain.loss.item()) > 1e-4


# --- item 6: the remembered loss is keyed on the tensors it scored -------------------------------------


@pytest.mark.parametrize("how", ["item", "attribute", "in place"])
def test_a_replaced_logits_tensor_is_scored_afresh(how):
    model, batch = tiny.model().train(), batch_of()
    with higgs_patch.applied():
        outputs = model(**batch)
        before = higgs_patch.higgs_audio_loss(outputs, batch).loss
        assert before is outputs.loss
        for name in ("logits", "audio_logits"):
            if how == "item":
                outputs[name] = outputs[name] * 1.5
            elif how == "attribute":
                setattr(outputs, name, outputs[name] * 1.5)
            else:
                with torch.no_grad():
                    outputs[name].mul_(1.5)
        after = higgs_patch.higgs_audio_loss(outputs, batch).loss
    expected = higgs_patch.higgs_audio_loss(dict(outputs), batch).loss
    torch.testing.assert_close(after, expected)
    assert abs(after.item() - before.item()) > 1e-3


def test_other_audio_labels_or_expanded_labels_are_scored_afresh():
    model, batch = tiny.model().train(), batch_of()
    with higgs_patch.applied():
        outputs = model(**batch)
        other = {**batch, "label_audio_ids": batch["label_audio_ids"].clone()}
        other["label_audio_ids"][:, 1::2] = -100
        assert higgs_patch.higgs_audio_loss(outputs, other).loss is not outputs.loss
        outputs["expanded_labels"] = torch.where(outputs.expanded_labels > 100, -100, outputs.expanded_labels)
        relabelled = higgs_patch.higgs_audio_loss(outputs, batch)
    assert relabelled.loss is not outputs.loss
    torch.testing.assert_close(relabelled.loss, higgs_patch.higgs_audio_loss(dict(outputs), batch).loss)


# --- item 3: return_dict=False puts the loss first, as Hugging Face models do --------------------------


def test_a_tuple_output_with_labels_starts_with_the_loss():
    model, batch = tiny.model().train(), batch_of()
    unpatched = model(**batch, return_dict=False)
    with higgs_patch.applied():
        patched = model(**batch, return_dict=False)
        named = model(**batch)
    assert isinstance(patched, tuple) and len(patched) == len(unpatched) + 1
    torch.testing.assert_close(patched[0], named.loss)
    assert patched[0].dim() == 0 and patched[0].requires_grad
    for got, expected in zip(patched[1:], unpatched):  # then upstream's tuple, unchanged
        torch.testing.assert_close(got, expected)


def test_the_stock_trainer_trains_a_model_configured_for_tuples(tmp_path):
    model = tiny.model(return_dict=False)
    assert not model.config.use_return_dict
    with higgs_patch.applied():
        trainer = Trainer(model=model, args=arguments(tmp_path, max_steps=3), train_dataset=tiny.samples(4),
                          data_collator=tiny.DictCollator(tiny.collator()))
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(value > 0 for value in losses)


def test_a_tuple_output_without_labels_is_upstreams():
    model, batch = tiny.model().eval(), batch_of()
    without = {k: v for k, v in batch.items() if k not in ("label_ids", "label_audio_ids")}
    with torch.no_grad():
        unpatched = model(**without, return_dict=False)
        with higgs_patch.applied():
            patched = model(**without, return_dict=False)
    assert len(patched) == len(unpatched)
    for got, expected in zip(patched, unpatched):
        torch.testing.assert_close(got, expected)
