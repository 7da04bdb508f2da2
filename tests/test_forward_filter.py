"""forward-kwargs-filter: HiggsAudioModel.forward takes what the Hugging Face stack passes it.

Every symptom is reproduced on the unpatched model first, then shown gone, then shown back after
revert. Real boson_multimodal, real PEFT, tiny random models on CPU.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

import higgs_patch
import tiny
from higgs_patch.fixes import forward_kwargs_filter

PATCH = "forward-kwargs-filter"


@pytest.fixture
def batch():
    return tiny.fields(tiny.collator()(tiny.samples(2)))


@pytest.fixture
def model():
    return tiny.model().eval()


@pytest.fixture
def reports(monkeypatch, patch_log):
    """The log, with the once-per-process memory of reported names emptied for this test."""
    monkeypatch.setattr(forward_kwargs_filter, "_reported", set())
    return patch_log


def without(batch: dict, *names: str) -> dict:
    return {k: v for k, v in batch.items() if k not in names}


def messages(log, needle: str) -> list[str]:
    return [r.getMessage() for r in log.records if r.name == "higgs_patch" and needle in r.getMessage()]


@pytest.mark.core
def test_labels_is_a_type_error_unpatched_becomes_label_ids_patched_and_is_back_after_revert(model, batch):
    inputs = without(batch, "label_ids")
    with pytest.raises(TypeError, match="unexpected keyword argument 'labels'"):
        model(**inputs, labels=batch["label_ids"])

    reference = model(**batch)  # what label_ids gives, no patch needed
    with higgs_patch.applied(PATCH):
        out = model(**inputs, labels=batch["label_ids"])
    assert out.expanded_labels is not None
    assert torch.equal(out.expanded_labels, reference.expanded_labels)
    assert torch.equal(out.logits, reference.logits)
    assert torch.equal(out.audio_logits, reference.audio_logits)

    with pytest.raises(TypeError, match="unexpected keyword argument 'labels'"):
        model(**inputs, labels=batch["label_ids"])


def test_label_ids_is_kept_and_wins_over_labels(model, batch):
    reference = model(**batch)
    assert reference.expanded_labels is not None
    decoy = torch.full_like(batch["label_ids"], -100)
    with higgs_patch.applied(PATCH):
        both = model(**batch, labels=decoy)
        explicit_none = model(**batch, labels=None)  # what PEFT's causal-LM wrapper passes
    for out in (both, explicit_none):
        assert out.expanded_labels is not None  # the seed dropped label_ids: this was None
        assert torch.equal(out.expanded_labels, reference.expanded_labels)


def test_unknown_kwargs_are_dropped_and_each_name_is_logged_once_per_process(model, batch, reports):
    with pytest.raises(TypeError, match="num_items_in_batch"):
        model(**batch, num_items_in_batch=7)

    reference = model(**batch)
    inputs = without(batch, "label_ids")
    with higgs_patch.applied(PATCH):
        for _ in range(3):
            out = model(**inputs, labels=batch["label_ids"], num_items_in_batch=7, return_loss=True)
            assert torch.equal(out.logits, reference.logits)
            assert torch.equal(out.expanded_labels, reference.expanded_labels)
    assert len(messages(reports, "'num_items_in_batch'")) == 1
    assert len(messages(reports, "'return_loss'")) == 1
    assert len(messages(reports, "as 'label_ids'")) == 1
    for accepted in ("input_ids", "audio_out_ids", "label_audio_ids"):
        assert not messages(reports, f"'{accepted}'")

    with higgs_patch.applied(PATCH):  # once per process, not once per apply
        model(**batch, num_items_in_batch=7)
    assert len(messages(reports, "'num_items_in_batch'")) == 1

    with pytest.raises(TypeError, match="num_items_in_batch"):
        model(**batch, num_items_in_batch=7)


def test_accepted_kwargs_pass_untouched(model, batch):
    reference = model(**batch, output_hidden_states=True)
    with higgs_patch.applied(PATCH):
        out = model(**batch, output_hidden_states=True)
    assert out.hidden_states is not None
    assert len(out.hidden_states) == len(reference.hidden_states)
    assert torch.equal(out.logits, reference.logits)


@pytest.mark.core
@pytest.mark.parametrize("task_type", [None, "CAUSAL_LM"])
def test_a_peft_lora_model_trains_with_labels_and_keeps_its_audio_inputs(batch, task_type):
    base = tiny.model().eval()
    reference = base(**batch)
    expected = higgs_patch.higgs_audio_loss(reference, batch).loss
    peft = get_peft_model(base, LoraConfig(target_modules=["q_proj", "v_proj"], task_type=task_type))
    inputs = without(batch, "label_ids")

    with pytest.raises(TypeError, match="unexpected keyword argument 'labels'"):
        peft(**inputs, labels=batch["label_ids"])
    if task_type == "CAUSAL_LM":  # its wrapper passes labels= even when the caller does not
        with pytest.raises(TypeError, match="unexpected keyword argument 'labels'"):
            peft(**batch)

    with higgs_patch.applied(PATCH):
        out = peft(**inputs, labels=batch["label_ids"])
        plain = peft(**batch)
    for result in (out, plain):
        # audio inputs reached the model: one row of audio logits per audio-out token
        assert result.audio_logits.shape[0] == batch["label_audio_ids"].shape[1] > 0
        assert result.expanded_labels is not None
        # LoRA starts as the identity: the wrapped model computes exactly what the base model does
        torch.testing.assert_close(higgs_audio_loss_of(result, batch), expected)
    assert higgs_patch.higgs_audio_loss(out, batch).audio is not None

    # and the adapters get gradients through the patched call
    with higgs_patch.applied(PATCH):
        peft.train()
        higgs_patch.higgs_audio_loss(peft(**inputs, labels=batch["label_ids"]), batch).loss.backward()
    lora_b = [p for n, p in peft.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)

    with pytest.raises(TypeError, match="unexpected keyword argument 'labels'"):
        peft(**inputs, labels=batch["label_ids"])


def higgs_audio_loss_of(outputs, batch) -> torch.Tensor:
    return higgs_patch.higgs_audio_loss(outputs, batch).loss.detach()


def test_without_audio_inputs_the_loss_differs(model, batch):
    """Guards the PEFT test above: had the audio inputs been dropped, its loss could not match."""
    with higgs_patch.applied(PATCH):
        full = model(**batch)
        text_only = model(**without(batch, "audio_in_ids", "audio_in_ids_start"))
    assert not torch.allclose(
        higgs_patch.higgs_audio_loss(full, batch).loss, higgs_patch.higgs_audio_loss(text_only, batch).loss
    )
