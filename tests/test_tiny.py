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
