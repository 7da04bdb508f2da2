"""The whole loop a fine-tune runs, from a shell, with boson's own audio side: tests/audio_loop.py's three steps.

wav -> boson's audio tokenizer (``HiggsAudioTokenizer`` built from its constructor, random weights, a small
local HuBERT where it fetches ``bosonai/hubert_base``) -> ``prepare_chatml_sample`` -> ``ChatMLDatasetSample``
-> boson's collator -> Trainer LoRA (gradient accumulation 2, bf16) -> merge -> save ->
``HiggsAudioServeEngine(model_dir, audio_tokenizer_dir, device="cpu").generate`` three times on one engine
(plain TTS, voice clone, plain TTS) -> wav through soundfile. Each step is a fresh interpreter that applies
the plugin first, as a user's script does; nothing is applied beforehand and nothing is downloaded.

Reproduced unpatched: on transformers >= 4.56 the second generate() on one engine raises
``Inplace update to inference tensor outside InferenceMode`` without ``cache-reset-inference-mode``; the
collator fix's ``TypeError`` on the engine's samples is reproduced in tests/test_serve_samples.py (every line).
On 4.46 the engine's tokens with the plugin equal the unpatched engine's.

Boson's audio tokenizer imports torchaudio, ``dac`` (descript-audio-codec), vector_quantize_pytorch, einops
and omegaconf. torchaudio has no release for torch >= 2.12, so these run on the torch 2.9.1 + torchaudio
2.9.1 lines of compat/matrix.toml (suite ``audio``) and skip elsewhere, saying what is missing.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import transformers
from packaging.version import Version

import needed

pytestmark = pytest.mark.audio

AUDIO_STACK = ("torchaudio", "dac", "vector_quantize_pytorch", "einops", "omegaconf", "soundfile")
SCRIPT = Path(__file__).with_name("audio_loop.py")
SHIM = "cache-reset-inference-mode"


def _missing_audio_stack() -> str | None:
    for name in AUDIO_STACK:
        try:
            importlib.import_module(name)
        except Exception as exc:  # an installed torchaudio built for another torch fails with OSError
            return f"{name} ({type(exc).__name__}: {exc})"[:300]
    return None


MISSING = _missing_audio_stack()
if MISSING:
    pytest.skip(
        f"boson's audio tokenizer cannot be built here: {MISSING} is not importable. torchaudio has no release "
        "for torch >= 2.12: the torch 2.9.1 + torchaudio 2.9.1 lines of compat/matrix.toml run these",
        allow_module_level=True,
    )


def run_step(root: Path, *args: str) -> subprocess.CompletedProcess:
    """One step of the loop as a user runs a script: a fresh interpreter, in ``root``, offline."""
    env = {k: v for k, v in os.environ.items() if k != "HIGGS_PATCH_ACTIVATE"}
    env.update(HF_HUB_OFFLINE="1", PYTHONSAFEPATH="1")
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=root, env=env, capture_output=True, text=True,
                          timeout=900)


def ok(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """build, then train: the merged model saved under ``root/model``."""
    root = tmp_path_factory.mktemp("loop")
    ok(run_step(root, "build", str(root)))
    ok(run_step(root, "train", str(root)))
    return root


@pytest.fixture(scope="module")
def served(trained) -> list[dict]:
    ok(run_step(trained, "serve", str(trained), "patched.json"))
    return json.loads((trained / "patched.json").read_text())


def tokens(results: list[dict]) -> list[tuple]:
    return [(r["request"], r["text_tokens"], r["audio_tokens"]) for r in results]


def test_the_tokenizer_and_the_trainer_ran_on_the_audio_tokenizers_codes(trained):
    config = json.loads((trained / "audio_tokenizer" / "config.json").read_text())
    train = json.loads((trained / "train.json").read_text())
    assert len(train["losses"]) == 2  # max_steps=2 optimizer steps, each of 2 accumulated micro-batches
    assert all(math.isfinite(loss) and loss > 0 for loss in train["losses"])
    assert config["sample_rate"] == 24000 and (trained / "model" / "model.safetensors").is_file()


def test_the_engine_generates_three_times_on_one_engine_plain_tts_and_voice_clone_to_wav(served):
    import soundfile

    assert [r["request"] for r in served] == ["plain", "clone", "plain"]
    for result in served:
        wave, rate = soundfile.read(result["wav"])
        assert rate == result["sampling_rate"] == 24000
        assert wave.ndim == 1 and wave.shape[0] == result["samples"] > 0
        codes = result["audio_tokens"]
        assert len(codes) == 4 and len(codes[0]) > 4  # 4 codebooks, the delay pattern's frames and more


@pytest.mark.skipif(Version(transformers.__version__) >= Version("4.48"),
                    reason="unpatched boson_multimodal imports only on transformers < 4.48 (its line is 4.46)")
def test_on_4_46_the_engines_tokens_equal_the_unpatched_engines(trained, served):
    ok(run_step(trained, "serve", str(trained), "unpatched.json", "--unpatched"))
    assert tokens(served) == tokens(json.loads((trained / "unpatched.json").read_text()))


def test_without_the_cache_reset_shim_the_second_generate_fails_where_it_is_needed(trained):
    if SHIM not in needed.shims():
        pytest.skip(f"{SHIM} serves transformers >= 4.56; this is {transformers.__version__}")
    done = run_step(trained, "serve", str(trained), "reverted.json", "--revert", SHIM)
    assert done.returncode != 0
    assert "Inplace update to inference tensor outside InferenceMode" in done.stderr
    assert "_prepare_kv_caches" in done.stderr
