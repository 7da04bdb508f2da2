"""trainer-compute-loss and the whole plugin under the real Hugging Face Trainer.

A user-style script: tiny model, the upstream collator wrapped to give the Trainer a dict with
``labels``, ``Trainer.train()``. Unpatched it cannot train; patched it trains for several epochs with
falling losses and audio supervision in every epoch, with or without LoRA; under gradient
accumulation its update is that of one large batch.
"""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import higgs_patch
import tiny

ALL_BUT_COLLATOR = tuple(s.id for s in higgs_patch.status() if s.default and s.id != "collator-audio-index")


def arguments(tmp_path, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no", remove_unused_columns=False,
        disable_tqdm=True, seed=0, logging_steps=1, per_device_train_batch_size=2,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def trainer_for(model, tmp_path, train=None, eval=None, with_labels=True, trainer_class=Trainer, **overrides):
    return trainer_class(
        model=model,
        args=arguments(tmp_path, **overrides),
        train_dataset=train,
        eval_dataset=eval,
        data_collator=tiny.DictCollator(tiny.collator(), with_labels=with_labels),
    )


def training_logs(trainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def epoch_of(entry: dict) -> int:
    return math.ceil(round(entry["epoch"], 6))


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


# --- the symptom ---------------------------------------------------------------------------------


@pytest.mark.parametrize("with_labels, error, message", [
    (True, TypeError, "unexpected keyword argument 'labels'"),
    (False, ValueError, "did not return a loss"),
])
def test_unpatched_the_trainer_cannot_train_patched_it_can_reverted_it_cannot(tmp_path, with_labels, error, message):
    def train():
        trainer = trainer_for(tiny.model(), tmp_path, tiny.samples(2), with_labels=with_labels, max_steps=1)
        return trainer.train()

    with pytest.raises(error, match=message):
        train()
    with higgs_patch.applied():
        assert math.isfinite(train().training_loss)
    with pytest.raises(error, match=message):
        train()


def test_the_forward_filter_alone_leaves_the_trainer_without_a_loss(tmp_path):
    with higgs_patch.applied("forward-kwargs-filter"):
        with pytest.raises(ValueError, match="did not return a loss"):
            trainer_for(tiny.model(), tmp_path, tiny.samples(2), max_steps=1).train()


# --- end to end ----------------------------------------------------------------------------------

EPOCHS = 6


def train_epochs(tmp_path, model, samples, **overrides):
    trainer = trainer_for(model, tmp_path, samples, num_train_epochs=EPOCHS, **overrides)
    trainer.train()
    return trainer


def assert_trains(trainer, steps: int) -> None:
    logs = training_logs(trainer)
    assert len(logs) == steps
    for entry in logs:
        assert math.isfinite(entry["loss"]) and entry["loss"] > 0
        assert math.isfinite(entry["grad_norm"]) and entry["grad_norm"] > 0
        # the components logged with a step are those of that step's batch
        assert entry["loss"] == pytest.approx((entry["text_loss"] + entry["audio_loss"]) / 2, abs=1e-3)
        assert all(f"audio_loss_cb{c}" in entry for c in range(tiny.CODEBOOKS))
    by_epoch = {epoch: [e["loss"] for e in logs if epoch_of(e) == epoch] for epoch in range(1, EPOCHS + 1)}
    assert mean(by_epoch[EPOCHS]) < mean(by_epoch[1])
    assert {epoch_of(e) for e in logs if e.get("audio_loss", 0) > 0} == set(range(1, EPOCHS + 1))


def test_a_user_script_trains_for_several_epochs_with_audio_supervision_in_every_epoch(tmp_path):
    samples = tiny.samples(8)
    with higgs_patch.applied():
        trainer = train_epochs(tmp_path, tiny.model(), samples, learning_rate=3e-3)
    assert_trains(trainer, steps=EPOCHS * 8 // 2)

    # without collator-audio-index the audio supervision is gone after the first epoch
    with higgs_patch.applied(*ALL_BUT_COLLATOR):
        trainer = train_epochs(tmp_path, tiny.model(), tiny.samples(8), learning_rate=3e-3)
    assert {epoch_of(e) for e in training_logs(trainer) if "audio_loss" in e} == {1}


@pytest.mark.parametrize("task_type", ["CAUSAL_LM", None])
def test_a_peft_lora_model_trains_the_same_way(tmp_path, task_type):
    model = get_peft_model(tiny.model(), LoraConfig(target_modules=["q_proj", "v_proj"], task_type=task_type))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with higgs_patch.applied():
        trainer = train_epochs(tmp_path, model, tiny.samples(8), learning_rate=1e-2)
    assert_trains(trainer, steps=EPOCHS * 8 // 2)
    params = dict(model.named_parameters())
    assert adapters and all("lora_" in n for n in adapters)
    assert all(torch.equal(params[n], value) for n, value in frozen.items())
    assert any(not torch.equal(params[n], value) for n, value in adapters.items())


def held_out_again():
    """Three held-out samples of different lengths, built afresh on every call."""
    return [tiny.sample(seed=100 + i, text=4 + i, target=6 + i) for i in range(3)]


def test_evaluate_reports_the_loss_of_higgs_audio_loss_on_the_same_batch(tmp_path):
    model = tiny.model()
    with higgs_patch.applied():
        trainer = trainer_for(model, tmp_path, eval=held_out_again(), per_device_eval_batch_size=3)
        first, second = trainer.evaluate(), trainer.evaluate()
        batch = tiny.fields(tiny.collator()(held_out_again()))
        model.eval()
        with torch.no_grad():
            expected = higgs_patch.higgs_audio_loss(model(**batch), batch)
    assert expected.audio is not None and expected.text is not None
    assert first["eval_loss"] == pytest.approx(float(expected.loss), rel=1e-5)
    assert second["eval_loss"] == first["eval_loss"]  # evaluating again scores the same audio labels

    with higgs_patch.applied(*ALL_BUT_COLLATOR):  # upstream's collator: the second evaluation lost its audio labels
        trainer = trainer_for(model, tmp_path, eval=held_out_again(), per_device_eval_batch_size=3)
        unpatched_first, unpatched_second = trainer.evaluate(), trainer.evaluate()
    assert unpatched_first["eval_loss"] == pytest.approx(first["eval_loss"], rel=1e-5)
    assert unpatched_second["eval_loss"] != pytest.approx(first["eval_loss"], rel=1e-3)


def test_the_loss_weights_reach_the_trainer(tmp_path):
    model = tiny.model()
    held_out = tiny.samples(3)
    batch = tiny.fields(tiny.collator()(tiny.samples(3)))
    with higgs_patch.applied(text_loss_weight=0.25, audio_loss_weight=2.0):
        trainer = trainer_for(model, tmp_path, eval=held_out, per_device_eval_batch_size=3)
        eval_loss = trainer.evaluate()["eval_loss"]
    model.eval()
    with torch.no_grad():
        plain = higgs_patch.higgs_audio_loss(model(**batch), batch)
    assert eval_loss == pytest.approx(float(0.25 * plain.text + 2.0 * plain.audio), rel=1e-5)


def test_a_batch_with_labels_and_no_label_ids_is_scored_with_its_labels(tmp_path):
    model = tiny.model().eval()
    inputs = tiny.DictCollator(tiny.collator())(tiny.samples(2))
    trainer = Trainer(model=model, args=arguments(tmp_path))
    with higgs_patch.applied():
        only_labels = trainer.compute_loss(model, {k: v for k, v in inputs.items() if k != "label_ids"})
        both = trainer.compute_loss(model, dict(inputs))
    torch.testing.assert_close(only_labels, both)


def test_a_model_that_is_not_higgs_audio_keeps_the_original_compute_loss(tmp_path):
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    inputs = {"input_ids": torch.randint(0, 64, (2, 7)), "labels": torch.randint(0, 64, (2, 7))}
    trainer = Trainer(model=llama, args=arguments(tmp_path))
    with higgs_patch.applied("trainer-compute-loss"):
        loss = trainer.compute_loss(llama, dict(inputs))
    torch.testing.assert_close(loss, llama(**inputs).loss)


# --- gradient accumulation -----------------------------------------------------------------------


def one_update(tmp_path, batch_size, steps, with_labels=True, trainer_class=Trainer):
    """Parameter update and logged loss of one optimizer step over the same 4 samples."""
    model = tiny.model()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = trainer_for(
        model, tmp_path, tiny.samples(4), with_labels=with_labels, trainer_class=trainer_class,
        per_device_train_batch_size=batch_size, gradient_accumulation_steps=steps, max_steps=1,
        optim="sgd", learning_rate=0.1, lr_scheduler_type="constant", max_grad_norm=0,
    )
    result = trainer.train()
    assert trainer.state.global_step == 1
    update = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    return update, result.training_loss


@pytest.mark.parametrize("with_labels", [True, False])
def test_two_accumulated_batches_of_two_make_the_update_of_one_batch_of_four(tmp_path, with_labels):
    with higgs_patch.applied():
        large, large_loss = one_update(tmp_path, 4, 1, with_labels)
        accumulated, accumulated_loss = one_update(tmp_path, 2, 2, with_labels)
    assert large.norm() > 0
    torch.testing.assert_close(accumulated, large, rtol=1e-4, atol=1e-6)
    assert (accumulated - large).norm() < 1e-4 * large.norm()
    assert accumulated_loss == pytest.approx(large_loss, rel=1e-5)


def test_an_epochs_short_last_window_makes_the_update_of_the_batches_it_holds(tmp_path):
    """Two accumulation steps, one batch in the epoch: the update and logged loss of that one batch."""

    def one_epoch(steps):
        model = tiny.model()
        before = [p.detach().clone() for p in model.parameters()]
        trainer = trainer_for(
            model, tmp_path, tiny.samples(2), per_device_train_batch_size=2, gradient_accumulation_steps=steps,
            num_train_epochs=1, optim="sgd", learning_rate=0.1, lr_scheduler_type="constant", max_grad_norm=0,
        )
        result = trainer.train()
        assert trainer.state.global_step == 1
        return torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)]), result.training_loss

    with higgs_patch.applied():
        single, single_loss = one_epoch(1)
        short, short_loss = one_epoch(2)
    assert single.norm() > 0
    torch.testing.assert_close(short, single, rtol=1e-4, atol=1e-6)
    assert short_loss == pytest.approx(single_loss, rel=1e-5)
