"""higgs_patch.training_sample: a conversation with audio to the sample boson's collator and model train on.

Through the real ``prepare_chatml_sample``, the real collator (labels, delay pattern, Whisper features)
and the real Trainer, with the tiny model and the tiny tokenizer; audio files are written with
soundfile and read back by the helper.
"""

from __future__ import annotations

import base64
import functools
import io
import math
import types

import numpy as np
import pytest
import soundfile
import tiny
import torch
import transformers

import higgs_patch
from higgs_patch import SampleError

REFERENCE, TARGET = "reference.wav", "target.wav"
K = tiny.CODEBOOKS


def codes(frames: int, low: int, high: int, seed: int = 0) -> torch.Tensor:
    """Codes drawn from [low, high): disjoint ranges tell the reference's codes from the target's."""
    return torch.randint(low, high, (K, frames), generator=torch.Generator().manual_seed(seed))


def voice_clone_in_prompt() -> dict:
    """The reference as the user's audio: an input."""
    return {"messages": [
        {"role": "user", "content": ["w11 w12 w13", {"type": "audio", "audio_url": REFERENCE}]},
        {"role": "assistant", "content": {"type": "audio", "audio_url": TARGET}},
    ]}


def voice_clone_as_turns(start_index: int | None = 4) -> dict:
    """boson's own voice-clone layout: the reference is an earlier assistant turn; start_index marks the target."""
    return {"messages": [
        {"role": "system", "content": "w1 w2"},
        {"role": "user", "content": "w3 w4 w5"},
        {"role": "assistant", "content": {"type": "audio", "audio_url": REFERENCE}},
        {"role": "user", "content": "w6 w7"},
        {"role": "assistant", "content": {"type": "audio", "audio_url": TARGET}},
    ], "start_index": start_index}


REFERENCE_CODES, TARGET_CODES = codes(5, 0, 10), codes(7, 20, 32, seed=1)
GIVEN = {REFERENCE: REFERENCE_CODES, TARGET: TARGET_CODES}


def build(conversation, config=None, **kwargs):
    kwargs.setdefault("codes", GIVEN)
    return higgs_patch.training_sample(conversation, tiny_tokenizer(), config or tiny.config(), **kwargs)


@functools.cache
def tiny_tokenizer():
    return tiny.tokenizer()


def stream(target: torch.Tensor, eos: int = tiny.AUDIO_EOS) -> torch.Tensor:
    """What an audio-out segment's labels must be: no label at the stream's bos, the codes, the end-of-stream code."""
    return torch.cat([torch.full((K, 1), -100), target, torch.full((K, 1), eos)], dim=1)


@pytest.mark.core
def test_the_reference_audio_in_the_prompt_is_input_and_the_target_is_trained_with_its_end_code():
    batch = tiny.collator()([build(voice_clone_in_prompt())])
    # the reference reaches the model as audio-in (between the stream's bos and eos), never as a label
    assert torch.equal(batch.audio_in_ids[:, 1:-1], REFERENCE_CODES)
    assert torch.equal(batch.audio_out_ids[:, 1:-1], TARGET_CODES)
    assert torch.equal(batch.label_audio_ids, stream(TARGET_CODES))
    # text: the assistant's turn is supervised, the user's is not; <|AUDIO_OUT|>'s own label is the collator's -100
    labels = batch.label_ids[0][batch.attention_mask[0].bool()]
    supervised = labels[labels != -100].tolist()
    assert supervised == [tiny.AUDIO_OUT_BOS_TOKEN, tiny.AUDIO_EOS_TOKEN, tiny.SPECIAL_TOKENS["<|eot_id|>"]]


@pytest.mark.core
def test_a_reference_turn_before_start_index_carries_no_label_and_the_target_does():
    batch = tiny.collator()([build(voice_clone_as_turns(start_index=4))])
    reference_columns = REFERENCE_CODES.shape[1] + 2
    assert torch.equal(batch.audio_out_ids[:, 1:reference_columns - 1], REFERENCE_CODES)  # context for the model
    assert (batch.label_audio_ids[:, :reference_columns] == -100).all()  # ... and no target
    assert torch.equal(batch.label_audio_ids[:, reference_columns:], stream(TARGET_CODES))
    # boson's meaning of start_index: without it every assistant turn is trained, the reference too
    unmarked = tiny.collator()([build(voice_clone_as_turns(start_index=None))])
    assert torch.equal(unmarked.label_audio_ids[:, :reference_columns], stream(REFERENCE_CODES))


@pytest.mark.core
def test_under_the_delay_pattern_each_segment_still_starts_without_a_label():
    batch = tiny.collator(use_delay_pattern=True)([build(voice_clone_as_turns())])
    reference_columns = REFERENCE_CODES.shape[1] + 2 + K - 1
    assert (batch.label_audio_ids[:, :reference_columns] == -100).all()
    target = batch.label_audio_ids[:, reference_columns:]
    assert (target[:, 0] == -100).all() and (target[:, -1] == -100).any()
    assert set(target[target != -100].tolist()) == set(TARGET_CODES.flatten().tolist()) | {tiny.AUDIO_EOS}


@pytest.mark.core
def test_the_samples_collate_and_train_under_the_trainer(tmp_path):
    conversations = [voice_clone_in_prompt(), voice_clone_as_turns(),
                     {"messages": [{"role": "user", "content": [{"type": "audio", "audio_url": REFERENCE}]},
                                   {"role": "assistant", "content": "w40 w41 w42"}]},  # ASR-like: audio in, text out
                     {"messages": [{"role": "user", "content": "w9"}, {"role": "assistant", "content": "w8 w7"}]}]
    dataset = [build(conversation) for conversation in conversations] * 2
    model = tiny.model()
    head = model.audio_decoder_proj.audio_lm_head.weight.detach().clone()
    higgs_patch.apply()
    trainer = transformers.Trainer(
        model=model, data_collator=tiny.DictCollator(tiny.collator(use_delay_pattern=True)), train_dataset=dataset,
        args=transformers.TrainingArguments(
            output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
            remove_unused_columns=False, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
        ),
    )
    result = trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 4 and all(math.isfinite(loss) and loss > 0 for loss in losses)
    assert math.isfinite(result.training_loss) and result.training_loss > 0
    assert not torch.equal(model.audio_decoder_proj.audio_lm_head.weight.detach(), head)  # the audio head learned
    # the dataset's samples are as built: the second epoch trains the audio targets again
    again = tiny.collator()([build(voice_clone_in_prompt())])
    assert torch.equal(tiny.collator()([dataset[0]]).label_audio_ids, again.label_audio_ids)


class FrameCodec:
    """An audio tokenizer with boson's interface: ``encode(waveform, sr)`` -> (codebooks, frames), 25 frames a second."""

    sampling_rate = 16_000

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def encode(self, audio_path_or_wv, sr=None):
        assert isinstance(audio_path_or_wv, np.ndarray) and sr == self.sampling_rate
        self.calls.append((len(audio_path_or_wv), sr))
        frames = len(audio_path_or_wv) // 640
        level = np.abs(audio_path_or_wv[: frames * 640]).reshape(frames, 640).mean(1)
        row = torch.as_tensor((level * 31).round().astype(np.int64)).clamp(0, tiny.CODEBOOK_SIZE - 1)
        return row.expand(K, frames).unsqueeze(0)  # a batch of one, as boson's returns


def write_tone(path, seconds: float, rate: int = 24_000) -> None:
    t = np.arange(int(seconds * rate)) / rate
    soundfile.write(path, (0.5 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate)


@pytest.mark.core
def test_codes_come_from_the_audio_tokenizer_read_at_its_rate_from_files_and_raw_audio(tmp_path):
    write_tone(tmp_path / REFERENCE, 0.4)
    write_tone(tmp_path / TARGET, 0.8)
    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros(8_000, dtype=np.float32), 16_000, format="WAV")
    conversation = {"messages": [
        {"role": "user", "content": [{"type": "audio", "audio_url": str(tmp_path / REFERENCE)},
                                     {"type": "audio", "audio_url": "", "raw_audio": base64.b64encode(buffer.getvalue()).decode()}]},
        {"role": "assistant", "content": {"type": "audio", "audio_url": str(tmp_path / TARGET)}},
    ]}
    codec = FrameCodec()
    sample = build(conversation, codes=None, audio_tokenizer=codec)
    assert [length for length, _ in codec.calls] == [6_400, 8_000, 12_800]  # resampled to 16 kHz
    assert sample.audio_ids_start.tolist() == [0, 10, 22] and sample.audio_ids_concat.shape == (K, 42)
    assert len(sample.audio_waveforms_concat) == 0  # no Whisper features in this config: no waveforms
    tiny.collator()([sample])


@pytest.mark.core
def test_with_whisper_features_the_input_audio_waveforms_are_read_and_the_model_trains_on_them(tmp_path):
    write_tone(tmp_path / REFERENCE, 0.5)
    conversation = {"messages": [
        {"role": "user", "content": [{"type": "audio", "audio_url": str(tmp_path / REFERENCE)}]},
        {"role": "assistant", "content": {"type": "audio", "audio_url": "never read: its codes are given"}},
    ]}
    config = tiny.config(skip_audio_tower=False, encode_whisper_embed=True)
    sample = higgs_patch.training_sample(conversation, tiny_tokenizer(), config,
                                         codes=[REFERENCE_CODES, TARGET_CODES])
    assert sample.audio_sample_rate.tolist() == [16_000.0]  # the input audio only, at Whisper's rate
    assert sample.audio_waveforms_start.tolist() == [0] and len(sample.audio_waveforms_concat) == 8_000
    processor = types.SimpleNamespace(feature_extractor=transformers.WhisperFeatureExtractor(feature_size=128))
    collator = tiny.DictCollator(tiny.collator(encode_whisper_embed=True, whisper_processor=processor))
    batch = collator([sample, sample])
    assert batch["audio_features"].shape[0] == 2
    higgs_patch.apply()
    loss = tiny.model(skip_audio_tower=False, encode_whisper_embed=True)(**batch).loss
    loss.backward()
    assert math.isfinite(loss.item()) and loss.item() > 0


def _message(role: str, content) -> dict:
    return {"role": role, "content": content}


AUDIO = {"type": "audio", "audio_url": REFERENCE}
ANSWER = _message("assistant", {"type": "audio", "audio_url": TARGET})

BAD = {
    "an audio file that cannot be read": (
        {"messages": [_message("user", {"type": "audio", "audio_url": "/no/such/file.wav"}), ANSWER]},
        dict(codes={TARGET: TARGET_CODES}, audio_tokenizer=FrameCodec()),
        r"message 0 \(user\): cannot read audio '/no/such/file.wav'",
    ),
    "codes with the wrong number of codebooks": (
        {"messages": [_message("user", ["w1", AUDIO]), ANSWER]},
        dict(codes={REFERENCE: REFERENCE_CODES, TARGET: TARGET_CODES[:2]}),
        rf"message 1 \(assistant\): its codes have shape \(2, 7\); the model takes \({K}, frames\)",
    ),
    "codes outside the codebook": (
        {"messages": [_message("user", ["w1", AUDIO]), ANSWER]},
        dict(codes={REFERENCE: REFERENCE_CODES + tiny.CODEBOOK_SIZE, TARGET: TARGET_CODES}),
        r"message 0 \(user\): its codes leave the codebook range 0..31",
    ),
    "codes that are not an array": (
        {"messages": [_message("user", ["w1", AUDIO]), ANSWER]},
        dict(codes={REFERENCE: [[1, 2], [3]], TARGET: TARGET_CODES}),
        r"message 0 \(user\): its codes are not a \(codebooks, frames\) array",
    ),
    "a placeholder without audio": (
        {"messages": [_message("user", "w1 <|AUDIO|>"), ANSWER]},
        dict(codes=[TARGET_CODES]),
        r"message 0 \(user\): its text holds the audio placeholder <\|AUDIO\|> without audio",
    ),
    "audio without a placeholder": (
        {"messages": [_message("user", "w1"), _message("tool", AUDIO), ANSWER]},
        dict(),
        r"message 1 \(tool\): audio without a placeholder",
    ),
    "more audio than codes": (
        {"messages": [_message("user", ["w1", AUDIO]), ANSWER]},
        dict(codes=[TARGET_CODES]),
        r"1 code arrays for 2 audios \(message 0 \(user\), message 1 \(assistant\)\)",
    ),
    "an audio with neither codes nor an audio tokenizer": (
        {"messages": [_message("user", ["w1", AUDIO]), ANSWER]},
        dict(codes={TARGET: TARGET_CODES}),
        r"message 0 \(user\): no codes for audio 'reference.wav' and no audio_tokenizer",
    ),
    "nothing supervised": (
        {"messages": [_message("user", ["w1", AUDIO]), ANSWER], "start_index": 2},
        dict(),
        r"nothing is supervised: .*start_index=2; roles \['user', 'assistant'\]",
    ),
    "a recipient on a user message": (
        {"messages": [{"role": "user", "content": "w1", "recipient": "w2"}, ANSWER]},
        dict(codes=[TARGET_CODES]),
        r"message 0 \(user\): has recipient 'w2'; boson allows one only on assistant messages",
    ),
    "not a conversation": (
        {"messages": [{"role": "user", "content": 3}]},
        dict(),
        r"the conversation is not a ChatMLSample: .*messages.content",
    ),
}


@pytest.mark.core
@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_refused_naming_the_message_and_what_is_wrong(name):
    conversation, kwargs, message = BAD[name]
    with pytest.raises(SampleError, match=message):
        build(conversation, **kwargs)


def test_an_unreadable_file_is_refused_with_the_reader_s_reason(tmp_path):
    (tmp_path / "noise.wav").write_bytes(b"not a wave file")
    conversation = {"messages": [_message("user", {"type": "audio", "audio_url": str(tmp_path / "noise.wav")}), ANSWER]}
    with pytest.raises(SampleError, match=r"message 0 \(user\): cannot read audio '.*noise.wav': .+") as raised:
        build(conversation, codes={TARGET: TARGET_CODES}, audio_tokenizer=FrameCodec())
    assert raised.value.__cause__ is not None


def test_a_tokenizer_without_the_model_s_placeholder_ids_is_refused():
    config = tiny.config(audio_in_token_idx=249)
    with pytest.raises(SampleError, match=r"the tokenizer's <\|AUDIO\|> is id 250, the model config's is 249"):
        build(voice_clone_in_prompt(), config=config)


def test_whisper_features_with_input_audio_after_the_assistant_s_audio_are_refused():
    conversation = voice_clone_as_turns()
    conversation["messages"][3]["content"] = [AUDIO]
    config = tiny.config(skip_audio_tower=False, encode_whisper_embed=True)
    with pytest.raises(SampleError, match=r"message 3 \(user\): audio input after the assistant's audio in message 2"):
        build(conversation, config=config, codes=[REFERENCE_CODES, REFERENCE_CODES, TARGET_CODES])


BLOCKED_AUDIO_STACK = """
import importlib.abc, sys

class Blocked(importlib.abc.MetaPathFinder):  # as if boson's audio tokenizer (it imports torchaudio) were missing
    def find_spec(self, name, path=None, target=None):
        if name.startswith("boson_multimodal.audio_processing"):
            raise ImportError(f"blocked: {name}")

sys.meta_path.insert(0, Blocked())
import higgs_patch
assert "higgs_patch.samples" not in sys.modules  # import higgs_patch does not import the helper
higgs_patch.apply()
from higgs_patch.commands import tiny
conversation = {"messages": [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "w2 w3"}]}
sample = higgs_patch.training_sample(conversation, tiny.tokenizer(), tiny.config())
assert "torchaudio" not in sys.modules
print(sample.label_ids.tolist())
"""


@pytest.mark.core
def test_the_helper_is_imported_on_first_use_and_needs_no_torchaudio():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", BLOCKED_AUDIO_STACK], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[-2] == str([-100] * 9 + [2, 3, 255])
