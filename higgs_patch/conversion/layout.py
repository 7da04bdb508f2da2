"""What the two formats hold and how one maps onto the other: configs, refusals, key rules.

Boson's ``higgs_audio`` config describes a family of layouts; transformers' ``higgs_audio_v2`` expresses one
of them, the released one. :func:`refusals` names every setting of a boson config outside it, so a conversion
never drops a part of the network silently. One table of key templates is read both ways; a key no
template, merge or drop names is refused by the caller, and so is any key the native model does not have.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BOSON, NATIVE = "higgs_audio", "higgs_audio_v2"

# The released checkpoint's settings of every boson switch that changes the network or how it is fed, with
# what native would lose if a checkpoint differed: each pair is (released value, what native cannot express).
RELEASED = {
    "skip_audio_tower": (True, "the Whisper tower (skip_audio_tower false): native reads audio only as codes"),
    "encode_whisper_embed": (False, "Whisper embeddings of audio input (encode_whisper_embed true): native has no Whisper tower"),
    "encode_audio_in_tokens": (True, "audio input without its codes (encode_audio_in_tokens false)"),
    "use_audio_out_self_attention": (False, "audio self-attention (use_audio_out_self_attention): native's audio shares the text attention"),
    "use_delay_pattern": (True, "codes without the delay pattern (use_delay_pattern false): native always generates with it"),
    "audio_decoder_proj_num_layers": (0, "decoder projector layers (audio_decoder_proj_num_layers > 0)"),
    "use_audio_out_embed_projector": (False, "an audio-out embedding projector (use_audio_out_embed_projector)"),
    "audio_embed_avg": (False, "averaged codebook embeddings (audio_embed_avg): native sums them"),
    "use_rq_transformer": (False, "an RQ-Transformer head (use_rq_transformer)"),
}
DUAL_FFN_ADAPTERS = ("dual_ffn", "dual_ffn_fast_forward")  # with every layer listed, both build the same network

# Boson's defaults for the ids native has no field for, used when the tokenizer does not name the token.
BOSON_AUDIO_IN_ID, BOSON_AUDIO_EOS_ID, NATIVE_DELAY_ID = 128015, 128012, 128014
AUDIO_IN_TOKEN, AUDIO_EOS_TOKEN, DELAY_TOKEN = "<|AUDIO|>", "<|audio_eos|>", "<|reserved_special_token_6|>"

# The text backbone's fields that native holds at its top level, as boson's Llama text_config names them.
TEXT_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
    "rope_parameters", "attention_bias", "attention_dropout", "mlp_bias", "head_dim", "pretraining_tp",
    "bos_token_id", "eos_token_id",
)

# One table for both directions: a boson key and the native key it becomes, with named parts.
_KEYS = (
    ("embed_tokens.weight", "model.embed_tokens.weight"),
    ("layers.{layer}.{rest}", "model.layers.{layer}.{rest}"),
    ("norm.weight", "model.norm.weight"),
    ("audio_codebook_embeddings.weight", "model.embed_audio_tokens.embed_audio_tokens.weight"),
    ("audio_decoder_proj.{head}.weight", "{head}.weight"),
)
_PARTS = {"layer": r"\d+", "rest": r".+", "head": r"audio_lm_head|text_lm_head"}


def _pattern(template: str) -> re.Pattern[str]:
    text = re.escape(template)
    for name, part in _PARTS.items():
        text = text.replace(re.escape(f"{{{name}}}"), f"(?P<{name}>{part})")
    return re.compile(text)


RULES = {
    BOSON: tuple((_pattern(boson), native) for boson, native in _KEYS),
    NATIVE: tuple((_pattern(native), boson) for boson, native in _KEYS),
}

# Keys a checkpoint may hold that are not weights of the network, with why nothing is lost by dropping them.
_DROPS = (
    (r"(.+\.)?rotary_emb\.(original_)?inv_freq", "a rotary buffer, recomputed from the config's rope parameters"),
    (r"audio_codebook_weights", "a constant boson sets in __init__ (equal codebook weights), not a trained weight"),
    (r"model\.embed_audio_tokens\.audio_tokens_offsets", "a buffer native computes from num_codebooks and codebook_size"),
)

# Boson's partially frozen halves (its freeze_* training options), stored split: cat(frozen, trainable) on dim 0.
_HALVES = (
    ("embed_tokens.weight", "embed_tokens.embedding_frozen.weight", "embed_tokens.embedding_trainable.weight"),
) + tuple(
    (f"audio_decoder_proj.{head}.weight", f"audio_decoder_proj.{head}.linear_frozen.weight",
     f"audio_decoder_proj.{head}.linear_trainable.weight")
    for head in ("text_lm_head", "audio_lm_head")
)


@dataclass(frozen=True)
class Merge:
    """Two source tensors stored as halves of one weight: the weight is their concatenation on dim 0."""

    key: str
    first: str
    second: str


def merges(direction: str) -> tuple[Merge, ...]:
    return tuple(Merge(*halves) for halves in _HALVES) if direction == BOSON else ()


def rename(key: str, direction: str) -> str | None:
    """The target key of a source key, or None when no rule names it."""
    for pattern, template in RULES[direction]:
        found = pattern.fullmatch(key)
        if found:
            return template.format(**found.groupdict())
    return None


def drop_reason(key: str) -> str | None:
    for pattern, reason in _DROPS:
        if re.fullmatch(pattern, key):
            return reason
    return None


def read_config(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{checkpoint} has no config.json: is it a saved checkpoint directory?") from None


def refusals(config: dict[str, Any]) -> list[str]:
    """What in a boson config native cannot express; empty for the released layout."""
    problems = []
    adapter = config.get("audio_adapter_type", "stack")
    layers = _text(config).get("num_hidden_layers", 32)
    dual = sorted(config.get("audio_dual_ffn_layers") or [])
    if adapter not in DUAL_FFN_ADAPTERS:
        problems.append(f"no DualFFN (audio_adapter_type {adapter!r}): native has an audio FFN on every layer")
    elif dual != list(range(layers)):
        problems.append(
            f"partial DualFFN (audio_dual_ffn_layers holds {len(dual)} of {layers} layers: {dual}): "
            "native has an audio FFN on every layer"
        )
    for name, (released, what) in RELEASED.items():
        value = config.get(name, _BOSON_DEFAULTS[name])
        if value != released:
            problems.append(what)
    return problems


# HiggsAudioConfig's own defaults, for a config.json that leaves a switch out.
_BOSON_DEFAULTS = {
    "skip_audio_tower": False, "encode_whisper_embed": True, "encode_audio_in_tokens": False,
    "use_audio_out_self_attention": False, "use_delay_pattern": False, "audio_decoder_proj_num_layers": 0,
    "use_audio_out_embed_projector": False, "audio_embed_avg": False, "use_rq_transformer": False,
}


def _text(config: dict[str, Any]) -> dict[str, Any]:
    return dict(config.get("text_config") or {})


def native_config(boson: dict[str, Any], tokens: dict[str, int]):
    """transformers' HiggsAudioV2Config holding what the boson config says (the backbone, codebooks, ids)."""
    from transformers import HiggsAudioV2Config, LlamaConfig

    text = _text(boson)
    text.pop("model_type", None)
    llama = LlamaConfig(**text)  # reads every form of rope settings a saved text_config holds
    fields = {name: getattr(llama, name) for name in TEXT_FIELDS if getattr(llama, name, None) is not None}
    fields.update(
        tie_word_embeddings=False,  # boson's text head is a weight of its own, never tied
        pad_token_id=boson.get("pad_token_id", llama.pad_token_id),
        num_codebooks=boson["audio_num_codebooks"],
        codebook_size=boson["audio_codebook_size"] + 2,  # boson adds the stream's BOS and EOS to each codebook
        audio_stream_bos_id=boson["audio_stream_bos_id"],
        audio_stream_eos_id=boson["audio_stream_eos_id"],
        audio_token_id=boson["audio_out_token_idx"],
        audio_bos_token_id=boson["audio_out_bos_token_id"],
        audio_delay_token_id=tokens.get(DELAY_TOKEN, NATIVE_DELAY_ID),
    )
    config = HiggsAudioV2Config(**fields)
    config.architectures = ["HiggsAudioV2ForConditionalGeneration"]
    config.dtype = boson.get("dtype", boson.get("torch_dtype"))
    return config


def boson_config(source, tokens: dict[str, int]) -> dict[str, Any]:
    """A boson config.json of the released layout holding what the native config (HiggsAudioV2Config) says."""
    from transformers import LlamaConfig

    text = {name: getattr(source, name) for name in TEXT_FIELDS}
    text = LlamaConfig(**text, pad_token_id=source.pad_token_id, tie_word_embeddings=False).to_dict()
    layers = source.num_hidden_layers
    config = {name: released for name, (released, _) in RELEASED.items()}
    config.update(
        model_type=BOSON,
        architectures=["HiggsAudioModel"],
        text_config=text,
        audio_adapter_type="dual_ffn_fast_forward",
        audio_dual_ffn_layers=list(range(layers)),
        audio_ffn_hidden_size=source.hidden_size,  # boson's audio FFN is built from the text config; recorded as such
        audio_ffn_intermediate_size=source.intermediate_size,
        audio_num_codebooks=source.num_codebooks,
        audio_codebook_size=source.codebook_size - 2,
        audio_stream_bos_id=source.audio_stream_bos_id,
        audio_stream_eos_id=source.audio_stream_eos_id,
        audio_out_token_idx=source.audio_token_id,
        audio_out_bos_token_id=source.audio_bos_token_id,
        audio_in_token_idx=tokens.get(AUDIO_IN_TOKEN, BOSON_AUDIO_IN_ID),
        audio_eos_token_id=tokens.get(AUDIO_EOS_TOKEN, BOSON_AUDIO_EOS_ID),
        pad_token_id=source.pad_token_id,
    )
    if source.dtype is not None:
        config["dtype"] = str(source.dtype).removeprefix("torch.")
    return config


def special_token_ids(checkpoint: Path) -> dict[str, int]:
    """The ids the checkpoint's tokenizer gives its added tokens (tokenizer.json, else tokenizer_config.json)."""
    ids: dict[str, int] = {}
    tokenizer = checkpoint / "tokenizer.json"
    if tokenizer.is_file():
        for token in json.loads(tokenizer.read_text(encoding="utf-8")).get("added_tokens", []):
            ids[token["content"]] = token["id"]
    settings = checkpoint / "tokenizer_config.json"
    if not ids and settings.is_file():
        decoder = json.loads(settings.read_text(encoding="utf-8")).get("added_tokens_decoder", {})
        ids = {token["content"]: int(index) for index, token in decoder.items()}
    return ids
