"""The transformers-line shims on the real upstream: each reproduces its breakage on its line and removes it;
off its line it is not needed. Every line runs these (marker ``core``); what a line needs is read from
the declarations, what breaks is measured here.

The references are 4.46.3's (the line boson_multimodal was written for): measured there by these very
tests, which on 4.46.3 compute them instead of trusting them.
"""

from __future__ import annotations

import collections
import copy
import importlib.metadata
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from packaging.version import Version
from transformers.cache_utils import StaticCache

import higgs_patch
import needed
import tiny
from higgs_patch import engine
from higgs_patch.commands import learnability

pytestmark = pytest.mark.core

SHIMS = needed.every_shim()
MAIN_LINE = Version(transformers.__version__) < Version("4.47")

# 4.46.3, measured: the tiny model's loss on tiny.samples(4), and which attention ran (SDPA calls per forward).
LAYOUTS = {
    "released (DualFFN on every layer)": (dict(), 4.574372, 2),
    "stack (Llama layers only)": (dict(audio_adapter_type="stack"), 4.523819, 0),
    "dual_ffn with a Llama layer": (dict(audio_adapter_type="dual_ffn", audio_dual_ffn_layers=[1]), 4.554214, 1),
}
ATTENTION_CLASSES = {  # 4.46.3: the text attention class of each layer (plain Llama layers ran eager there)
    "released (DualFFN on every layer)": ["LlamaSdpaAttention", "LlamaSdpaAttention"],
    "stack (Llama layers only)": ["LlamaAttention", "LlamaAttention"],
    "dual_ffn with a Llama layer": ["LlamaAttention", "LlamaSdpaAttention"],
}


def run_python(code: str, inherit: bool = False) -> subprocess.CompletedProcess:
    """A fresh interpreter; without ``inherit``, without what this process publishes to its children."""
    env = dict(os.environ) if inherit else {k: v for k, v in os.environ.items() if k != "HIGGS_PATCH_ACTIVATE"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                          env=env)


# --- needed on its lines, not needed elsewhere --------------------------------------------------------------


@pytest.mark.parametrize("shim", SHIMS)
def test_a_shim_applies_on_its_lines_and_is_not_needed_elsewhere_where_it_touches_nothing(shim):
    declaration = engine.known()[shim]
    installed = {d: importlib.metadata.version(d) for line in declaration.serves for d in line}
    on_line = any(all(installed[d] in spec for d, spec in line.items()) for line in declaration.serves)
    higgs_patch.revert(shim)
    (status,) = higgs_patch.apply(shim)
    if on_line:
        assert status.state == "applied", status.reason
        assert shim in os.environ["HIGGS_PATCH_ACTIVATE"]  # children apply it too
        return
    assert status.state == "not-needed" and "not needed here: it serves" in status.reason
    assert f"transformers {transformers.__version__}" in status.reason
    assert shim not in os.environ.get("HIGGS_PATCH_ACTIVATE", "")  # nothing for children to do either
    assert higgs_patch.revert(shim)[0].state == "not-applied"


def test_a_bare_apply_on_the_main_line_passes_over_every_shim():
    if not MAIN_LINE:
        pytest.skip("the main line's behaviour")
    states = {s.id: s.state for s in higgs_patch.apply(*SHIMS)}
    assert set(states.values()) == {"not-needed"}


# --- the import: apply() first, as users must from 4.48 -----------------------------------------------------


def test_boson_imports_unpatched_only_where_no_shim_must_precede_it_and_with_apply_first_everywhere():
    first = [pid for pid in needed.shims() if engine.known()[pid].before_import]
    unpatched = run_python("import boson_multimodal.model.higgs_audio.modeling_higgs_audio")
    if first:
        assert unpatched.returncode != 0
        assert "ImportError" in unpatched.stderr or "ModuleNotFoundError" in unpatched.stderr
    else:
        assert unpatched.returncode == 0, unpatched.stderr
    apply_first = f"higgs_patch.apply(*{needed.shims()!r})" if needed.shims() else "pass  # none needed here"
    patched = run_python(
        f"""
        import higgs_patch
        {apply_first}
        import boson_multimodal.model.higgs_audio.modeling_higgs_audio
        print("imported")
        """
    )
    assert patched.returncode == 0, patched.stderr
    assert patched.stdout.split() == ["imported"]
    assert "(applied-after-import)" not in patched.stderr
    child = run_python(  # a child of this process applies what it publishes at start-up, before its first import
        """
        import boson_multimodal.model.higgs_audio.modeling_higgs_audio, higgs_patch
        print(sorted(s.id for s in higgs_patch.status() if s.state == "applied"))
        """,
        inherit=True,
    )
    assert child.returncode == 0, child.stderr
    assert child.stdout.strip() == repr(sorted(needed.shims()))


def test_a_refusal_in_the_call_says_which_shims_boson_needs_before_its_import(monkeypatch):
    import dataclasses

    from packaging.specifiers import SpecifierSet

    first = [pid for pid in needed.shims() if engine.known()[pid].before_import]
    if not first:
        pytest.skip("no shim must precede boson's import on this line")
    higgs_patch.revert()
    broken = dataclasses.replace(engine.known()["forward-kwargs-filter"], requires={"transformers": SpecifierSet("<4")})
    monkeypatch.setitem(engine.known(), "forward-kwargs-filter", broken)
    with pytest.raises(higgs_patch.IncompatibleUpstreamError) as caught:
        higgs_patch.apply(*first, "forward-kwargs-filter")
    message = str(caught.value)
    assert "cannot be imported here without" in message and "apply them first, before importing it" in message
    assert all(repr(pid) in message for pid in first)
    assert all(s.state != "applied" for s in higgs_patch.status())  # atomic: nothing of the call stays


# --- the model: the same loss as 4.46.3, the same attention -------------------------------------------------


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_the_tiny_model_trains_with_4_46s_loss_and_attention(layout, monkeypatch):
    settings, reference, sdpa_calls = LAYOUTS[layout]
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    with higgs_patch.applied("forward-kwargs-filter", "model-loss"):
        model = tiny.model(**settings)
        batch = tiny.DictCollator(tiny.collator())(tiny.samples(4))
        loss = model(**batch).loss
    assert loss.item() == pytest.approx(reference, rel=1e-6), f"4.46.3 gave {reference}"
    assert len(calls) == sdpa_calls  # SDPA where 4.46 ran it, eager where it ran eager
    assert [type(layer.self_attn).__name__ for layer in model.layers] == ATTENTION_CLASSES[layout]


@pytest.mark.parametrize("layout", ["stack (Llama layers only)", "dual_ffn with a Llama layer"])
def test_llama_layers_keep_every_batch_row(layout):
    """From 4.54 a Llama layer returns a bare tensor, and boson's layer_outputs[0] is then batch row 0."""
    settings = LAYOUTS[layout][0]
    model = tiny.model(**settings).eval()
    samples = tiny.samples(2)
    with higgs_patch.applied("forward-kwargs-filter"), torch.no_grad():
        both = model(**tiny.DictCollator(tiny.collator())(samples)).logits
        alone = model(**tiny.DictCollator(tiny.collator())(samples[1:])).logits
        torch.testing.assert_close(both[1], alone[0], rtol=1e-5, atol=1e-5)
        if "llama-layer-outputs" in needed.shims():
            higgs_patch.revert("llama-layer-outputs")
            try:
                broken = model(**tiny.DictCollator(tiny.collator())(samples)).logits
            except RuntimeError:  # the collapsed hidden states may not even fit the next layer
                broken = None
            finally:
                higgs_patch.apply("llama-layer-outputs")
            assert broken is None or broken.shape != both.shape or not torch.allclose(broken[1], both[1])


def test_plain_llama_layers_get_an_attention_implementation():
    """From 4.54 the text config's unset implementation is None: KeyError in the Llama layers (until transformers
    itself fell back to eager for None, in 5.x); with the shim they run eager, as before 4.54."""
    if "text-config-attention" not in needed.shims():
        pytest.skip("the text config's unset implementation reads as eager on this line")
    batch = tiny.DictCollator(tiny.collator(), with_labels=False)(tiny.samples(1))
    with torch.no_grad():
        model = tiny.model(audio_adapter_type="stack").eval()
        assert model.config.text_config._attn_implementation == "eager"
        expected = model(**batch).logits
        higgs_patch.revert("text-config-attention")
        try:
            unpatched = tiny.model(audio_adapter_type="stack").eval()
            assert unpatched.config.text_config._attn_implementation is None
            try:
                got = unpatched(**batch).logits
            except KeyError as exc:
                assert exc.args == (None,)
            else:
                torch.testing.assert_close(got, expected)  # this transformers reads None as eager itself
        finally:
            higgs_patch.apply("text-config-attention")


def test_the_audio_tower_computes_4_46s_loss():
    """The Whisper path (skip_audio_tower=False): from 5.0 boson's encoder calls its layers as 4.46 did."""
    import types

    from transformers import WhisperFeatureExtractor

    processor = types.SimpleNamespace(feature_extractor=WhisperFeatureExtractor(feature_size=128))
    collate = tiny.DictCollator(tiny.collator(encode_whisper_embed=True, whisper_processor=processor))
    batch = collate(tiny.samples(2, waveform_rate=16000))
    with higgs_patch.applied("forward-kwargs-filter", "model-loss"):
        model = tiny.model(skip_audio_tower=False, encode_whisper_embed=True)
        assert model(**batch).loss.item() == pytest.approx(4.543644, rel=1e-6)  # 4.46.3's
        if "whisper-layer-calls" in needed.shims():
            higgs_patch.revert("whisper-layer-calls")
            try:
                with pytest.raises((TypeError, RuntimeError)):
                    model(**batch)
            finally:
                higgs_patch.apply("whisper-layer-calls")


def test_from_pretrained_gives_the_saved_models_rotary_frequencies_and_logits(tmp_path):
    model = tiny.model().eval()
    model.save_pretrained(str(tmp_path))
    loaded = tiny.HiggsAudioModel.from_pretrained(str(tmp_path)).eval()
    for name, buffer in model.named_buffers():
        assert torch.equal(dict(loaded.named_buffers())[name], buffer), name
    batch = tiny.DictCollator(tiny.collator(), with_labels=False)(tiny.samples(2))
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)


def test_boson_initialises_no_rotary_frequencies_itself_and_the_shim_computes_them():
    """The cause, deterministic (what from_pretrained leaves is whatever memory it got): boson's _init_weights
    leaves a rotary embedding's buffers as they are; transformers >= 5.0 fills those through it on load."""
    model = tiny.model()
    rotary = model.rotary_emb
    expected = rotary.inv_freq.clone()
    served = "rotary-buffers-on-load" in needed.shims()
    if served:
        higgs_patch.revert("rotary-buffers-on-load")
    try:
        rotary.inv_freq.fill_(float("nan")), rotary.original_inv_freq.fill_(float("nan"))
        model._init_weights(rotary)
        assert rotary.inv_freq.isnan().all() and rotary.original_inv_freq.isnan().all()
    finally:
        if served:
            higgs_patch.apply("rotary-buffers-on-load")
    if not served:
        return  # this transformers computes them in the constructor, on load too (the test above)
    model._init_weights(rotary)
    assert torch.equal(rotary.inv_freq, expected) and torch.equal(rotary.original_inv_freq, expected)


# --- generation: each shim's breakage, and the cache buckets --------------------------------------------------


def prompt_inputs() -> dict:
    prompt = learnability.collator(round_to=1)([learnability.examples(1)[0].prompt])
    inputs = tiny.fields(prompt)
    inputs.pop("label_ids"), inputs.pop("label_audio_ids")
    return inputs


def bucket_caches(model, buckets: str) -> collections.OrderedDict:
    """Static caches built as the serve engine builds its own: one bucket or two (the first outgrown)."""
    inputs = prompt_inputs()
    config = copy.deepcopy(model.config.text_config)
    config.num_hidden_layers += len(model.config.audio_dual_ffn_layers)
    length = inputs["input_ids"].shape[1] + inputs["audio_in_ids"].shape[1]
    sizes = [length + 2, length + 40] if buckets == "two" else [length + 40]
    return collections.OrderedDict(
        (size, StaticCache(config=config, max_batch_size=1, max_cache_len=size, device="cpu", dtype=torch.float32))
        for size in sizes
    )


def generate(model, buckets: str, caches: collections.OrderedDict | None = None, label_ids: bool = False):
    """Greedy generation from a learnability prompt, with one static cache bucket or two (the first outgrown);
    with ``label_ids``, a label for every prompt token is passed too."""
    inputs = prompt_inputs()
    if label_ids:
        inputs["label_ids"] = inputs["input_ids"].clone()
    caches = caches if caches is not None else bucket_caches(model, buckets)
    return model.generate(**inputs, max_new_tokens=6, use_cache=True, do_sample=False, past_key_values_buckets=caches,
                          ras_win_len=None, eos_token_id=learnability.EOT, pad_token_id=tiny.PAD)


# Untrained weights: with seed 0 the model's first greedy tokens on the learnability prompt open <|AUDIO_OUT|>
# without <|audio_out_bos|>, which boson's generate cannot take (IndexError in merge_input_ids_with_audio_features).
GENERATION_SEED = 1

GENERATION_BREAKS = {  # what generate() raises on the shim's line without it
    "unfinished-sequences-arguments": (TypeError, "unexpected keyword argument 'cur_len'"),
    "cache-max-length": (AttributeError, "get_max_length"),
    "generation-kwargs": (AttributeError, "generation_kwargs"),
    "cache-bucket-copy": (AttributeError, "key_cache"),
    "sample-streamer": (TypeError, "streamer"),
    "generation-attention-mask": (AttributeError, "'NoneType' object has no attribute"),
    "cache-max-cache-shape": (AttributeError, "get_max_cache_shape"),
    "sample-cache-keyword": (TypeError, "unexpected keyword argument 'cache'"),
}


@pytest.mark.parametrize("shim", list(GENERATION_BREAKS))
def test_generate_breaks_without_the_shim_on_its_line_and_not_with_it(shim):
    model = tiny.model(seed=GENERATION_SEED, use_delay_pattern=True).eval()
    sequences, audio = generate(model, "two")
    assert sequences.shape[0] == 1 and sequences.shape[1] > learnability.examples(1)[0].prompt.input_ids.shape[0]
    if shim not in needed.shims():
        return
    error, text = GENERATION_BREAKS[shim]
    higgs_patch.revert(shim)
    try:
        with pytest.raises(error, match=text):
            generate(model, "two")
    finally:
        higgs_patch.apply(shim)


def test_moving_to_the_next_cache_bucket_generates_what_one_large_bucket_does():
    model = tiny.model(seed=GENERATION_SEED, use_delay_pattern=True).eval()
    one_sequences, one_audio = generate(model, "one")
    two_sequences, two_audio = generate(model, "two")
    assert torch.equal(one_sequences, two_sequences)
    assert len(one_audio) == len(two_audio) and all(torch.equal(a, b) for a, b in zip(one_audio, two_audio))


def reset_as_the_serve_engine_does(caches) -> None:
    """``HiggsAudioServeEngine.generate``: ``_prepare_kv_caches`` (every cache ``reset()``) under ``no_grad``."""
    with torch.no_grad():
        for cache in caches.values():
            cache.reset()


def test_the_serve_engines_caches_reset_between_generations_and_generate_as_fresh_ones():
    """One engine keeps its caches: each generate() resets them first, the second after boson's generate filled them."""
    model = tiny.model(seed=GENERATION_SEED, use_delay_pattern=True).eval()
    fresh_sequences, fresh_audio = generate(model, "two")
    caches = bucket_caches(model, "two")
    for _ in range(3):
        reset_as_the_serve_engine_does(caches)
        sequences, audio = generate(model, "two", caches)
        assert torch.equal(sequences, fresh_sequences)
        assert len(audio) == len(fresh_audio) and all(torch.equal(a, b) for a, b in zip(audio, fresh_audio))
    shim = "cache-reset-inference-mode"
    if shim not in needed.shims():
        return  # before 4.56 the caches are allocated when built, as normal tensors
    higgs_patch.revert(shim)
    try:
        with pytest.raises(RuntimeError, match="Inplace update to inference tensor outside InferenceMode"):
            reset_as_the_serve_engine_does(caches)
    finally:
        higgs_patch.apply(shim)


def test_a_reset_outside_inference_mode_makes_no_inference_tensor():
    """A cache filled outside inference mode resets as it did: nothing of it becomes an inference tensor."""
    model = tiny.model(seed=GENERATION_SEED, use_delay_pattern=True).eval()
    caches = bucket_caches(model, "one")
    with torch.no_grad():
        model(**{k: v for k, v in prompt_inputs().items() if k in ("input_ids", "attention_mask", "audio_in_ids",
                 "audio_in_ids_start")}, past_key_values=next(iter(caches.values())), use_cache=True)
    reset_as_the_serve_engine_does(caches)
    layers = getattr(next(iter(caches.values())), "layers", None) or [next(iter(caches.values()))]
    tensors = [t for layer in layers for t in vars(layer).values() if isinstance(t, torch.Tensor)]
    tensors += [t for layer in layers for name in ("key_cache", "value_cache") for t in getattr(layer, name, [])]
    assert tensors and not any(t.is_inference() for t in tensors)


# --- doctor ------------------------------------------------------------------------------------------------------


def test_doctor_is_all_good_here_and_says_the_order_of_import():
    done = subprocess.run([sys.executable, "-m", "higgs_patch", "doctor", "--json"], capture_output=True, text=True,
                          timeout=600, env={k: v for k, v in os.environ.items() if k != "HIGGS_PATCH_ACTIVATE"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    import json

    report = json.loads(done.stdout)
    assert report["ok"] and report["counts"]["fail"] == 0
    checks = {c["name"]: c for c in report["checks"]}
    first = [pid for pid in needed.shims() if engine.known()[pid].before_import]
    order = checks["import order"]
    assert order["level"] == "ok"
    if first:
        assert all(pid in order["detail"] for pid in first) and "without them: " in order["detail"]
        assert "apply() before anything imports boson_multimodal" in order["fix"]
    assert checks["tested line"]["level"] == "ok"
    patches = {p["id"]: p for p in report["patches"]}
    assert {pid for pid, p in patches.items() if not p["needed"]} == needed.not_needed()
    assert all(p["dry_run"] in ("ok", "skipped") for p in patches.values())
