"""The built-in tiny model is the released architecture, shrunk: DualFFN on every decoder layer."""

from boson_multimodal.model.higgs_audio.modeling_higgs_audio import HiggsAudioDualFFNDecoderLayer

import tiny


def test_the_tiny_model_has_a_dualffn_decoder_layer_everywhere_as_released():
    model = tiny.model()
    assert model.config.audio_adapter_type == "dual_ffn_fast_forward"
    assert len(model.layers) == model.config.text_config.num_hidden_layers
    assert all(isinstance(layer, HiggsAudioDualFFNDecoderLayer) for layer in model.layers)


def test_more_layers_are_dualffn_too_and_the_stack_adapter_is_not():
    deeper = tiny.model(text_config={**tiny.config().text_config.to_dict(), "num_hidden_layers": 3})
    assert [type(layer) for layer in deeper.layers] == [HiggsAudioDualFFNDecoderLayer] * 3
    stack = tiny.model(audio_adapter_type="stack")
    assert not any(isinstance(layer, HiggsAudioDualFFNDecoderLayer) for layer in stack.layers)


def test_the_stack_adapter_trains_under_the_patches_too(tmp_path):
    """Upstream's default adapter builds other layers; the patches do not depend on which."""
    import math

    from transformers import Trainer, TrainingArguments

    import higgs_patch

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no",
                             remove_unused_columns=False, disable_tqdm=True, max_steps=8, logging_steps=1,
                             per_device_train_batch_size=2, learning_rate=3e-3, gradient_accumulation_steps=2)
    with higgs_patch.applied():
        trainer = Trainer(model=tiny.model(audio_adapter_type="stack"), args=args, train_dataset=tiny.samples(8),
                          data_collator=tiny.DictCollator(tiny.collator()))
        trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) < sum(losses[:3])
