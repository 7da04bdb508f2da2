"""higgs_audio_loss and the trainer-compute-loss hook: what is scored against what, and edge batches.

Labels are aligned with inputs: logits at t predict the label at t + 1, for text and for audio. A
model whose logits put their mass on the next token must score near zero, one that predicts the
current token (the seed's unshifted audio loss rewards that) must score badly.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments

import higgs_patch
import tiny

IGNORE = -100


def varied_samples(count: int = 3):
    return [tiny.sample(seed=i, text=4 + i, reference=3 + i, target=5 + 2 * i, answer=2 + i) for i in range(count)]


def collate(samples, **overrides) -> dict:
    return tiny.fields(tiny.collator(**overrides)(samples))


@pytest.fixture(scope="module")
def real():
    """A real collated batch of samples of different lengths and the tiny model's output for it."""
    batch = collate(varied_samples())
    with torch.no_grad():
        outputs = tiny.model().eval()(**batch)
    return batch, outputs


def next_labels(labels: torch.Tensor) -> torch.Tensor:
    """The label each position predicts: the one at the next position along the last dimension."""
    return torch.cat([labels[..., 1:], torch.full_like(labels[..., :1], IGNORE)], dim=-1)


def peaked(targets: torch.Tensor, classes: int, strength: float = 40.0) -> torch.Tensor:
    """Logits with all their mass on ``targets`` (uniform where the target is IGNORE)."""
    logits = torch.zeros(*targets.shape, classes)
    valid = targets != IGNORE
    logits[valid] = F.one_hot(targets[valid], classes).float() * strength
    return logits


def synthetic(real, predict) -> dict:
    """Outputs whose text and audio logits predict ``predict(labels)`` at every position."""
    batch, outputs = real
    text = outputs.expanded_labels
    audio = batch["label_audio_ids"]  # (codebooks, tokens)
    return {
        "logits": peaked(predict(text), outputs.logits.shape[-1]),
        "expanded_labels": text,
        "audio_logits": peaked(predict(audio).t(), outputs.audio_logits.shape[-1]),
    }


def reference_loss(outputs, batch) -> dict:
    """The loss written the plain way: slice the logits, flatten, F.cross_entropy's mean."""
    logits, labels = outputs["logits"], outputs["expanded_labels"]
    text = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
    audio_logits, audio_labels = outputs["audio_logits"], batch["label_audio_ids"]
    audio = F.cross_entropy(
        audio_logits[:-1].reshape(-1, audio_logits.shape[-1]), audio_labels[:, 1:].t().reshape(-1)
    )
    per_codebook = torch.stack(
        [F.cross_entropy(audio_logits[:-1, c], audio_labels[c, 1:]) for c in range(audio_labels.shape[0])]
    )
    return {
        "loss": (text + audio) / 2,
        "text": text,
        "audio": audio,
        "per_codebook": per_codebook,
        "text_tokens": int((labels[:, 1:] != IGNORE).sum()),
        "audio_tokens": int((audio_labels[:, 1:] != IGNORE).sum()),
    }


def assert_matches_reference(result, reference) -> None:
    torch.testing.assert_close(result.loss.detach(), reference["loss"].detach())
    torch.testing.assert_close(result.text, reference["text"].detach())
    torch.testing.assert_close(result.audio, reference["audio"].detach())
    torch.testing.assert_close(result.audio_per_codebook, reference["per_codebook"].detach())
    assert (result.text_tokens, result.audio_tokens) == (reference["text_tokens"], reference["audio_tokens"])


# --- alignment ---------------------------------------------------------------------------------


def test_logits_on_the_next_token_score_near_zero(real):
    result = higgs_patch.higgs_audio_loss(synthetic(real, next_labels), real[0])
    assert result.text_tokens > 0 and result.audio_tokens > 0
    assert result.text < 1e-6 and result.audio < 1e-6 and result.loss < 1e-6


def test_logits_on_the_current_token_score_worse_than_a_uniform_guess(real):
    outputs = synthetic(real, lambda labels: labels)
    result = higgs_patch.higgs_audio_loss(outputs, real[0])
    assert result.text > math.log(outputs["logits"].shape[-1])
    assert result.audio > math.log(outputs["audio_logits"].shape[-1])


@pytest.mark.parametrize("delay_pattern", [False, True])
def test_every_audio_segment_starts_unsupervised_so_one_shift_never_crosses_segments(delay_pattern):
    batch = collate(varied_samples(), use_delay_pattern=delay_pattern)
    starts = batch["audio_out_ids_start"]
    assert len(starts) > 1
    assert (batch["label_audio_ids"][:, starts] == IGNORE).all()


def test_the_loss_equals_a_plain_cross_entropy_on_shifted_labels(real):
    batch, outputs = real
    result = higgs_patch.higgs_audio_loss(outputs, batch)
    assert_matches_reference(result, reference_loss(outputs, batch))


def test_a_dataclass_batch_and_a_dict_batch_give_the_same_loss(real):
    batch, outputs = real
    as_dataclass = tiny.collator()(varied_samples())
    torch.testing.assert_close(
        higgs_patch.higgs_audio_loss(outputs, as_dataclass).loss, higgs_patch.higgs_audio_loss(outputs, batch).loss
    )


@pytest.mark.core
def test_the_trainer_gets_the_same_loss_from_the_model(tmp_path):
    samples = varied_samples()
    inputs = tiny.DictCollator(tiny.collator())(samples)
    model = tiny.model()
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]))
    with higgs_patch.applied():
        loss, outputs = trainer.compute_loss(model, dict(inputs), return_outputs=True)
    assert_matches_reference(higgs_patch.higgs_audio_loss(outputs, inputs), reference_loss(outputs, inputs))
    torch.testing.assert_close(loss, reference_loss(outputs, inputs)["loss"])
    assert loss.grad_fn is not None


# --- components, empty batches, weights ----------------------------------------------------------


def not_trained_audio(sample):
    sample.label_ids[sample.input_ids == tiny.AUDIO_OUT] = IGNORE  # upstream then masks its audio labels
    return sample


def audio_only(sample):
    keep = sample.input_ids == tiny.AUDIO_OUT
    sample.label_ids[~keep] = IGNORE
    return sample


def loss_of(samples, **weights):
    batch = collate(samples)
    outputs = tiny.model()(**batch)
    return higgs_patch.higgs_audio_loss(outputs, batch, **weights), batch


def test_a_batch_without_audio_supervision_has_no_audio_component_and_no_nan():
    result, batch = loss_of([not_trained_audio(s) for s in varied_samples()])
    assert (batch["label_audio_ids"] == IGNORE).all()
    assert result.audio is None and result.audio_per_codebook is None and result.audio_tokens == 0
    assert result.text is not None and torch.isfinite(result.loss)
    torch.testing.assert_close(result.loss.detach(), result.text)
    assert set(result.components()) == {"text_loss"}


def test_a_batch_without_text_supervision_has_no_text_component_and_no_nan():
    result, batch = loss_of([audio_only(s) for s in varied_samples()])
    assert (batch["label_ids"] == IGNORE).all()
    assert result.text is None and result.text_tokens == 0
    assert result.audio is not None and torch.isfinite(result.loss)
    torch.testing.assert_close(result.loss.detach(), result.audio)
    assert "text_loss" not in result.components() and "audio_loss" in result.components()


def unlabelled(sample):
    sample.label_ids = None
    return sample


@pytest.mark.parametrize(
    "make", [lambda s: audio_only(not_trained_audio(s)), unlabelled], ids=["all-ignored", "no-labels"]
)
def test_a_batch_without_any_supervised_token_is_an_exact_zero_in_the_graph_with_a_warning(make, patch_log):
    model = tiny.model()
    batch = collate([make(s) for s in varied_samples()])
    result = higgs_patch.higgs_audio_loss(model(**batch), batch)
    assert result.text is None and result.audio is None
    assert result.loss.item() == 0.0
    assert result.loss.grad_fn is not None
    result.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.count_nonzero(g) == 0 for g in grads)
    assert any("(no-supervised-tokens)" in r.getMessage() for r in patch_log.records)


def test_weights_give_the_weighted_sum_and_a_missing_weight_counts_one(real):
    batch, outputs = real
    plain = higgs_patch.higgs_audio_loss(outputs, batch)
    both = higgs_patch.higgs_audio_loss(outputs, batch, text_loss_weight=0.25, audio_loss_weight=3.0)
    text_only = higgs_patch.higgs_audio_loss(outputs, batch, text_loss_weight=0.25)
    torch.testing.assert_close(plain.loss, (plain.text + plain.audio) / 2)
    torch.testing.assert_close(both.loss, 0.25 * plain.text + 3.0 * plain.audio)
    torch.testing.assert_close(text_only.loss, 0.25 * plain.text + plain.audio)
    assert (both.text, both.audio) == (plain.text, plain.audio)  # components stay unweighted


def test_a_weight_applies_only_to_a_present_component():
    result, _ = loss_of([not_trained_audio(s) for s in varied_samples()], text_loss_weight=0.5, audio_loss_weight=2.0)
    torch.testing.assert_close(result.loss.detach(), 0.5 * result.text)


def test_text_labels_without_expanded_labels_is_an_error_not_a_silent_misalignment(real):
    batch, outputs = real
    with pytest.raises(ValueError, match="expanded_labels"):
        higgs_patch.higgs_audio_loss({"logits": outputs.logits, "audio_logits": outputs.audio_logits}, batch)


def test_audio_labels_of_the_wrong_shape_are_an_error(real):
    batch, outputs = real
    with pytest.raises(ValueError, match=r"label_audio_ids has shape .* pass the batch the model was called with"):
        higgs_patch.higgs_audio_loss(outputs, {**batch, "label_audio_ids": batch["label_audio_ids"][:, :-1]})


def test_audio_labels_with_no_audio_logits_are_an_error_not_a_silently_missing_component(real):
    batch, outputs = real
    audio_out = ("audio_out_ids", "audio_out_ids_start", "audio_out_ids_start_group_loc")
    dropped = {k: v for k, v in batch.items() if k not in audio_out}
    with torch.no_grad():
        without_audio = tiny.model().eval()(**dropped)  # what a filter that dropped the audio inputs would give
    assert without_audio.audio_logits.shape[0] == 0
    with pytest.raises(ValueError, match="audio_logits"):
        higgs_patch.higgs_audio_loss(without_audio, batch)
    with pytest.raises(ValueError, match="audio_logits"):
        higgs_patch.higgs_audio_loss({"logits": outputs.logits, "expanded_labels": outputs.expanded_labels}, batch)


def test_a_batch_without_audio_out_tokens_has_no_audio_component():
    samples = []
    for sample in varied_samples(2):
        keep = sample.input_ids != tiny.AUDIO_OUT
        sample.input_ids, sample.label_ids = sample.input_ids[keep], sample.label_ids[keep]
        samples.append(sample)
    batch = collate(samples)
    assert batch["label_audio_ids"].numel() == 0
    result = higgs_patch.higgs_audio_loss(tiny.model()(**batch), batch)
    assert result.audio is None and result.text is not None
    torch.testing.assert_close(result.loss.detach(), result.text)


# --- what the loss is handed ---------------------------------------------------------------------


@pytest.mark.parametrize("shape", [tuple, list])
def test_a_tuple_or_list_batch_is_refused_not_scored_without_its_audio(real, shape):
    batch, outputs = real
    with pytest.raises(higgs_patch.InputError, match=f"batch .*{shape.__name__}.*mapping.*HiggsAudioBatchInput"):
        higgs_patch.higgs_audio_loss(outputs, shape(batch.values()))


def test_tuple_outputs_are_refused_saying_to_return_a_dict_not_that_label_ids_are_missing(real):
    batch, _ = real
    with torch.no_grad():
        outputs = tiny.model().eval()(**batch, return_dict=False)
    assert isinstance(outputs, tuple)
    with pytest.raises(higgs_patch.InputError, match="tuple.*return_dict=True") as caught:
        higgs_patch.higgs_audio_loss(outputs, batch)
    assert "label_ids" not in str(caught.value)


def test_outputs_without_logits_are_refused_naming_the_field(real):
    batch, outputs = real
    with pytest.raises(higgs_patch.InputError, match="no logits"):
        higgs_patch.higgs_audio_loss({"expanded_labels": outputs.expanded_labels}, batch)


def compact(outputs) -> torch.Tensor:
    """The positions sparse-text-logits keeps: those whose next token is a supervised text label."""
    return (next_labels(outputs["expanded_labels"]).flatten() != IGNORE).nonzero().squeeze(1)


@pytest.mark.parametrize("change, cause", [
    (lambda o: {**o, "logits": o["logits"][:, :-1]}, "shifted or sliced"),  # the habit of shifting the logits
    (lambda o: {**o, "expanded_labels": o["expanded_labels"][:1]}, "same forward call"),
    (lambda o: {**o, "logits": o["logits"].flatten(0, 1)[compact(o)]}, "text_logit_positions"),
    (lambda o: {**o, "logits": o["logits"].flatten(0, 1)[compact(o)], "text_logit_positions": compact(o)[:-1]},
     "one row per listed position"),
], ids=["logits-shifted", "labels-of-another-batch", "compact-logits-without-positions", "compact-logits-miscounted"])
def test_logits_and_expanded_labels_that_do_not_line_up_are_refused_naming_both_shapes(real, change, cause):
    batch, outputs = real
    changed = change(dict(outputs))
    logits, labels = changed["logits"], changed["expanded_labels"]
    with pytest.raises(higgs_patch.InputError, match=cause) as caught:
        higgs_patch.higgs_audio_loss(changed, batch)
    assert str(tuple(logits.shape)) in str(caught.value) and str(tuple(labels.shape)) in str(caught.value)
