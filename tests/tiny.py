"""The tests' tiny models, collators and samples: the built-in default of ``higgs_patch.commands.tiny``."""

from higgs_patch.commands.tiny import (  # noqa: F401 - re-exported for the tests
    AUDIO_BOS,
    AUDIO_EOS,
    AUDIO_IN,
    AUDIO_OUT,
    AUDIO_OUT_BOS_TOKEN,
    AUDIO_EOS_TOKEN,
    CODEBOOK_SIZE,
    CODEBOOKS,
    PAD,
    SPECIAL_TOKENS,
    VOCAB,
    ChatMLDatasetSample,
    DictCollator,
    HiggsAudioConfig,
    HiggsAudioModel,
    HiggsAudioSampleCollator,
    collator,
    config,
    fields,
    model,
    sample,
    samples,
    tokenizer,
)


def without_audio_out(seed: int, keep_audio_in: bool = True) -> ChatMLDatasetSample:
    """A sample with no ``<|AUDIO_OUT|>``: text and a reference audio-in (ASR-like), or text alone."""
    full = sample(seed=seed)
    keep = full.input_ids != AUDIO_OUT
    if not keep_audio_in:
        keep &= full.input_ids != AUDIO_IN
    segments = 1 if keep_audio_in else 0
    full.input_ids, full.label_ids = full.input_ids[keep], full.label_ids[keep]
    reference = int(full.audio_ids_start[1]) if segments else 0
    full.audio_ids_concat = full.audio_ids_concat[:, :reference]
    full.audio_ids_start = full.audio_ids_start[:segments]
    full.audio_speaker_indices = full.audio_speaker_indices[:segments]
    return full
