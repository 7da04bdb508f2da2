"""gradient-checkpointing: both switches on every config, every decoder layer recomputed, same loss and gradients."""

from __future__ import annotations

import contextlib
import logging
import types

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments, WhisperFeatureExtractor

import higgs_patch
import tiny

import boson_multimodal.model.higgs_audio.modeling_higgs_audio as modeling

PATCH = "gradient-checkpointing"
LAYERS = 4
TEXT = {**tiny.config().text_config.to_dict(), "num_hidden_layers": LAYERS}
CONFIGS = {
    "released (DualFFN on every layer)": dict(),
    "fast-forward layers": dict(audio_dual_ffn_layers=[0, 2]),
    "dual_ffn with Llama layers": dict(audio_adapter_type="dual_ffn", audio_dual_ffn_layers=[0, 2]),
    "stack (Llama layers only)": dict(audio_adapter_type="stack"),
    "with the audio tower": dict(skip_audio_tower=False, encode_whisper_embed=True),
}
TOWER = CONFIGS["with the audio tower"]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # mlp and audio_mlp


def model(**settings) -> modeling.HiggsAudioModel:
    return tiny.model(text_config=TEXT, **settings).train()


def batch(whisper: bool = False) -> dict:
    if not whisper:
        return tiny.DictCollator(tiny.collator())(tiny.samples(2))
    processor = types.SimpleNamespace(feature_extractor=WhisperFeatureExtractor(feature_size=128))
    collator = tiny.collator(encode_whisper_embed=True, whisper_processor=processor)
    return tiny.DictCollator(collator)(tiny.samples(2, waveform_rate=16000))


@contextlib.contextmanager
def attention_calls(layers):
    """How many times each layer's self-attention ran: twice per step where the layer is recomputed in backward."""
    counts = [0] * len(layers)

    def counter(index):
        def hook(module, args):
            counts[index] += 1
        return hook

    handles = [layer.self_attn.register_forward_pre_hook(counter(i)) for i, layer in enumerate(layers)]
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


def step(net, inputs: dict) -> tuple[float, dict[str, torch.Tensor], int, list[int]]:
    """One forward + backward: loss, gradients, bytes saved for backward (distinct storages), attention calls."""
    net.zero_grad(set_to_none=True)
    storages: dict[int, int] = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with attention_calls(net.layers) as calls:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = higgs_patch.higgs_audio_loss(net(**inputs), inputs).loss
        loss.backward()
    grads = {name: p.grad.clone() for name, p in net.named_parameters() if p.grad is not None}
    return loss.item(), grads, sum(storages.values()), calls


# --- the symptom, unpatched ----------------------------------------------------------------------------


def test_unpatched_the_released_config_refuses_both_switches(tmp_path):
    net = model()
    with pytest.raises(ValueError, match="HiggsAudioModel is not compatible with gradient checkpointing"):
        net.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="not compatible with gradient checkpointing"):
        net.gradient_checkpointing_disable()
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], gradient_checkpointing=True,
                             max_steps=1, remove_unused_columns=False, disable_tqdm=True)
    with higgs_patch.applied("forward-kwargs-filter", "trainer-compute-loss"):
        trainer = Trainer(model=net, args=args, train_dataset=tiny.samples(2),
                          data_collator=tiny.DictCollator(tiny.collator()))
        with pytest.raises(ValueError, match="not compatible with gradient checkpointing"):
            trainer.train()


def test_unpatched_with_an_audio_tower_the_switch_succeeds_but_no_decoder_layer_is_checkpointed():
    net, inputs = model(**TOWER), batch(whisper=True)
    with higgs_patch.applied("forward-kwargs-filter"):
        net.gradient_checkpointing_enable()
        assert net.audio_tower.gradient_checkpointing and net.is_gradient_checkpointing
        with attention_calls(net.audio_tower.layers) as encoder_calls:
            calls = step(net, inputs)[3]
    assert encoder_calls == [2]  # the Whisper encoder is recomputed in backward
    assert calls == [1] * LAYERS  # the decoder is not


# --- the fix -----------------------------------------------------------------------------------------------


@pytest.mark.core
@pytest.mark.parametrize("reentrant", [True, False], ids=["use_reentrant=True", "use_reentrant=False"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_every_decoder_layer_is_recomputed_with_the_same_loss_and_gradients(config, reentrant):
    net, inputs = model(**CONFIGS[config]), batch(whisper=CONFIGS[config] is TOWER)
    with higgs_patch.applied():
        plain_loss, plain_grads, plain_bytes, plain_calls = step(net, inputs)
        kwargs = None if reentrant else {"use_reentrant": False}  # None: transformers' default, reentrant
        net.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        assert net.is_gradient_checkpointing and net.gradient_checkpointing
        if net.audio_tower is not None:
            assert net.audio_tower.gradient_checkpointing  # the encoder keeps its own
        loss, grads, saved, calls = step(net, inputs)
        net.gradient_checkpointing_disable()
        assert not net.is_gradient_checkpointing
        assert step(net, inputs)[3] == plain_calls

    assert plain_calls == [1] * LAYERS and calls == [2] * LAYERS
    assert loss == pytest.approx(plain_loss, rel=1e-6)
    assert grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert saved * 3 < plain_bytes  # 3.9x with the Whisper encoder (its features dominate), 7 to 8x without


@pytest.mark.core
def test_the_trainer_switch_recomputes_the_layers_and_logs_the_losses_of_a_plain_run(tmp_path):
    def train(checkpointing: bool):
        net = model()
        args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no", seed=0,
                                 remove_unused_columns=False, disable_tqdm=True, logging_steps=1, max_steps=3,
                                 per_device_train_batch_size=2, gradient_checkpointing=checkpointing)
        trainer = Trainer(model=net, args=args, train_dataset=tiny.samples(6),
                          data_collator=tiny.DictCollator(tiny.collator()))
        with higgs_patch.applied(), attention_calls(net.layers) as calls:
            trainer.train()
        return [h["loss"] for h in trainer.state.log_history if "loss" in h], calls

    plain, plain_calls = train(False)
    checkpointed, calls = train(True)
    assert plain_calls == [3] * LAYERS and calls == [6] * LAYERS
    assert checkpointed == pytest.approx(plain, abs=2e-4)  # the logs are rounded to 4 decimals


@pytest.mark.core
@pytest.mark.parametrize("kwargs", [None, {"use_reentrant": False}], ids=["trainer default (reentrant)", "non-reentrant"])
def test_lora_adapters_in_checkpointed_layers_train_under_the_trainer(tmp_path, kwargs):
    """The trap: frozen embeddings give the first layer an input without grad; reentrant checkpointing then
    gives its adapters (and, through the chain, every layer's) no gradient, silently."""
    net = get_peft_model(model(), LoraConfig(r=4, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    adapters = {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}
    assert any("audio_mlp" in n for n in adapters) and all("lora_" in n for n in adapters)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no", seed=0,
                             remove_unused_columns=False, disable_tqdm=True, logging_steps=1, num_train_epochs=4,
                             per_device_train_batch_size=2, learning_rate=1e-2, gradient_checkpointing=True,
                             gradient_checkpointing_kwargs=kwargs)
    trainer = Trainer(model=net, args=args, train_dataset=tiny.samples(8),
                      data_collator=tiny.DictCollator(tiny.collator()))
    with higgs_patch.applied(), attention_calls(net.base_model.model.layers) as calls:
        trainer.train()
    assert calls == [2 * 16] * LAYERS
    params = dict(net.named_parameters())
    untrained = [n for n, value in adapters.items() if "lora_B" in n and torch.equal(params[n], value)]
    assert not untrained  # lora_B starts at zero: every one that moved received a gradient
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert sum(losses[-4:]) < sum(losses[:4])


def test_use_cache_is_turned_off_while_checkpointing_in_training_and_left_alone_otherwise(patch_log, monkeypatch):
    from higgs_patch.fixes import gradient_checkpointing

    monkeypatch.setattr(gradient_checkpointing, "_warned_cache", False)  # as in a fresh process
    net, inputs = model(), batch()
    with higgs_patch.applied():
        net.gradient_checkpointing_enable()
        for _ in range(2):
            with attention_calls(net.layers) as calls:
                outputs = net(**inputs, use_cache=True)
                higgs_patch.higgs_audio_loss(outputs, inputs).loss.backward()
            assert outputs.past_key_values.get_seq_length() == 0 and calls == [2] * LAYERS
        net.eval()
        with torch.no_grad():
            cached = net(**inputs, use_cache=True)
            assert cached.past_key_values.get_seq_length() == cached.expanded_input_ids.shape[1]
        net.train()
        with pytest.raises(ValueError, match="cannot continue a key/value cache that already holds"):
            net(**inputs, past_key_values=cached.past_key_values)
    warnings = [r for r in patch_log.records if "(checkpointing-disables-cache)" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING  # once per process, for two steps


@pytest.mark.parametrize("mode", ["eval", "train under no_grad"])
def test_inference_is_upstreams_while_checkpointing_is_on(mode):
    net, inputs = model(), batch()
    net.train(mode != "eval")
    with torch.no_grad(), higgs_patch.applied("forward-kwargs-filter"):
        expected = net(**inputs)
        with higgs_patch.applied(PATCH):
            net.gradient_checkpointing_enable()
            with attention_calls(net.layers) as calls:
                got = net(**inputs)
    assert calls == [1] * LAYERS
    for key in ("logits", "audio_logits", "expanded_labels"):
        assert torch.equal(got[key], expected[key]), key


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config).train()


def test_other_llama_models_are_not_checkpointed_and_keep_their_own_switch():
    llama, ids = tiny_llama(), torch.randint(0, 64, (2, 12))
    higgs, inputs = model(audio_adapter_type="stack"), batch()

    def llama_calls(llama) -> list[int]:
        with attention_calls(llama.model.layers) as calls:
            llama(input_ids=ids, labels=ids).loss.backward()
        return calls

    # what transformers' own checkpointing does to a llama, unpatched: [2, 2] on 4.x, where a recomputed layer
    # runs its attention again; [1, 1] on 5.x (measured on 5.25), where the pre-hook sees one call per layer
    unpatched = tiny_llama()
    unpatched.gradient_checkpointing_enable()
    own = llama_calls(unpatched)
    with higgs_patch.applied():
        higgs.gradient_checkpointing_enable()
        assert step(higgs, inputs)[3] == [2] * LAYERS
        assert llama_calls(llama) == [1, 1]
        llama.gradient_checkpointing_enable()
        assert llama_calls(llama) == own  # its own checkpointing, once, not ours on top


def test_revert_restores_upstream():
    Model = modeling.HiggsAudioModel
    inherited = ("_set_gradient_checkpointing", "enable_input_require_grads")
    with higgs_patch.applied(PATCH):
        assert all(name in vars(Model) for name in inherited)
        checkpointed = model()
        checkpointed.gradient_checkpointing_enable()
    assert not any(name in vars(Model) for name in inherited)  # inherited from transformers again
    with pytest.raises(ValueError, match="not compatible with gradient checkpointing"):
        model().gradient_checkpointing_enable()
    with higgs_patch.applied("forward-kwargs-filter"):
        assert step(checkpointed, batch())[3] == [1] * LAYERS  # a model switched on before: no longer recomputed


def test_peft_wrapping_a_model_that_already_checkpoints_finds_the_text_embeddings():
    net, inputs = model(), batch()
    # upstream, what PEFT calls when checkpointing is already on: 4.x cannot find the text embeddings (raises);
    # 5.x finds them itself (its default input-embeddings lookup), so only the plugin's path is tested there
    if int(transformers.__version__.split(".")[0]) < 5:
        with pytest.raises(NotImplementedError):
            net.enable_input_require_grads()
    else:
        net.enable_input_require_grads()
        assert net.embed_tokens._forward_hooks
        net.disable_input_require_grads()
    with higgs_patch.applied():
        net.gradient_checkpointing_enable()
        wrapped = get_peft_model(net, LoraConfig(r=4, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
        assert net.embed_tokens(torch.tensor([1])).requires_grad
        wrapped.zero_grad()
        with attention_calls(net.layers) as calls:
            higgs_patch.higgs_audio_loss(wrapped(**inputs), inputs).loss.backward()
    assert calls == [2] * LAYERS
    adapters = {n: p.grad for n, p in wrapped.named_parameters() if "lora_B" in n}
    assert adapters and all(grad is not None and grad.abs().sum() > 0 for grad in adapters.values())


# --- any order relative to apply() and revert() ---------------------------------------------------------


def test_switched_on_before_apply_the_decoder_is_recomputed_after_apply():
    """A config with an audio tower: upstream's switch succeeds before apply(); after it, the decoder follows."""
    net, inputs = model(**TOWER), batch(whisper=True)
    net.gradient_checkpointing_enable({"use_reentrant": False})
    assert net.is_gradient_checkpointing
    with higgs_patch.applied():
        plain = model(**TOWER)
        plain.load_state_dict(net.state_dict())
        plain_loss, plain_grads, _, plain_calls = step(plain, inputs)
        loss, grads, _, calls = step(net, inputs)
        net.gradient_checkpointing_disable()
        assert not net.is_gradient_checkpointing and step(net, inputs)[3] == [1] * LAYERS
    assert plain_calls == [1] * LAYERS and calls == [2] * LAYERS
    assert loss == pytest.approx(plain_loss, rel=1e-6)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_switched_on_then_reverted_then_applied_again_the_decoder_is_recomputed():
    net, inputs = model(), batch()
    with higgs_patch.applied():
        net.gradient_checkpointing_enable()
    with higgs_patch.applied():
        assert step(net, inputs)[3] == [2] * LAYERS


def test_revert_while_switched_on_says_the_decoder_is_no_longer_recomputed(patch_log):
    net = model()
    with higgs_patch.applied():
        net.gradient_checkpointing_enable()
        patch_log.clear()
    told = [r.getMessage() for r in patch_log.records if "(checkpointing-reverted)" in r.getMessage()]
    assert len(told) == 1 and "gradient_checkpointing_disable()" in told[0] and "1 model" in told[0]
    with higgs_patch.applied():
        net.gradient_checkpointing_disable()
        patch_log.clear()
    assert not [r for r in patch_log.records if "(checkpointing-reverted)" in r.getMessage()]
