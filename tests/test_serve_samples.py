"""The samples boson's serve engine builds collate patched exactly as upstream collates them.

``HiggsAudioServeEngine._prepare_inputs`` (boson_multimodal 0.1.1, ``serve/serve_engine.py``) builds one
``ChatMLDatasetSample`` per request with ``None`` where it has nothing: ``label_ids``, the waveform fields,
the sample rates and speakers always; the audio codes and their starts when no audio is given. It collates
it with its own collator (``return_audio_in_tokens=False``, ``round_to=1``). Reproduced: with the plugin
applied, ``collator-audio-index`` raised ``TypeError: 'NoneType' object is not iterable`` on every such
sample, so generation after training in one process failed. The engine itself loads boson's audio
tokenizer, whose stack few lines have: tests/test_serve_engine.py drives it where that stack is installed;
here the samples are built as the engine builds them, on every line.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import higgs_patch
import tiny

AUDIO_OUT_BOS, AUDIO_BOS_TEXT, AUDIO_EOS_TEXT = 252, 254, 253  # <|audio_out_bos|>, <|audio_bos|>, <|audio_eos|>


def engine_collator(config=None) -> tiny.HiggsAudioSampleCollator:
    """The collator ``HiggsAudioServeEngine.__init__`` builds from the model's config (no Whisper)."""
    config = config or tiny.config()
    return tiny.HiggsAudioSampleCollator(
        whisper_processor=None,
        encode_whisper_embed=config.encode_whisper_embed,
        audio_in_token_id=config.audio_in_token_idx,
        audio_out_token_id=config.audio_out_token_idx,
        audio_stream_bos_id=config.audio_stream_bos_id,
        audio_stream_eos_id=config.audio_stream_eos_id,
        pad_token_id=config.pad_token_id,
        return_audio_in_tokens=False,
        use_delay_pattern=config.use_delay_pattern,
        audio_num_codebooks=config.audio_num_codebooks,
        round_to=1,
    )


def engine_sample(input_tokens: list[int], audio_ids_l: list[torch.Tensor], device: str = "cpu"):
    """``_prepare_inputs``'s sample, field for field, from its prompt tokens and its encoded audios."""
    if len(audio_ids_l) > 0:
        audio_ids_start = torch.tensor(
            np.cumsum(np.array([0] + [audio_ids.shape[1] for audio_ids in audio_ids_l])),
            dtype=torch.long,
            device=device,
        )[0:-1]
        audio_ids_concat = torch.cat(audio_ids_l, dim=1)
    else:
        audio_ids_start = None
        audio_ids_concat = None
    return tiny.ChatMLDatasetSample(
        input_ids=torch.LongTensor(input_tokens),
        label_ids=None,
        audio_ids_concat=audio_ids_concat,
        audio_ids_start=audio_ids_start,
        audio_waveforms_concat=None,
        audio_waveforms_start=None,
        audio_sample_rate=None,
        audio_speaker_indices=None,
    )


def words(seed: int, count: int) -> list[int]:
    return torch.randint(1, 200, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


def codes(seed: int, frames: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, tiny.CODEBOOK_SIZE, (tiny.CODEBOOKS, frames), generator=g)


AUDIO_OUT_TURN = [AUDIO_OUT_BOS, tiny.AUDIO_OUT, AUDIO_EOS_TEXT]  # an assistant turn's reference audio
AUDIO_IN_TURN = [AUDIO_BOS_TEXT, tiny.AUDIO_IN, AUDIO_EOS_TEXT]  # a user turn's audio


def requests() -> dict[str, tuple[list[int], list[torch.Tensor]]]:
    """Prompt tokens and encoded audios of the requests people send, as the engine lays them out."""
    prompt, postfix = words(0, 7), words(1, 4)
    return {
        "plain-tts": (prompt + postfix, []),
        "plain-tts-force-audio": (prompt + postfix + [AUDIO_OUT_BOS], []),
        "voice-clone": (words(2, 5) + AUDIO_OUT_TURN + prompt + postfix + [AUDIO_OUT_BOS], [codes(3, 9)]),
        "two-references": (
            words(2, 5) + AUDIO_OUT_TURN + words(4, 3) + AUDIO_OUT_TURN + prompt + postfix,
            [codes(3, 9), codes(5, 6)],
        ),
        "user-audio-then-clone": (
            AUDIO_IN_TURN + words(2, 5) + AUDIO_OUT_TURN + prompt + postfix,
            [codes(6, 4), codes(3, 9)],
        ),
        "placeholder-user-audio": (AUDIO_IN_TURN + prompt + postfix, []),  # audio_url "placeholder": no codes
    }


@pytest.mark.core
@pytest.mark.parametrize("request_name", list(requests()))
def test_the_serve_engines_samples_collate_patched_as_upstream_collates_them(request_name, assert_same_batch):
    tokens, audios = requests()[request_name]
    collator = engine_collator()
    expected = collator([engine_sample(tokens, audios)])
    with higgs_patch.applied():  # every default patch, as a user's apply() before generating
        got = collator([engine_sample(tokens, audios)])
    assert_same_batch(got, expected)
    assert got.label_ids is None  # no labels in, none out: the engine only generates


@pytest.mark.core
def test_a_serve_sample_whose_read_audio_is_missing_fails_upstream_and_is_a_clear_error_patched():
    """An ``<|AUDIO_OUT|>`` with no codes (``audio_ids_start=None``): upstream cannot read it either."""
    tokens = words(2, 5) + AUDIO_OUT_TURN + words(0, 7)
    with pytest.raises(TypeError):
        engine_collator()([engine_sample(tokens, [])])
    with higgs_patch.applied(), pytest.raises(higgs_patch.AudioIndexError, match="no audio to read"):
        engine_collator()([engine_sample(tokens, [])])
