"""collator-audio-index: every audio token reads one of its sample's segments, and samples stay as given.

Symptoms reproduced unpatched, gone patched, back after revert: the ``IndexError`` on a sample with
two audio tokens and one segment, and the audio labels that vanish the second time a sample is
collated. Patched output on valid batches is upstream's, field by field.
"""

from __future__ import annotations

import contextlib
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


@pytest.mark.core
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


@pytest.mark.core
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


# --- what the collator is handed: every sample, or a clear refusal --------------------------------


DEVICE = "device-tensor-factory"


def yielding(samples, read: list):
    """A one-shot iterator over ``samples`` that records every sample it hands out."""
    for sample in samples:
        read.append(sample)
        yield sample


@pytest.mark.parametrize("layers", [(), (PATCH,), (DEVICE,), (PATCH, DEVICE), (DEVICE, PATCH)],
                         ids=["defaults", "audio-index", "device", "audio-index-then-device", "device-then-audio-index"])
def test_a_generator_batch_collates_every_sample_once_where_upstream_raises(layers, assert_same_batch):
    collator = tiny.collator()
    with pytest.raises(ValueError, match="empty sequence"):  # upstream reads the generator up, then has nothing
        collator(sample for sample in tiny.samples(3))
    expected = collator(tiny.samples(3))
    read = []
    with contextlib.ExitStack() as stack:
        for patch_ids in [(patch_id,) for patch_id in layers] or [()]:  # one by one: the later is the outer layer
            stack.enter_context(higgs_patch.applied(*patch_ids))
        got = collator(yielding(tiny.samples(3), read))
    assert len(read) == 3  # each sample read once, none twice
    assert_same_batch(got, expected)


def test_an_empty_batch_is_a_clear_error_where_upstream_says_max_of_an_empty_sequence():
    collator = tiny.collator()
    with pytest.raises(ValueError, match="max\\(\\) arg is an empty sequence"):
        collator([])
    with higgs_patch.applied():
        with pytest.raises(higgs_patch.InputError, match="empty batch.*at least one sample") as caught:
            collator([])
    assert isinstance(caught.value, ValueError)  # code catching upstream's ValueError keeps working


@pytest.mark.parametrize("batch, named", [
    (lambda: tiny.sample(), "ChatMLDatasetSample"),
    (lambda: tiny.fields(tiny.collator()(tiny.samples(2))), "dict"),
    (lambda: [tiny.fields(tiny.sample())], "sample 0 .* dict"),
], ids=["one-sample", "a-collated-batch", "a-list-of-dicts"])
def test_what_is_not_a_list_of_samples_is_refused_naming_what_it_got(batch, named):
    with higgs_patch.applied():
        with pytest.raises(higgs_patch.InputError, match=named):
            tiny.collator()(batch())


# --- strict means any mismatch ------------------------------------------------------------------


def extra_segment(**kwargs):
    """A valid sample whose target is supplied as two segments: three segments for two audio tokens."""
    sample = tiny.sample(**kwargs)
    sample.audio_ids_start = torch.cat([sample.audio_ids_start, sample.audio_ids_start[-1:] + 3])
    return sample


def test_strict_refuses_more_segments_than_audio_tokens_which_upstream_leaves_unread():
    collator = tiny.collator()
    whole = collator([tiny.sample()])
    cut = collator([extra_segment()])  # upstream: the target's last segment is silently never read
    assert cut.audio_out_ids.shape[1] == whole.audio_out_ids.shape[1] - (8 - 3)
    with higgs_patch.applied(PATCH, audio_index_policy="strict"):
        with pytest.raises(AudioIndexError, match=r"sample 1 .* 1 audio-in and 1 audio-out tokens but 3 audio segment"
                                                  r".*one segment per audio token") as caught:
            collator([tiny.sample(), extra_segment()])
    assert "audio_index_policy='strict'" in str(caught.value)


# --- what is a leak: the target's audio in its own prompt ----------------------------------------


def out_then_in(trained: bool = True, **kwargs):
    """``<|AUDIO_OUT|> <|AUDIO|>`` with one segment: the audio-in token comes after the target."""
    sample = short(**kwargs)
    ids, labels = sample.input_ids.clone(), sample.label_ids.clone()
    first = int((ids == tiny.AUDIO_IN).nonzero()[0])
    ids[first], ids[first + 1] = tiny.AUDIO_OUT, tiny.AUDIO_IN
    labels[first], labels[first + 1] = (tiny.AUDIO_OUT if trained else -100), -100
    sample.input_ids, sample.label_ids = ids, labels
    return sample


def in_then_untrained_out(**kwargs):
    """The short voice-clone layout whose audio-out is marked "not trained": nothing learns from the target."""
    return not_trained(short(**kwargs))


def unlabelled_short(**kwargs):
    sample = short(**kwargs)
    sample.label_ids = None
    return sample


@pytest.mark.parametrize("make", [out_then_in, in_then_untrained_out, unlabelled_short],
                         ids=["audio-in-after-the-target", "target-not-trained", "no-labels"])
@pytest.mark.parametrize("policy", ["clamp", "clamp-always"])
def test_a_clamp_that_puts_no_supervised_target_into_its_prompt_is_no_leak(
    make, policy, patch_log, assert_same_batch
):
    collator = tiny.collator()  # returns audio-in tokens: a leak would matter
    expected = tiny.collator()([target_as_reference(make(seed=1))]) if make is not unlabelled_short else None
    with higgs_patch.applied(PATCH, audio_index_policy=policy):
        got = collator([make(seed=1)])
        counts = higgs_patch.audio_index_counts(collator)
    if expected is not None:
        assert_same_batch(got, expected)
    assert counts == higgs_patch.AudioIndexCounts(clamped_samples=1, clamped_tokens=1, leaked_samples=0)
    assert len(log_lines(patch_log, "(audio-index-clamp)")) == 1
    assert not log_lines(patch_log, "(audio-index-leak)")


def two_audio_in(**kwargs):
    """``<|AUDIO|> <|AUDIO|> <|AUDIO_OUT|>`` with two segments: clamped, the second audio-in reads the target's."""
    sample = tiny.sample(**kwargs)
    at = int((sample.input_ids == tiny.AUDIO_IN).nonzero()[0])
    sample.input_ids = torch.cat([sample.input_ids[:at], torch.tensor([tiny.AUDIO_IN]), sample.input_ids[at:]])
    sample.label_ids = torch.cat([sample.label_ids[:at], torch.tensor([-100]), sample.label_ids[at:]])
    return sample


def test_an_audio_in_that_reads_a_later_target_is_a_leak_among_several_segments(patch_log):
    sample = two_audio_in(seed=1)
    collator = tiny.collator()
    with higgs_patch.applied(PATCH):
        with pytest.raises(AudioIndexError, match="2 audio-in and 1 audio-out.*prompt"):
            collator([sample])
    with higgs_patch.applied(PATCH, audio_index_policy="clamp-always"):
        collator([sample])
        assert higgs_patch.audio_index_counts(collator).leaked_samples == 1
    assert len(log_lines(patch_log, "(audio-index-leak)")) == 1


# --- segment starts ------------------------------------------------------------------------------


def unsorted(sample):
    sample.audio_ids_start = sample.audio_ids_start.flip(0)
    return sample


def test_unsorted_segment_starts_are_silently_read_as_an_empty_segment_by_upstream_and_refused_patched():
    collator = tiny.collator()
    batch = collator([unsorted(tiny.sample())])
    assert batch.audio_in_ids.shape[1] == 2  # the reference read as nothing: only its bos and eos
    for policy in POLICIES:
        with higgs_patch.applied(PATCH, audio_index_policy=policy):
            with pytest.raises(AudioIndexError, match=r"sample 0 .*audio_ids_start \[6, 0\].*not in ascending order"
                                                      r".*cumulative"):
                collator([unsorted(tiny.sample())])


def test_unsorted_starts_are_refused_before_any_sample_of_the_batch_is_counted_or_warned_about(patch_log):
    """A short sample (a clamp warning) and a leaking one (a leak warning) whose starts are out of order."""
    leaking = two_audio_in(seed=1)
    collator = tiny.collator(return_audio_in_tokens=False)
    with higgs_patch.applied(PATCH, audio_index_policy="clamp-always"):
        with pytest.raises(AudioIndexError, match="sample 1 .*audio_ids_start"):
            collator([short(seed=0), unsorted(leaking)])
        assert higgs_patch.audio_index_counts(collator) == higgs_patch.AudioIndexCounts()
    assert not log_lines(patch_log, "(audio-index-")


def test_unsorted_waveform_starts_are_refused_too():
    sample = tiny.sample(waveform_rate=16000)
    sample.audio_waveforms_start = sample.audio_waveforms_start.flip(0)
    with higgs_patch.applied(PATCH):
        with pytest.raises(AudioIndexError, match="sample 0 .*audio_waveforms_start"):
            whisper_collator()([sample])
