"""A tiny transformers-native Higgs Audio v2 on the CPU: model, processor and samples, nothing downloaded.

The model has the released layout (DualFFN on every layer, a delay pattern) at hidden 64, 2 layers,
4 heads / 2 KV heads, 4 codebooks of 32 codes (+ BOS, EOS). The processor is transformers' real
``HiggsAudioV2Processor`` with a word-level tokenizer built here and a randomly initialised ``DacModel``
of 4 codebooks as its audio tokenizer, so the codes of a waveform come from a real encoder.
"""

from __future__ import annotations

import torch

CODEBOOKS, CODES = 4, 32
BOS, EOS = CODES, CODES + 1  # audio_stream_bos_id, audio_stream_eos_id
SPECIALS = ["<|pad|>", "<|begin_of_text|>", "<|eot_id|>", "<|AUDIO_OUT|>", "<|audio_out_bos|>", "<|audio_eos|>",
            "<|reserved_special_token_6|>"]
WORDS = ["say", "hello", "world", "a", "b", "c", "the", "cat", "dog", "speak", "now", "please", "[UNK]"]
SAMPLING_RATE, HOP = 24000, 4


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIALS + WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<|pad|>", bos_token="<|begin_of_text|>",
                                   eos_token="<|eot_id|>", unk_token="[UNK]")


def config(**overrides):
    from transformers import HiggsAudioV2Config

    vocab = tokenizer()
    ids = {name: vocab.convert_tokens_to_ids(token) for name, token in (
        ("audio_token_id", "<|AUDIO_OUT|>"), ("audio_bos_token_id", "<|audio_out_bos|>"),
        ("audio_delay_token_id", "<|reserved_special_token_6|>"), ("pad_token_id", "<|pad|>"),
        ("bos_token_id", "<|begin_of_text|>"), ("eos_token_id", "<|eot_id|>"))}
    settings = dict(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_codebooks=CODEBOOKS,
                    codebook_size=CODES + 2, audio_stream_bos_id=BOS, audio_stream_eos_id=EOS,
                    max_position_embeddings=512, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                    **ids)
    settings.update(overrides)
    return HiggsAudioV2Config(**settings)


def model(seed: int = 0, use_text_head: bool = True, **overrides):
    from transformers import HiggsAudioV2ForConditionalGeneration

    torch.manual_seed(seed)
    return HiggsAudioV2ForConditionalGeneration(config(**overrides), use_text_head=use_text_head)


def processor(seed: int = 0):
    from transformers import DacConfig, DacFeatureExtractor, DacModel, HiggsAudioV2Processor

    torch.manual_seed(seed)
    dac = DacConfig(encoder_hidden_size=4, downsampling_ratios=[2, 2], decoder_hidden_size=8,
                    n_codebooks=CODEBOOKS, codebook_size=CODES, codebook_dim=4, sampling_rate=SAMPLING_RATE)
    dac.num_quantizers = CODEBOOKS  # the processor reads the delay from the audio tokenizer's num_quantizers
    audio_tokenizer = DacModel(dac).eval()
    extractor = DacFeatureExtractor(sampling_rate=SAMPLING_RATE, hop_length=HOP)
    return HiggsAudioV2Processor(extractor, tokenizer(), audio_tokenizer, audio_stream_bos_id=BOS,
                                 audio_stream_eos_id=EOS)


def waveform(frames: int, seed: int = 0):
    """A waveform the audio tokenizer turns into ``frames`` frames of codes."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(frames * HOP, generator=generator).numpy()


def batch(proc, texts: list[str], frames: list[int], seed: int = 0):
    """The processor's training batch: ``texts`` hold ``<|AUDIO_OUT|>`` where ``frames`` (in order) go."""
    audio = [waveform(n, seed + i) for i, n in enumerate(frames)] or None
    return proc(text=list(texts), audio=audio, output_labels=True, return_tensors="pt")
