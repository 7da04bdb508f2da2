"""``higgs-patch convert``: boson's tiny released-layout checkpoint to transformers' native model and back.

The command runs as users run it (a subprocess, a fresh interpreter); the converted checkpoints are loaded by
the real target classes and compared on the same inputs: boson's text and audio logits against native's.
"""

from __future__ import annotations

import filecmp
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from packaging.version import Version
from safetensors import safe_open
from safetensors.torch import load_file

import higgs_patch
from higgs_patch.commands import tiny

NATIVE = Version(transformers.__version__) >= Version("5.3")
needs_native = pytest.mark.skipif(
    not NATIVE, reason=f"transformers {transformers.__version__} has no native Higgs Audio v2 (from 5.3)"
)
# The tokenizer's added tokens, at the tiny model's ids (the delay token native needs after them).
TOKENS = {"<|AUDIO|>": tiny.AUDIO_IN, "<|AUDIO_OUT|>": tiny.AUDIO_OUT, "<|audio_out_bos|>": 252,
          "<|audio_eos|>": 253, "<|reserved_special_token_6|>": 254}


def convert(*args: str) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("higgs-patch")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "higgs_patch"]
    env = {k: v for k, v in os.environ.items() if k not in ("HIGGS_PATCH_ACTIVATE", "PYTHONPATH")}
    return subprocess.run([*command, "convert", *args], capture_output=True, text=True, env=env, timeout=300)


def save_tokenizer(directory: Path) -> None:
    """A word-level tokenizer of the tiny vocabulary, boson's audio tokens at the tiny model's ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": tiny.PAD, **{f"w{i}": i for i in range(1, min(TOKENS.values()))}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>")
    tokenizer.add_special_tokens({"additional_special_tokens": list(TOKENS)})
    assert [tokenizer.convert_tokens_to_ids(t) for t in TOKENS] == list(TOKENS.values())
    tokenizer.save_pretrained(directory)


def boson_checkpoint(directory: Path, seed: int = 0, max_shard_size: str = "5GB", dtype: torch.dtype | None = None,
                     **overrides) -> tuple[Path, tiny.HiggsAudioModel]:
    model = tiny.model(seed=seed, use_delay_pattern=True, **overrides)  # the released layout: delay pattern on
    model = model if dtype is None else model.to(dtype)
    model.save_pretrained(directory, max_shard_size=max_shard_size)
    save_tokenizer(directory)
    return directory, model


def load_native(directory: Path):
    model, info = transformers.HiggsAudioV2ForConditionalGeneration.from_pretrained(
        directory, use_text_head=True, output_loading_info=True
    )
    assert not any(info.values()), info  # no missing, unexpected or mismatched key
    return model.eval()


def weights(directory: Path) -> dict[str, torch.Tensor]:
    files = sorted(directory.glob("*.safetensors"))
    return {key: value for path in files for key, value in load_file(path).items()}


def boson_and_native_logits(boson, native, text: torch.Tensor, codes: torch.Tensor | None):
    """Both models on one input: ``text`` with, when ``codes`` (K, N) are given, one ``<|AUDIO_OUT|>`` after
    its fifth token, which boson expands into N frames and native takes as N placeholders. Boson pads a
    sequence to a multiple of 8 unless ``use_cache`` (as in generation): on, so both see the same positions."""
    with torch.no_grad():
        if codes is None:
            ours = boson(input_ids=text[None], attention_mask=torch.ones_like(text)[None], use_cache=True)
            hidden = native.model(input_ids=text[None]).last_hidden_state
            return ours.logits, native.text_lm_head(hidden), None, None
        ids = torch.cat([text[:5], torch.tensor([tiny.AUDIO_OUT]), text[5:]])
        ours = boson(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None],
                     audio_out_ids=codes, audio_out_ids_start=torch.tensor([0]), use_cache=True)
        frames = codes.shape[1]
        expanded = torch.cat([text[:5], torch.full((frames,), tiny.AUDIO_OUT), text[5:]])[None]
        inputs = dict(input_ids=expanded, audio_input_ids=codes.T[None],
                      audio_input_ids_mask=torch.ones(1, frames, dtype=torch.bool))
        hidden = native.model(**inputs).last_hidden_state
        audio = native(**inputs).logits[0, 5:5 + frames].reshape(frames, codes.shape[0], -1)
        return ours.logits, native.text_lm_head(hidden), ours.audio_logits, audio


def assert_same_logits(boson, native, *, seed: int, vocabulary: int, tokens: int, frames: int) -> None:
    """Text and audio logits of the two formats agree within 1e-5 on random text and audio-out codes."""
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(1, vocabulary, (tokens,), generator=generator)
    codes = torch.randint(0, tiny.CODEBOOK_SIZE + 2, (tiny.CODEBOOKS, frames), generator=generator)
    ours, theirs, ours_audio, theirs_audio = boson_and_native_logits(boson, native, text, codes)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    torch.testing.assert_close(theirs_audio, ours_audio, rtol=0, atol=1e-5)


@pytest.mark.core
@needs_native
def test_converts_the_released_layout_to_native_with_equal_logits_and_back_bitwise(tmp_path):
    source, boson = boson_checkpoint(tmp_path / "boson")
    done = convert(str(source), str(tmp_path / "native"))
    assert done.returncode == 0, done.stderr
    assert "(higgs_audio) -> " in done.stdout and "(higgs_audio_v2)" in done.stdout and "use_text_head=True" in done.stdout
    native = load_native(tmp_path / "native")
    config = native.config
    assert (config.hidden_size, config.num_hidden_layers, config.rms_norm_eps) == (64, 2, 1e-6)  # the source's
    assert (config.num_codebooks, config.codebook_size) == (tiny.CODEBOOKS, tiny.CODEBOOK_SIZE + 2)
    assert (config.audio_token_id, config.audio_bos_token_id, config.audio_delay_token_id) == (251, 252, 254)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert filecmp.cmp(source / name, tmp_path / "native" / name, shallow=False), name

    boson.eval()
    generator = torch.Generator().manual_seed(1)
    text = torch.randint(1, 200, (12,), generator=generator)
    codes = torch.randint(0, tiny.CODEBOOK_SIZE + 2, (tiny.CODEBOOKS, 7), generator=generator)
    ours, theirs, _, _ = boson_and_native_logits(boson, native, text, None)
    assert ours.shape == theirs.shape == (1, 12, tiny.VOCAB)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    ours, theirs, ours_audio, theirs_audio = boson_and_native_logits(boson, native, text, codes)
    assert ours.shape == theirs.shape == (1, 12 + 7, tiny.VOCAB)
    assert ours_audio.shape == theirs_audio.shape == (7, tiny.CODEBOOKS, tiny.CODEBOOK_SIZE + 2)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    torch.testing.assert_close(theirs_audio, ours_audio, rtol=0, atol=1e-5)

    back = convert(str(tmp_path / "native"), str(tmp_path / "back"))
    assert back.returncode == 0, back.stderr
    before, after = weights(source), weights(tmp_path / "back")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    model, info = tiny.HiggsAudioModel.from_pretrained(tmp_path / "back", output_loading_info=True)
    assert not any(info.values()), info
    carried = json.loads((tmp_path / "back" / "config.json").read_text())
    original = json.loads((source / "config.json").read_text())
    for name in ("audio_in_token_idx", "audio_out_token_idx", "audio_eos_token_id", "audio_out_bos_token_id",
                 "audio_dual_ffn_layers", "audio_num_codebooks", "audio_codebook_size", "use_delay_pattern"):
        assert carried[name] == original[name], name


@pytest.mark.core
@needs_native
@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (dict(audio_dual_ffn_layers=[0]), "partial DualFFN (audio_dual_ffn_layers holds 1 of 2 layers"),
        (dict(use_audio_out_self_attention=True), "audio self-attention"),
        (dict(skip_audio_tower=False, encode_whisper_embed=True), "the Whisper tower"),
    ],
    ids=["partial-dual-ffn", "audio-self-attention", "whisper-tower"],
)
def test_refuses_a_layout_native_cannot_express_naming_it(tmp_path, overrides, named):
    source, model = boson_checkpoint(tmp_path / "boson", **overrides)
    assert len(model.state_dict()) != 33  # a real checkpoint of that layout, not the released one's 33 tensors
    done = convert(str(source), str(tmp_path / "native"))
    assert done.returncode == 1
    assert named in done.stderr and "cannot express" in done.stderr, done.stderr
    assert not (tmp_path / "native").exists()


@pytest.mark.core
@needs_native
def test_streams_a_sharded_checkpoint_into_shards(tmp_path):
    """Sharded in, sharded out, bf16 as released. The writer holds one tensor at a time by construction
    (higgs_patch/conversion/shards.py); benchmarks/convert_bench.py measures the peak."""
    source, _ = boson_checkpoint(tmp_path / "boson", max_shard_size="50KB", dtype=torch.bfloat16)
    index = json.loads((source / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    result = higgs_patch.convert(source, tmp_path / "native")
    written = sorted(p.name for p in (tmp_path / "native").glob("*.safetensors"))
    assert len(written) == len(set(index["weight_map"].values()))
    native_index = json.loads((tmp_path / "native" / "model.safetensors.index.json").read_text())
    assert set(native_index["weight_map"].values()) == set(written)
    assert native_index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                         for t in weights(tmp_path / "native").values())
    assert result.tensors == len(native_index["weight_map"])
    assert load_native(tmp_path / "native").dtype == torch.bfloat16
    for name in written:  # every output file is a valid safetensors file holding what the index says
        with safe_open(str(tmp_path / "native" / name), framework="pt") as handle:
            assert {k for k, v in native_index["weight_map"].items() if v == name} == set(handle.keys())
    higgs_patch.convert(tmp_path / "native", tmp_path / "back")
    before, after = weights(source), weights(tmp_path / "back")
    assert before.keys() == after.keys()
    assert all(before[k].dtype == after[k].dtype == torch.bfloat16 and torch.equal(before[k], after[k]) for k in before)


@pytest.mark.core
@needs_native
def test_refuses_a_non_empty_target_unless_asked(tmp_path):
    source, _ = boson_checkpoint(tmp_path / "boson")
    target = tmp_path / "native"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    (target / "model-00001-of-00009.safetensors").write_bytes(b"stale")
    done = convert(str(source), str(target))
    assert done.returncode == 1 and "is not empty" in done.stderr and "--overwrite" in done.stderr
    assert (target / "model-00001-of-00009.safetensors").read_bytes() == b"stale"
    done = convert(str(source), str(target), "--overwrite")
    assert done.returncode == 0, done.stderr
    assert (target / "notes.txt").read_text() == "mine"
    assert not (target / "model-00001-of-00009.safetensors").exists()  # no stale shard beside the new weights
    load_native(target)


@pytest.mark.core
@needs_native
def test_refuses_a_native_checkpoint_without_its_text_head(tmp_path):
    source, _ = boson_checkpoint(tmp_path / "boson")
    higgs_patch.convert(source, tmp_path / "native")
    headless = transformers.HiggsAudioV2ForConditionalGeneration.from_pretrained(tmp_path / "native")
    headless.save_pretrained(tmp_path / "headless")
    with pytest.raises(higgs_patch.ConversionError, match=r"text_lm_head\.weight.*|use_text_head=True"):
        higgs_patch.convert(tmp_path / "headless", tmp_path / "back")


@pytest.mark.core
@pytest.mark.skipif(NATIVE, reason=f"transformers {transformers.__version__} ships the native model")
def test_says_native_needs_transformers_5_3(tmp_path):
    source, _ = boson_checkpoint(tmp_path / "boson")
    done = convert(str(source), str(tmp_path / "native"))
    assert done.returncode == 1
    assert "needs transformers >= 5.3" in done.stderr and transformers.__version__ in done.stderr
    assert not (tmp_path / "native").exists()


@pytest.mark.core
@needs_native
def test_a_rename_loaded_with_strict_false_is_silently_wrong_on_partial_dual_ffn(tmp_path):
    """Why the converter refuses: the key renames alone, loaded as transformers' script loads (strict=False),
    accept a partial-DualFFN checkpoint without an error and leave layer 1's audio FFN at its random init."""
    from higgs_patch.conversion import layout

    boson = tiny.model(use_delay_pattern=True, audio_dual_ffn_layers=[0]).eval()
    config = layout.native_config(boson.config.to_dict(), {})
    native = transformers.HiggsAudioV2ForConditionalGeneration(config, use_text_head=True).eval()
    renamed = {layout.rename(k, layout.BOSON): v for k, v in boson.state_dict().items()}
    missing, unexpected = native.load_state_dict(renamed, strict=False)
    assert "model.layers.1.audio_mlp.gate_proj.weight" in missing and not unexpected
    generator = torch.Generator().manual_seed(1)
    text = torch.randint(1, 200, (12,), generator=generator)
    codes = torch.randint(0, tiny.CODEBOOK_SIZE + 2, (tiny.CODEBOOKS, 7), generator=generator)
    _, _, ours, theirs = boson_and_native_logits(boson, native, text, codes)
    assert (ours - theirs).abs().max() > 1e-3  # the audio logits are wrong, and nothing said so


@pytest.mark.core
@needs_native
def test_carries_over_the_released_rope_settings_as_its_config_json_writes_them(tmp_path):
    """The released config.json holds rope_theta and a llama3 rope_scaling (transformers 4.x's form), not 3B defaults."""
    rope = {"rope_type": "llama3", "factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
            "original_max_position_embeddings": 256}
    text = {**tiny.config().text_config.to_dict(), "rope_parameters": {**rope, "rope_theta": 500000.0}}
    source, boson = boson_checkpoint(tmp_path / "boson", text_config=text)
    config = json.loads((source / "config.json").read_text())
    del config["text_config"]["rope_parameters"]
    config["text_config"].update(rope_theta=500000.0, rope_scaling=rope)
    (source / "config.json").write_text(json.dumps(config))
    higgs_patch.convert(source, tmp_path / "native")
    native = load_native(tmp_path / "native")
    assert native.config.rope_parameters == {**rope, "rope_theta": 500000.0}
    assert_same_logits(boson.eval(), native, seed=2, vocabulary=200, tokens=40, frames=9)


@pytest.mark.core
@needs_native
def test_merges_the_halves_of_a_partially_frozen_embedding_and_text_head(tmp_path):
    """Boson trains new tokens with the embedding and text head split in two (frozen, trainable) and saves them so."""
    boson = tiny.model(use_delay_pattern=True)
    boson.freeze_llm(freeze_embed=True, freeze_embed_until_idx=200)
    boson.freeze_text_head(freeze_text_head_until_idx=200)
    boson.save_pretrained(tmp_path / "boson")
    stored = weights(tmp_path / "boson")
    assert "embed_tokens.embedding_frozen.weight" in stored and "embed_tokens.weight" not in stored
    result = higgs_patch.convert(tmp_path / "boson", tmp_path / "native")
    assert result.merged == {
        "model.embed_tokens.weight": ("embed_tokens.embedding_frozen.weight", "embed_tokens.embedding_trainable.weight"),
        "text_lm_head.weight": ("audio_decoder_proj.text_lm_head.linear_frozen.weight",
                                "audio_decoder_proj.text_lm_head.linear_trainable.weight"),
    }
    native = load_native(tmp_path / "native")
    # tokens on both sides of the split
    assert_same_logits(boson.eval(), native, seed=3, vocabulary=250, tokens=12, frames=5)


@pytest.mark.core
@needs_native
def test_refuses_what_is_not_a_convertible_checkpoint_naming_it(tmp_path):
    source, model = boson_checkpoint(tmp_path / "boson")
    refusals = {"is not a checkpoint directory": (tmp_path / "absent", tmp_path / "out1"),
                "the target is the source directory": (source, source)}
    llama = tmp_path / "llama"
    transformers.LlamaConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=2).save_pretrained(llama)
    refusals["model_type 'llama'"] = (llama, tmp_path / "out2")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_bytes((source / "config.json").read_bytes())
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    refusals["only safetensors checkpoints convert"] = (pickled, tmp_path / "out3")
    extra = tmp_path / "extra"
    model.save_pretrained(extra, state_dict={**model.state_dict(), "audio_tower.layer_norm.weight": torch.ones(4)})
    refusals["1 key(s) no rule maps: audio_tower.layer_norm.weight"] = (extra, tmp_path / "out4")
    for named, (source_dir, target_dir) in refusals.items():
        with pytest.raises(higgs_patch.ConversionError, match=re.escape(named)):
            higgs_patch.convert(source_dir, target_dir)
        assert source_dir == target_dir or not target_dir.exists(), named


@pytest.mark.core
@needs_native
def test_drops_buffers_that_are_no_weights_saying_why(tmp_path):
    """Older saves hold the rotary buffers; boson's equal codebook weights are a constant. Neither is a weight."""
    model = tiny.model(use_delay_pattern=True)
    extra = {"rotary_emb.inv_freq": model.rotary_emb.inv_freq.clone(), "audio_codebook_weights": model.audio_codebook_weights}
    model.save_pretrained(tmp_path / "boson", state_dict={**model.state_dict(), **extra})
    result = higgs_patch.convert(tmp_path / "boson", tmp_path / "native")
    assert set(result.dropped) == set(extra)
    assert "recomputed from the config's rope parameters" in result.dropped["rotary_emb.inv_freq"]
    from higgs_patch.conversion import summary

    printed = summary(result)
    assert "dropped audio_codebook_weights: a constant boson sets in __init__" in printed
    load_native(tmp_path / "native")
