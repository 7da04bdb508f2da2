"""The whole loop a fine-tune runs, as a user's script: run by tests/test_audio_loop.py in a fresh interpreter.

    python audio_loop.py build DIR            # a wav, a text tokenizer, a local HuBERT, boson's audio tokenizer
    python audio_loop.py train DIR            # wav -> audio tokenizer -> prepare_chatml_sample -> collator ->
                                              # Trainer LoRA (GA 2, bf16) -> merge -> save DIR/model
    python audio_loop.py serve DIR OUT.json   # HiggsAudioServeEngine(DIR/model, DIR/audio_tokenizer): 3 generations
                                              # on one engine (plain TTS, voice clone, plain TTS) -> wavs, tokens

Each step applies the plugin first (``higgs_patch.apply()``, as the README says) unless ``--unpatched``
(nothing applied) or ``--revert ID`` (everything but one patch, to reproduce what it fixes).
Run with DIR as the working directory and ``HF_HUB_OFFLINE=1``: boson's audio tokenizer fetches its
semantic model by name (``AutoModel.from_pretrained("bosonai/hubert_base")``); ``build`` saves a small
random ``HubertModel`` (hidden size 768, as boson's code needs) at that relative path, which
transformers loads as a local directory. Nothing is downloaded. Every weight is random: the loop is
checked for running end to end and for what it computes, not for speech.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SPECIALS = [  # boson's 13 special tokens (design.md), ids 0 to 12 in the tokenizer built here
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "<|eom_id|>", "<|recipient|>", "<|audio_bos|>", "<|audio_eos|>", "<|audio_out_bos|>", "<|AUDIO|>",
    "<|AUDIO_OUT|>", "<|finetune_right_pad_id|>",
]
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.", "Generate audio following instruction.",
    "A tiny model speaks with random weights.", "assistant", "user", "system", "Hello there, how are you today?",
]
VOCAB = 320
SAMPLE_RATE = 24000  # boson's released audio tokenizer: 24 kHz in and out, 25 code frames a second
TOKENIZER_CONFIG = dict(  # the released layout's rates (hop 960, semantic model at 16 kHz), shrunk widths
    n_filters=32, D=16, target_bandwidths=[1], ratios=[8, 5, 4, 2, 3], sample_rate=SAMPLE_RATE, bins=32, n_q=4,
    semantic_techer="hubert_base_general", semantic_sample_rate=16000,
)
SYSTEM = "Generate audio following instruction."
# The engine's default stop strings, and the end of the audio: after it a random model's text may hold an
# <|AUDIO|> with no audio for it, which boson's merge of the sequence cannot place (a trained model ends its turn).
STOP_STRINGS = ["<|end_of_text|>", "<|eot_id|>", "<|audio_eos|>"]


def build(root: Path) -> None:
    import numpy as np
    import soundfile
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import HubertConfig, HubertModel, PreTrainedTokenizerFast

    torch.manual_seed(0)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(SENTENCES, trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=SPECIALS[0], eos_token=SPECIALS[1],
                                        pad_token=SPECIALS[-1])
    assert len(tokenizer) <= VOCAB and [tokenizer.convert_tokens_to_ids(t) for t in SPECIALS] == list(range(13))
    tokenizer.save_pretrained(root / "text_tokenizer")

    hubert = HubertConfig(hidden_size=768, num_hidden_layers=1, num_attention_heads=12, intermediate_size=128,
                          conv_dim=(32,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=16)
    HubertModel(hubert).save_pretrained(root / "bosonai" / "hubert_base")

    from boson_multimodal.audio_processing.higgs_audio_tokenizer import HiggsAudioTokenizer

    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE  # one second: a rising tone with a little noise
    wave = 0.3 * np.sin(2 * np.pi * (220 + 220 * t) * t) + 0.01 * np.random.default_rng(0).standard_normal(t.size)
    soundfile.write(root / "reference.wav", wave.astype(np.float32), SAMPLE_RATE)

    audio_tokenizer = HiggsAudioTokenizer(**TOKENIZER_CONFIG, device="cpu").eval()  # its constructor, random weights
    # Its codebooks initialise themselves from the first audio they see (k-means on a random draw): here, once,
    # so that the saved tokenizer encodes the same audio to the same codes in every process, as a trained one does.
    audio_tokenizer.encode(wave.astype(np.float32), SAMPLE_RATE)
    (root / "audio_tokenizer").mkdir()
    (root / "audio_tokenizer" / "config.json").write_text(json.dumps(TOKENIZER_CONFIG))
    torch.save(audio_tokenizer.state_dict(), root / "audio_tokenizer" / "model.pth")


def model_config(tokenizer):
    from higgs_patch.commands import tiny

    ids = tokenizer.convert_tokens_to_ids
    pad = ids("<|finetune_right_pad_id|>")
    text = dict(model_type="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=pad,
                bos_token_id=ids("<|begin_of_text|>"), eos_token_id=ids("<|end_of_text|>"))
    return tiny.config(text_config=text, audio_in_token_idx=ids("<|AUDIO|>"), audio_out_token_idx=ids("<|AUDIO_OUT|>"),
                       audio_out_bos_token_id=ids("<|audio_out_bos|>"), audio_eos_token_id=ids("<|audio_eos|>"),
                       pad_token_id=pad, use_delay_pattern=True)


def train(root: Path) -> None:
    import torch
    from transformers import AutoTokenizer, Trainer, TrainingArguments
    from peft import LoraConfig, get_peft_model
    from boson_multimodal.audio_processing.higgs_audio_tokenizer import load_higgs_audio_tokenizer
    from boson_multimodal.data_collator.higgs_audio_collator import HiggsAudioSampleCollator
    from boson_multimodal.data_types import AudioContent, ChatMLSample, Message
    from boson_multimodal.dataset.chatml_dataset import ChatMLDatasetSample, prepare_chatml_sample
    from boson_multimodal.model.higgs_audio import HiggsAudioModel

    tokenizer = AutoTokenizer.from_pretrained(root / "text_tokenizer")
    audio_tokenizer = load_higgs_audio_tokenizer(str(root / "audio_tokenizer"), device="cpu")
    codes = audio_tokenizer.encode(str(root / "reference.wav"))  # (codebooks, frames), 25 frames a second
    assert codes.shape == (TOKENIZER_CONFIG["n_q"], 25), codes.shape

    def sample(text: str) -> ChatMLDatasetSample:
        chatml = ChatMLSample(messages=[
            Message(role="system", content=SYSTEM), Message(role="user", content=text),
            Message(role="assistant", content=AudioContent(audio_url=str(root / "reference.wav"))),
        ])
        input_tokens, label_tokens, audio_contents, _ = prepare_chatml_sample(chatml, tokenizer)
        assert len(audio_contents) == 1
        return ChatMLDatasetSample(
            input_ids=torch.LongTensor(input_tokens), label_ids=torch.LongTensor(label_tokens),
            audio_ids_concat=codes.cpu(), audio_ids_start=torch.tensor([0], dtype=torch.long),
            audio_waveforms_concat=torch.tensor([]), audio_waveforms_start=torch.tensor([], dtype=torch.long),
            audio_sample_rate=torch.tensor([]), audio_speaker_indices=torch.tensor([], dtype=torch.long),
        )

    data = [sample(text) for text in SENTENCES[:4]]
    config = model_config(tokenizer)
    collator = HiggsAudioSampleCollator(
        whisper_processor=None, encode_whisper_embed=False, audio_in_token_id=config.audio_in_token_idx,
        audio_out_token_id=config.audio_out_token_idx, audio_stream_bos_id=config.audio_stream_bos_id,
        audio_stream_eos_id=config.audio_stream_eos_id, pad_token_id=config.pad_token_id,
        return_audio_in_tokens=True, use_delay_pattern=True, audio_num_codebooks=config.audio_num_codebooks,
        round_to=8,
    )

    def collate(batch):  # the upstream's batch is a dataclass; the Trainer wants a mapping with labels
        out = dict(vars(collator(batch)))
        out["labels"] = out["label_ids"]
        return out

    torch.manual_seed(0)
    base = HiggsAudioModel(config)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    args = TrainingArguments(
        output_dir=str(root / "run"), use_cpu=True, bf16=True, gradient_accumulation_steps=2,
        per_device_train_batch_size=1, max_steps=2, learning_rate=1e-2, report_to=[], save_strategy="no",
        remove_unused_columns=False, disable_tqdm=True, seed=0, logging_steps=1,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collate)
    result = trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    merged = model.merge_and_unload()
    merged.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "train.json").write_text(json.dumps({"losses": losses, "train_loss": result.training_loss}))


def serve(root: Path, out: Path) -> None:
    import soundfile
    from boson_multimodal.data_types import AudioContent, ChatMLSample, Message
    from boson_multimodal.serve.serve_engine import HiggsAudioServeEngine

    engine = HiggsAudioServeEngine(str(root / "model"), str(root / "audio_tokenizer"), device="cpu")
    plain = ChatMLSample(messages=[Message(role="system", content=SYSTEM),
                                   Message(role="user", content=SENTENCES[0])])
    clone = ChatMLSample(messages=[
        Message(role="system", content=SYSTEM), Message(role="user", content=SENTENCES[2]),
        Message(role="assistant", content=AudioContent(audio_url=str(root / "reference.wav"))),
        Message(role="user", content=SENTENCES[0]),
    ])
    results = []
    for position, (name, request) in enumerate([("plain", plain), ("clone", clone), ("plain", plain)]):
        response = engine.generate(request, max_new_tokens=16, force_audio_gen=True, seed=position,
                                   stop_strings=STOP_STRINGS)
        wav = root / f"generated-{position}-{name}.wav"
        soundfile.write(wav, response.audio, response.sampling_rate)
        results.append({
            "request": name, "wav": str(wav), "samples": int(response.audio.shape[0]),
            "sampling_rate": response.sampling_rate,
            "text_tokens": response.generated_text_tokens.tolist(),
            "audio_tokens": response.generated_audio_tokens.tolist(),
        })
    out.write_text(json.dumps(results))


def main(argv: list[str]) -> None:
    """``--unpatched``: nothing applied; ``--revert ID``: everything but patch ID (its failure reproduced)."""
    patched = "--unpatched" not in argv
    reverted = argv[argv.index("--revert") + 1] if "--revert" in argv else None
    argv = [a for a in argv if a not in ("--unpatched", "--revert", reverted)]
    if patched:
        import higgs_patch

        higgs_patch.apply()
        if reverted:
            higgs_patch.revert(reverted)
    step, root = argv[0], Path(argv[1]).resolve()
    if step == "build":
        build(root)
    elif step == "train":
        train(root)
    elif step == "serve":
        serve(root, Path(argv[2]).resolve())
    else:
        raise SystemExit(f"unknown step {step!r}: build, train or serve")


if __name__ == "__main__":
    main(sys.argv[1:])
