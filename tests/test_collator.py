"""collator-audio-index: every audio token reads one of its sample's segments, and samples stay as given.

Symptoms reproduced unpatched, gone patched, back after revert: the ``IndexError`` on a sample with
two audio tokens and one segment, and the audio labels that vanish the second time a sample is
collated. Patched output on valid batches is upstream's, field by field.
"""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch
import transformers

import higgs_patch
import tiny
from higgs_patch import AudioIndexError

PATCH = "collator-audio-index"
POLICIES = ("clamp", "clamp-always", "strict")


def whisper_collator(**overrides):
    processor = types.SimpleNamespace(feature_extractor=transformers.WhisperFeatureExtractor())
    return tiny.collator(encode_whisper_embed=True, whisper_processor=processor, **overrides)


def short(**kwargs):
    """The broken voice-clone layout: <|AUDIO|> and <|AUDIO_OUT|> but only the target's segment."""
    return tiny.sample(reference=None, **kwargs)


def no_segment(**kwargs):
    sample = short(**kwargs)
    sample.audio_ids_concat = sample.audio_ids_concat[:, :0]
    sample.audio_ids_start = sample.audio_ids_start[:0]
    return sample


def target_as_reference(sample):
    """What clamping makes of a short sample: the same sample with its one segment supplied twice."""
    codes, waves = sample.audio_ids_concat, sample.audio_waveforms_concat
    has_waves = len(sample.audio_waveforms_start) > 0
    return tiny.ChatMLDatasetSample(
        input_ids=sample.input_ids.clone(),
        label_ids=sample.label_ids.clone(),
        audio_ids_concat=torch.cat([codes, codes], dim=1),
        audio_ids_start=torch.tensor([0, codes.shape[1]]),
        audio_waveforms_concat=torch.cat([waves, waves]) if has_waves else waves,
        audio_waveforms_start=torch.tensor([0, waves.shape[0]]) if has_waves else sample.audio_waveforms_start,
        audio_sample_rate=sample.audio_sample_rate.repeat(2) if has_waves else sample.audio_sample_rate,
        audio_speaker_indices=torch.zeros(2, dtype=torch.long),
    )


def snapshot(samples) -> list[dict]:
    return [
        {f.name: v.clone() if isinstance(v := getattr(s, f.name), torch.Tensor) else v for f in dataclasses.fields(s)}
        for s in samples
    ]


def assert_unchanged(samples, before) -> None:
    for sample, fields in zip(samples, before, strict=True):
        for name, value in fields.items():
            now = getattr(sample, name)
            if isinstance(value, torch.Tensor):
                assert torch.equal(now, value), name
            else:
                assert now == value, name


def log_lines(log, slug: str) -> list[str]:
    return [r.getMessage() for r in log.records if r.name == "higgs_patch" and slug in r.getMessage()]


# --- the short sample -------------------------------------------------------------------------


def test_short_sample_is_an_index_error_unpatched_and_after_revert():
    collator = tiny.collator(return_audio_in_tokens=False)
    with pytest.raises(IndexError):
        collator([tiny.sample(), short(seed=1)])
    with higgs_patch.applied(PATCH):
        collator([tiny.sample(), short(seed=1)])
    with pytest.raises(IndexError):
        collator([tiny.sample(), short(seed=1)])


@pytest.mark.parametrize("make_collator", [
    lambda: tiny.collator(return_audio_in_tokens=False),
    lambda: tiny.collator(return_audio_in_tokens=False, use_delay_pattern=True),
], ids=["plain", "delay"])
def test_clamp_reads_the_last_segment_with_one_warning_and_counts_when_audio_in_is_unused(
    make_collator, patch_log, assert_same_batch
):
    collator = make_collator()
    expected = make_collator()([tiny.sample(), target_as_reference(short(seed=1))])  # unpatched upstream
    with higgs_patch.applied(PATCH):
        assert higgs_patch.audio_index_counts(collator) == higgs_patch.AudioIndexCounts()
        first = collator([tiny.sample(), short(seed=1)])
        second = collator([short(seed=2), short(seed=1)])
        counts = higgs_patch.audio_index_counts(collator)
    assert_same_batch(first, expected)
    assert (second.label_audio_ids != -100).any()
    # three short samples over two calls, each with one audio token more than it has segments
    assert counts == higgs_patch.AudioIndexCounts(clamped_samples=3, clamped_tokens=3, leaked_samples=0)
    warnings = log_lines(patch_log, "(audio-index-clamp)")
    assert len(warnings) == 1 and "sample 1" in warnings[0]
    assert not log_lines(patch_log, "(audio-index-leak)")
    # counts belong to their collator
    assert higgs_patch.audio_index_counts(make_collator()) == higgs_patch.AudioIndexCounts()


@pytest.mark.parametrize("make_collator", [
    tiny.collator,  # returns audio-in tokens
    lambda: whisper_collator(return_audio_in_tokens=False),  # encodes the audio-in waveform
], ids=["audio-in-tokens", "whisper"])
def test_clamp_refuses_to_leak_the_target_into_the_prompt(make_collator):
    collator = make_collator()
    samples = [tiny.sample(waveform_rate=16000), short(seed=1, waveform_rate=16000)]
    with higgs_patch.applied(PATCH):
        with pytest.raises(AudioIndexError, match="sample 1 .*1 audio-in and 1 audio-out.*1 audio segment") as caught:
            collator(samples)
    assert isinstance(caught.value, IndexError)  # code catching upstream's IndexError keeps working
    assert "prompt" in str(caught.value) and "clamp-always" in str(caught.value)
    assert higgs_patch.audio_index_counts(collator) == higgs_patch.AudioIndexCounts()


@pytest.mark.parametrize("make_collator, waveform_rate", [
    (tiny.collator, None),
    (lambda: tiny.collator(use_delay_pattern=True), None),
    (whisper_collator, 16000),
], ids=["plain", "delay", "whisper"])
def test_clamp_always_is_the_seed_clamp_leak_included_with_a_leak_warning(
    make_collator, waveform_rate, patch_log, assert_same_batch
):
    collator = make_collator()
    expected = make_collator()(
        [tiny.sample(waveform_rate=waveform_rate), target_as_reference(short(seed=1, waveform_rate=waveform_rate))]
    )
    with higgs_patch.applied(PATCH, audio_index_policy="clamp-always"):
        batch = collator([tiny.sample(waveform_rate=waveform_rate), short(seed=1, waveform_rate=waveform_rate)])
        counts = higgs_patch.audio_index_counts(collator)
    assert_same_batch(batch, expected)
    # the leak, visible: sample 1's audio-in segment (the prompt) is its audio-out segment (the target)
    prompt = batch.audio_in_ids[:, int(batch.audio_in_ids_start[1]) :]
    target = batch.audio_out_ids[:, int(batch.audio_out_ids_start[1]) :]
    assert torch.equal(prompt, target)
    assert counts == higgs_patch.AudioIndexCounts(clamped_samples=1, clamped_tokens=1, leaked_samples=1)
    assert len(log_lines(patch_log, "(audio-index-leak)")) == 1


@pytest.mark.parametrize("return_audio_in_tokens", [True, False])
def test_strict_raises_naming_the_position_and_the_counts(return_audio_in_tokens):
    collator = tiny.collator(return_audio_in_tokens=return_audio_in_tokens)
    with higgs_patch.applied(PATCH, audio_index_policy="strict"):
        collator(tiny.samples(2))  # valid samples collate
        with pytest.raises(AudioIndexError, match=r"sample 2 .* 1 audio-in and 1 audio-out tokens but 1 audio segment"):
            collator([tiny.sample(), tiny.sample(seed=1), short(seed=2)])
    assert higgs_patch.audio_index_counts(collator) == higgs_patch.AudioIndexCounts()


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("return_audio_in_tokens", [True, False])
def test_audio_tokens_without_any_segment_are_an_audio_index_error_under_every_policy(policy, return_audio_in_tokens):
    collator = tiny.collator(return_audio_in_tokens=return_audio_in_tokens)
    with pytest.raises(IndexError):
        collator([no_segment()])
    with higgs_patch.applied(PATCH, audio_index_policy=policy):
        with pytest.raises(AudioIndexError, match="sample 0 .* 0 audio segment"):
            collator([no_segment()])


def test_an_unknown_policy_is_refused():
    with pytest.raises(higgs_patch.PatchError, match="audio_index_policy"):
        higgs_patch.apply(PATCH, audio_index_policy="ignore")
    assert {s.id: s.state for s in higgs_patch.status()}[PATCH] != "applied"


# --- collating the same samples twice ---------------------------------------------------------


@pytest.mark.parametrize("make_collator", [tiny.collator, whisper_collator], ids=["plain", "whisper"])
def test_audio_labels_vanish_on_the_second_collation_unpatched_and_after_revert(make_collator):
    collator = make_collator()

    def supervised_audio_labels_twice() -> tuple[int, int]:
        samples = tiny.samples(3, waveform_rate=16000)
        first, second = collator(samples), collator(samples)
        return int((first.label_audio_ids != -100).sum()), int((second.label_audio_ids != -100).sum())

    first, second = supervised_audio_labels_twice()
    assert first > 0 and second == 0
    with higgs_patch.applied(PATCH):
        assert supervised_audio_labels_twice() == (first, first)
    assert supervised_audio_labels_twice() == (first, 0)


@pytest.mark.parametrize("make_collator", [
    tiny.collator,
    lambda: tiny.collator(use_delay_pattern=True),
    whisper_collator,
], ids=["plain", "delay", "whisper"])
def test_collating_twice_gives_identical_batches_and_leaves_the_samples_unchanged(make_collator, assert_same_batch):
    collator = make_collator()
    samples = tiny.samples(3, waveform_rate=16000)
    before = snapshot(samples)
    with higgs_patch.applied(PATCH):
        first, second = collator(samples), collator(samples)
    assert (first.label_audio_ids != -100).any()
    assert_same_batch(second, first)
    assert_unchanged(samples, before)


def test_clamped_samples_are_left_unchanged_too(assert_same_batch):
    collator = tiny.collator(return_audio_in_tokens=False)
    samples = [short(seed=0), tiny.sample(seed=1)]
    before = snapshot(samples)
    with higgs_patch.applied(PATCH):
        first, second = collator(samples), collator(samples)
    assert_same_batch(second, first)
    assert_unchanged(samples, before)


# --- valid batches: exactly upstream's output -------------------------------------------------


def varied(count: int, **kwargs):
    """Samples of different text and audio lengths (so padding and offsets matter)."""
    return [
        tiny.sample(seed=i, text=3 + 2 * i, reference=4 + i, target=5 + 3 * i, answer=2 + i, **kwargs)
        for i in range(count)
    ]


def not_trained(sample):
    """The same sample with its audio-out segment marked "not trained" (its <|AUDIO_OUT|> label is -100)."""
    sample.label_ids[sample.input_ids == tiny.AUDIO_OUT] = -100
    return sample


CONFIGS = {
    "default": dict(),
    "delay-pattern": dict(use_delay_pattern=True),
    "pad-left": dict(pad_left=True),
    "no-audio-in-tokens": dict(return_audio_in_tokens=False),
    "round-to-1": dict(round_to=1),
    "keep-audio-out-label": dict(mask_audio_out_token_label=False),
}


def fresh(waveform_rate=None):
    """A new list of valid samples (upstream writes into what it collates): varied lengths, one not trained."""
    return varied(3, waveform_rate=waveform_rate) + [not_trained(tiny.sample(seed=9, waveform_rate=waveform_rate))]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_valid_batches_collate_exactly_as_upstream(config, policy, assert_same_batch):
    collator = tiny.collator(**CONFIGS[config])
    expected = collator(fresh())
    with higgs_patch.applied(audio_index_policy=policy):  # every default patch
        got = collator(fresh())
    assert_same_batch(got, expected)


@pytest.mark.parametrize("overrides", [dict(), dict(return_audio_in_tokens=False), dict(pad_left=True)])
def test_valid_whisper_batches_collate_exactly_as_upstream(overrides, assert_same_batch):
    collator = whisper_collator(**overrides)
    expected = collator(fresh(16000))
    assert expected.audio_features is not None and expected.audio_features.shape[0] == len(fresh())
    with higgs_patch.applied():
        got = collator(fresh(16000))
    assert_same_batch(got, expected)
