"""sparse-text-logits: the same loss and gradients as the dense path, upstream's outputs elsewhere."""

from __future__ import annotations

import pytest
import torch

import higgs_patch
import tiny

DENSE = ("forward-kwargs-filter", "collator-audio-index", "device-tensor-factory")


def batch_for(samples, **collator_settings) -> dict:
    return tiny.DictCollator(tiny.collator(**collator_settings))(samples)


def loss_and_grads(batch: dict, sparse: bool, **model_settings):
    model = tiny.model(**model_settings)
    model.train()
    ids = DENSE + (("sparse-text-logits",) if sparse else ())
    with higgs_patch.applied(*ids):
        outputs = model(**batch)
        result = higgs_patch.higgs_audio_loss(outputs, batch)
        result.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return result, grads, outputs


def text_unsupervised(samples):
    for sample in samples:
        sample.label_ids = torch.where(sample.input_ids == tiny.AUDIO_OUT, sample.label_ids, torch.full_like(sample.label_ids, -100))
    return samples


CASES = {
    "right padding": (dict(), dict()),
    "left padding": (dict(pad_left=True), dict()),
    "delay pattern": (dict(use_delay_pattern=True), dict(use_delay_pattern=True)),
}


@pytest.mark.core
@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_every_gradient_equal_the_dense_path(case):
    collator_settings, model_settings = CASES[case]
    samples = [tiny.sample(seed=i, text=4 + 3 * i, answer=2 + i) for i in range(3)]  # unequal lengths: padding
    batch = batch_for(samples, **collator_settings)
    dense, dense_grads, dense_out = loss_and_grads(batch, sparse=False, **model_settings)
    sparse, sparse_grads, sparse_out = loss_and_grads(batch, sparse=True, **model_settings)

    assert dense_out.logits.dim() == 3 and "text_logit_positions" not in dense_out
    supervised = int((torch.nn.functional.pad(dense_out.expanded_labels, (0, 1), value=-100)[:, 1:] != -100).sum())
    assert sparse_out.logits.shape == (supervised, tiny.VOCAB) and supervised < dense_out.logits.shape[:2].numel() // 4
    torch.testing.assert_close(sparse.loss, dense.loss)
    torch.testing.assert_close(sparse.text, dense.text)
    torch.testing.assert_close(sparse.audio, dense.audio)
    assert sparse.text_tokens == dense.text_tokens == supervised
    assert sparse_grads.keys() == dense_grads.keys()
    for name, grad in dense_grads.items():
        torch.testing.assert_close(sparse_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_batch_without_supervised_text_has_no_text_logits_and_the_dense_loss():
    batch = batch_for(text_unsupervised(tiny.samples(2)))
    dense, dense_grads, _ = loss_and_grads(batch, sparse=False)
    sparse, sparse_grads, sparse_out = loss_and_grads(batch, sparse=True)
    assert sparse_out.logits.shape == (0, tiny.VOCAB)
    assert sparse.text is None and dense.text is None
    torch.testing.assert_close(sparse.loss, dense.loss)
    for name, grad in dense_grads.items():
        torch.testing.assert_close(sparse_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def upstream_outputs(model, batch, train: bool):
    model.train(train)
    with torch.no_grad():
        return model(**batch)


@pytest.mark.parametrize("mode", ["eval with labels", "train without labels"])
def test_outputs_are_upstreams_in_eval_mode_and_without_labels(mode):
    batch = batch_for(tiny.samples(2))
    if mode == "train without labels":
        batch = {k: v for k, v in batch.items() if k not in ("labels", "label_ids")}
    model = tiny.model()
    train = mode.startswith("train")
    with higgs_patch.applied(*DENSE):
        expected = upstream_outputs(model, batch, train)
        with higgs_patch.applied("sparse-text-logits"):
            got = upstream_outputs(model, batch, train)
    assert "text_logit_positions" not in got
    assert got.keys() == expected.keys()
    for key in expected.keys():
        if isinstance(expected[key], torch.Tensor):
            assert torch.equal(got[key], expected[key]), key


def test_revert_restores_the_dense_path():
    batch = batch_for(tiny.samples(2))
    model = tiny.model().train()
    with higgs_patch.applied(*DENSE):
        with higgs_patch.applied("sparse-text-logits"):
            assert model(**batch).logits.dim() == 2
        outputs = model(**batch)
    assert outputs.logits.dim() == 3 and "text_logit_positions" not in outputs


@pytest.mark.core
def test_the_trainer_logs_the_same_losses_with_and_without_it(tmp_path):
    from transformers import Trainer, TrainingArguments

    def logged(extra):
        args = TrainingArguments(
            output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no", remove_unused_columns=False,
            disable_tqdm=True, seed=0, logging_steps=1, per_device_train_batch_size=2, max_steps=4, learning_rate=3e-3,
        )
        with higgs_patch.applied(), higgs_patch.applied(*extra):
            trainer = Trainer(model=tiny.model(), args=args, train_dataset=tiny.samples(8),
                              data_collator=tiny.DictCollator(tiny.collator()))
            trainer.train()
        return [h[key] for h in trainer.state.log_history if "loss" in h for key in ("loss", "text_loss", "audio_loss")]

    dense = logged(("forward-kwargs-filter",))
    sparse = logged(("sparse-text-logits",))
    assert len(dense) == 4 * 3
    assert sparse == pytest.approx(dense, abs=2e-4)  # the logs are rounded to 4 decimals
