"""The built-in tiny default: a real Higgs Audio model, collator and samples, small enough for a CPU.

The released architecture (``dual_ffn_fast_forward``, DualFFN on every layer), shrunk: about 174 K
parameters (256-token vocabulary, hidden size 64, 2 layers, 4 codebooks of 32 codes),
random weights, nothing downloaded. ``higgs-patch smoke`` trains it; the tests build on it.

This module imports torch and boson_multimodal; ``import higgs_patch`` never imports it.
"""

from __future__ import annotations

import dataclasses

import torch
import transformers

from boson_multimodal.data_collator.higgs_audio_collator import HiggsAudioSampleCollator
from boson_multimodal.dataset.chatml_dataset import ChatMLDatasetSample
from boson_multimodal.model.higgs_audio.configuration_higgs_audio import HiggsAudioConfig
from boson_multimodal.model.higgs_audio.modeling_higgs_audio import HiggsAudioModel

VOCAB = 256
CODEBOOKS = 4
CODEBOOK_SIZE = 32
AUDIO_BOS, AUDIO_EOS = CODEBOOK_SIZE, CODEBOOK_SIZE + 1
PAD, AUDIO_IN, AUDIO_OUT = 0, 250, 251
AUDIO_OUT_BOS_TOKEN, AUDIO_EOS_TOKEN = 252, 253  # the config's audio_out_bos_token_id and audio_eos_token_id
# boson's chat-format tokens inside the tiny vocabulary; words "w1" … "w199" are ids 1 … 199.
SPECIAL_TOKENS = {
    "<|finetune_right_pad_id|>": PAD, "<|AUDIO|>": AUDIO_IN, "<|AUDIO_OUT|>": AUDIO_OUT,
    "<|audio_out_bos|>": AUDIO_OUT_BOS_TOKEN, "<|audio_eos|>": AUDIO_EOS_TOKEN, "<|audio_bos|>": 254,
    "<|eot_id|>": 255, "<|begin_of_text|>": 240, "<|end_of_text|>": 241, "<|start_header_id|>": 242,
    "<|end_header_id|>": 243, "<|eom_id|>": 244, "<|recipient|>": 245,
}
ROLES = {"user": 201, "assistant": 202, "system": 203}
UNKNOWN = 200


def config(**overrides) -> HiggsAudioConfig:
    settings = dict(
        text_config=dict(
            model_type="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=PAD,
        ),
        audio_encoder_config=dict(
            model_type="higgs_audio_encoder", d_model=64, encoder_layers=1, encoder_attention_heads=2,
            encoder_ffn_dim=64, num_mel_bins=128,
        ),
        audio_adapter_type="dual_ffn_fast_forward",  # as released; the default "stack" builds plain Llama layers
        skip_audio_tower=True, encode_whisper_embed=False, encode_audio_in_tokens=True,
        audio_ffn_hidden_size=64, audio_ffn_intermediate_size=128,
        audio_num_codebooks=CODEBOOKS, audio_codebook_size=CODEBOOK_SIZE,
        audio_stream_bos_id=AUDIO_BOS, audio_stream_eos_id=AUDIO_EOS,
        audio_in_token_idx=AUDIO_IN, audio_out_token_idx=AUDIO_OUT, pad_token_id=PAD,
        audio_out_bos_token_id=AUDIO_OUT_BOS_TOKEN, audio_eos_token_id=AUDIO_EOS_TOKEN,
    )
    settings.update(overrides)
    if "audio_dual_ffn_layers" not in overrides:  # DualFFN on every layer, as released
        layers = settings["text_config"]
        layers = layers.get("num_hidden_layers") if isinstance(layers, dict) else layers.num_hidden_layers
        settings["audio_dual_ffn_layers"] = list(range(layers))
    return HiggsAudioConfig(**settings)


def tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A text tokenizer for the tiny vocabulary, built in memory: boson's 13 special tokens at the ids the tiny
    config uses, the roles, and the words ``w1`` … ``w199`` (id = the number), split on white space."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    names = {index: f"<|reserved_{index}|>" for index in range(VOCAB)}
    names.update({index: f"w{index}" for index in range(1, UNKNOWN)})
    names.update({index: token for token, index in {**ROLES, **SPECIAL_TOKENS, "<unk>": UNKNOWN}.items()})
    words = Tokenizer(models.WordLevel(vocab={token: index for index, token in names.items()}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    words.add_special_tokens(list(SPECIAL_TOKENS))
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=words, unk_token="<unk>", pad_token="<|finetune_right_pad_id|>",
        bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
    )


def model(seed: int = 0, **overrides) -> HiggsAudioModel:
    torch.manual_seed(seed)
    return HiggsAudioModel(config(**overrides))


def collator(**overrides) -> HiggsAudioSampleCollator:
    settings = dict(
        whisper_processor=None, audio_in_token_id=AUDIO_IN, audio_out_token_id=AUDIO_OUT, pad_token_id=PAD,
        audio_stream_bos_id=AUDIO_BOS, audio_stream_eos_id=AUDIO_EOS, encode_whisper_embed=False,
        return_audio_in_tokens=True, audio_num_codebooks=CODEBOOKS, round_to=8,
    )
    settings.update(overrides)
    return HiggsAudioSampleCollator(**settings)


def sample(
    seed: int = 0,
    text: int = 6,
    reference: int | None = 6,
    target: int = 8,
    answer: int = 3,
    waveform_rate: int | None = None,
    device: str | torch.device = "cpu",
    codebooks: int = CODEBOOKS,
    codebook_size: int = CODEBOOK_SIZE,
) -> ChatMLDatasetSample:
    """A voice-clone sample: ``text <|AUDIO|> <|AUDIO_OUT|> answer``.

    ``reference=None`` gives the broken layout with only the target supplied (two audio tokens, one
    segment). ``waveform_rate`` adds a waveform per segment for the Whisper path. ``codebooks`` and
    ``codebook_size`` shape the audio codes for a model other than the tiny one (the released 8 x 1,024).
    """
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(1, 200, (text + answer,), generator=g)
    ids = torch.cat([words[:text], torch.tensor([AUDIO_IN, AUDIO_OUT]), words[text:]])
    labels = torch.cat([torch.full((text,), -100), torch.tensor([-100, AUDIO_OUT]), words[text:]])
    lengths = ([reference] if reference else []) + [target]
    codes = torch.randint(0, codebook_size, (codebooks, sum(lengths)), generator=g)
    starts = torch.tensor([0] + lengths[:-1]).cumsum(0)
    if waveform_rate:
        waves = torch.randn(sum(lengths) * 640, generator=g)
        wave_starts, rates = starts * 640, torch.full((len(lengths),), waveform_rate)
    else:
        waves, wave_starts, rates = torch.zeros(0), torch.zeros(0, dtype=torch.long), torch.zeros(0)
    return ChatMLDatasetSample(
        input_ids=ids, label_ids=labels, audio_ids_concat=codes.to(device), audio_ids_start=starts,
        audio_waveforms_concat=waves, audio_waveforms_start=wave_starts, audio_sample_rate=rates,
        audio_speaker_indices=torch.zeros(len(lengths), dtype=torch.long),
    )


def samples(count: int, **kwargs) -> list[ChatMLDatasetSample]:
    return [sample(seed=i, **kwargs) for i in range(count)]


def fields(batch) -> dict:
    return {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}


class DictCollator:
    """What users write: the upstream collator, its batch as a dict with ``labels`` for the Trainer."""

    def __init__(self, inner: HiggsAudioSampleCollator, with_labels: bool = True) -> None:
        self.inner, self.with_labels = inner, with_labels

    def __call__(self, batch):
        out = fields(self.inner(batch))
        if self.with_labels:
            out["labels"] = out["label_ids"]
        return out
