"""From a conversation with audio to the training sample boson's collator and model expect, in one call.

boson_multimodal tokenizes a conversation (``prepare_chatml_sample``: its chat format, and which turns
are supervised) and leaves the rest to every trainer: encode each audio, concatenate the codes, compute
the segment starts, fill the waveform fields. Done by hand, that is where labels go wrong (a voice-clone
reference trained as a target, a fork's five-value variant of the function, ``None`` fields the collator
trips over). :func:`training_sample` does it once, with boson's own tokenization, and checks the
conversation on the way.

The labels stay boson's own: the text labels of ``prepare_chatml_sample`` (assistant messages from
``start_index`` on); the audio labels the collator makes from the codes (``-100`` at each segment's
start, the stream's end code after the last, and no label at all for an audio-out whose
``<|AUDIO_OUT|>`` carries none). So the audio of a user or system message (a voice-clone reference) is
model input only, an assistant's audio before ``start_index`` is context, and an assistant's audio from
``start_index`` on is the target.

Imports torch and boson_multimodal's data types and dataset module (never its model, so no shim is
needed first); ``import higgs_patch`` imports this module on first use of ``training_sample``. boson's
function is called through its module, so the plugin's patch of it (``prepare-chatml-errors``) is in
force whenever it is applied, whichever was imported first.
"""

from __future__ import annotations

import base64
import dataclasses
import io
from typing import TYPE_CHECKING, Any, Mapping, Protocol, Sequence, Union

import dacite
import numpy as np
import torch
from boson_multimodal.data_types import AudioContent, ChatMLSample, Message, TextContent
from boson_multimodal.dataset import chatml_dataset
from boson_multimodal.dataset.chatml_dataset import ChatMLDatasetSample

from .errors import SampleError

if TYPE_CHECKING:  # not imported at run time: boson's model package needs the shims first on transformers >= 4.48
    from boson_multimodal.model.higgs_audio.configuration_higgs_audio import HiggsAudioConfig
    from transformers import PreTrainedTokenizerBase

__all__ = ["AudioCodes", "AudioTokenizer", "SampleError", "as_chatml_sample", "training_sample"]

AudioCodes = Union[torch.Tensor, np.ndarray, Sequence[Sequence[int]]]  # (codebooks, frames)

AUDIO_IN, AUDIO_OUT = "<|AUDIO|>", "<|AUDIO_OUT|>"
AUDIO_IN_ROLES, AUDIO_OUT_ROLES = ("user", "system"), ("assistant",)  # where boson writes each placeholder
WHISPER_SAMPLING_RATE = 16_000  # the rate of Whisper's feature extractor, which the collator resamples to
IGNORE_INDEX = -100
UNKNOWN_SPEAKER = -1  # boson's ChatMLDatasetSample: "-1 means unknown speaker"


class AudioTokenizer(Protocol):
    """boson's ``HiggsAudioTokenizer``, or anything that encodes a waveform the same way."""

    def encode(self, audio_path_or_wv: Any, sr: int | None = None) -> Any: ...


@dataclasses.dataclass(frozen=True)
class _Audio:
    index: int  # of the message
    role: str
    content: AudioContent

    @property
    def where(self) -> str:
        return f"message {self.index} ({self.role})"

    @property
    def is_input(self) -> bool:
        return self.role in AUDIO_IN_ROLES


def training_sample(
    conversation: ChatMLSample | Mapping[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    config: HiggsAudioConfig,
    *,
    audio_tokenizer: AudioTokenizer | None = None,
    codes: Sequence[AudioCodes] | Mapping[str, AudioCodes] | None = None,
) -> ChatMLDatasetSample:
    """The ``ChatMLDatasetSample`` to train on, for ``HiggsAudioSampleCollator`` and ``HiggsAudioModel``.

    ``conversation``: boson's ``ChatMLSample``, or the same as a dict (a line of a JSON-lines file).
    ``tokenizer``: the model's text tokenizer. ``config``: the model's config (``model.config``): its
    number of codebooks and code range check the codes, its placeholder ids check the tokenizer, and
    ``encode_whisper_embed`` decides whether the input audio's waveforms are read in as well.
    The audio codes come from ``codes`` (one ``(codebooks, frames)`` array per audio in the order of
    the conversation, or a mapping from ``audio_url`` to it) or else from ``audio_tokenizer.encode``.

    Raises :class:`SampleError` naming the message and what is wrong with it.
    """
    sample = as_chatml_sample(conversation)
    _check_placeholder_ids(tokenizer, config)
    audios = _audios(sample)
    if config.encode_whisper_embed:
        _check_whisper_order(audios)
    # Given a ChatMLSample (never a dict: as_chatml_sample read it), boson's function raises on error: its real
    # error with the plugin applied (prepare-chatml-errors), else a TypeError whose __context__ is the real one.
    input_ids, label_ids, contents, _speaker = chatml_dataset.prepare_chatml_sample(sample, tokenizer)
    placeholders = sum(token in (config.audio_in_token_idx, config.audio_out_token_idx) for token in input_ids)
    if placeholders != len(contents) or len(contents) != len(audios):  # a guard: the checks above make it equal
        raise SampleError(f"the tokenized conversation has {placeholders} audio placeholders for {len(audios)} audios")
    if all(label == IGNORE_INDEX for label in label_ids):
        raise SampleError(
            f"nothing is supervised: boson trains the assistant messages from start_index on "
            f"(start_index={sample.start_index}; roles {[message.role for message in sample.messages]})"
        )
    segments = _codes(audios, config, audio_tokenizer, codes)  # after the cheap checks: it may encode audio
    # Waveforms only for the input audio, and only where the model encodes Whisper features of it.
    waves = [(torch.from_numpy(_read(audio, WHISPER_SAMPLING_RATE)), WHISPER_SAMPLING_RATE)
             for audio in audios if config.encode_whisper_embed and audio.is_input]
    return ChatMLDatasetSample(
        input_ids=torch.tensor(input_ids, dtype=torch.long),
        label_ids=torch.tensor(label_ids, dtype=torch.long),
        audio_ids_concat=torch.cat(segments, dim=1) if segments
        else torch.zeros((config.audio_num_codebooks, 0), dtype=torch.long),
        audio_ids_start=_starts([segment.shape[1] for segment in segments]),
        audio_waveforms_concat=torch.cat([wave for wave, _ in waves]) if waves else torch.zeros(0),
        audio_waveforms_start=_starts([len(wave) for wave, _ in waves]),
        audio_sample_rate=torch.tensor([float(rate) for _, rate in waves]),
        # boson's model reads no speaker index; the conversation's speaker is a name, not an index
        audio_speaker_indices=torch.full((len(segments),), UNKNOWN_SPEAKER, dtype=torch.long),
    )


def as_chatml_sample(conversation: ChatMLSample | Mapping[str, Any]) -> ChatMLSample:
    """boson's ``ChatMLSample`` from itself or from a dict, read as strictly as boson reads one.

    Keys that are not fields of ``ChatMLSample`` (an ``id`` in a JSON line) are left out, as boson does.
    """
    if isinstance(conversation, ChatMLSample):
        return conversation
    if not isinstance(conversation, Mapping):
        raise SampleError(f"a conversation is a ChatMLSample or a dict, not {type(conversation).__name__}")
    known = {field.name for field in dataclasses.fields(ChatMLSample)}
    try:
        return dacite.from_dict(
            data_class=ChatMLSample, data={key: value for key, value in conversation.items() if key in known},
            config=dacite.Config(strict=True, check_types=True),
        )
    except dacite.DaciteError as error:
        raise SampleError(f"the conversation is not a ChatMLSample: {error}") from error


def _contents(message: Message) -> list[Any]:
    content = message.content
    return list(content) if isinstance(content, list) else [content]


def _audios(sample: ChatMLSample) -> list[_Audio]:
    """The conversation's audio in order, after checking that each gets its placeholder and nothing else does."""
    audios = []
    for index, message in enumerate(sample.messages):
        where = f"message {index} ({message.role})"
        if message.recipient and message.role != "assistant":
            raise SampleError(f"{where}: has recipient {message.recipient!r}; boson allows one only on assistant messages")
        for content in _contents(message):
            text = content if isinstance(content, str) else content.text if isinstance(content, TextContent) else ""
            for placeholder in (AUDIO_IN, AUDIO_OUT):
                if placeholder in text:
                    raise SampleError(
                        f"{where}: its text holds the audio placeholder {placeholder} without audio; give the audio "
                        "as an AudioContent instead (boson writes the placeholder for it)"
                    )
            if isinstance(content, AudioContent):
                if message.role not in AUDIO_IN_ROLES + AUDIO_OUT_ROLES:
                    raise SampleError(
                        f"{where}: audio without a placeholder: boson writes {AUDIO_IN} for audio in a user or system "
                        f"message and {AUDIO_OUT} in an assistant message, nothing in a {message.role!r} one"
                    )
                audios.append(_Audio(index, message.role, content))
    return audios


def _check_placeholder_ids(tokenizer: PreTrainedTokenizerBase, config: HiggsAudioConfig) -> None:
    for token, expected in ((AUDIO_IN, config.audio_in_token_idx), (AUDIO_OUT, config.audio_out_token_idx)):
        found = tokenizer.convert_tokens_to_ids(token)
        if found != expected:
            raise SampleError(
                f"the tokenizer's {token} is id {found}, the model config's is {expected}: "
                "use the tokenizer that was released with the model"
            )


def _check_whisper_order(audios: list[_Audio]) -> None:
    """boson's collator (Whisper features on) reads the n-th waveform for the n-th audio of either kind."""
    assistant_audio = next((audio for audio in audios if not audio.is_input), None)
    for audio in audios:
        if audio.is_input and assistant_audio is not None and audio.index > assistant_audio.index:
            raise SampleError(
                f"{audio.where}: audio input after the assistant's audio in {assistant_audio.where}: with "
                "encode_whisper_embed boson's collator then reads the wrong waveform; put input audio first"
            )


def _codes(
    audios: list[_Audio], config: HiggsAudioConfig, audio_tokenizer: AudioTokenizer | None,
    codes: Sequence[AudioCodes] | Mapping[str, AudioCodes] | None,
) -> list[torch.Tensor]:
    if codes is not None and not isinstance(codes, Mapping) and len(codes) != len(audios):
        raise SampleError(
            f"{len(codes)} code arrays for {len(audios)} audios "
            f"({', '.join(audio.where for audio in audios) or 'none'}): give one per audio, in order"
        )
    found = []
    for position, audio in enumerate(audios):
        if isinstance(codes, Mapping) and audio.content.audio_url in codes:
            given = codes[audio.content.audio_url]
        elif codes is not None and not isinstance(codes, Mapping):
            given = codes[position]
        elif audio_tokenizer is not None:
            rate = getattr(audio_tokenizer, "sampling_rate", None)
            given = audio_tokenizer.encode(_read(audio, rate), rate)
        else:
            raise SampleError(f"{audio.where}: no codes for audio {audio.content.audio_url!r} and no audio_tokenizer")
        found.append(_checked_codes(given, audio, config))
    return found


def _checked_codes(given: AudioCodes, audio: _Audio, config: HiggsAudioConfig) -> torch.Tensor:
    try:
        codes = given.detach().cpu() if isinstance(given, torch.Tensor) else torch.as_tensor(np.asarray(given))
    except (TypeError, ValueError) as error:  # ragged lists, objects
        raise SampleError(f"{audio.where}: its codes are not a (codebooks, frames) array: {error}") from error
    if codes.dim() == 3 and codes.shape[0] == 1:  # the audio tokenizer's batch of one
        codes = codes[0]
    expected = config.audio_num_codebooks
    if codes.dim() != 2 or codes.shape[0] != expected or codes.shape[1] == 0:
        raise SampleError(
            f"{audio.where}: its codes have shape {tuple(codes.shape)}; the model takes ({expected}, frames): "
            f"{expected} codebooks, one or more frames"
        )
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise SampleError(f"{audio.where}: its codes are {codes.dtype}, not integers")
    size = config.audio_codebook_size
    if bool(((codes < 0) | (codes >= size)).any()):
        raise SampleError(f"{audio.where}: its codes leave the codebook range 0..{size - 1} "
                          f"(found {int(codes.min())}..{int(codes.max())})")
    return codes.long()


def _read(audio: _Audio, rate: int | None) -> np.ndarray:
    """The audio's waveform (mono, float32) at ``rate`` (None: as stored), from its file or ``raw_audio``."""
    import librosa  # imported here: slow to import, and only needed when audio is read

    content = audio.content
    if content.raw_audio:
        source: Any = io.BytesIO(base64.b64decode(content.raw_audio))
    elif content.audio_url and content.audio_url != "placeholder":
        source = content.audio_url
    else:
        raise SampleError(f"{audio.where}: the audio has neither a file (audio_url) nor raw_audio to read")
    try:
        wave, _ = librosa.load(source, sr=rate, mono=True)
    except Exception as error:  # soundfile's, audioread's and the OS's errors alike: re-raised, named
        name = "raw_audio" if content.raw_audio else repr(content.audio_url)
        reason = f"{type(error).__name__}: {error}".rstrip(": ")  # audioread's NoBackendError says nothing else
        raise SampleError(f"{audio.where}: cannot read audio {name}: {reason}") from error
    return wave


def _starts(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0] + lengths[:-1], dtype=torch.long).cumsum(0)[: len(lengths)]
