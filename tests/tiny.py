"""The tests' tiny models, collators and samples: the built-in default of ``higgs_patch.commands.tiny``."""

from higgs_patch.commands.tiny import (  # noqa: F401 - re-exported for the tests
    AUDIO_BOS,
    AUDIO_EOS,
    AUDIO_IN,
    AUDIO_OUT,
    CODEBOOK_SIZE,
    CODEBOOKS,
    PAD,
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
)
