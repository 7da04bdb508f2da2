"""transformers' own Higgs Audio v2 (5.3 on): the second upstream the engine serves.

A tiny ``HiggsAudioV2ForConditionalGeneration`` and the real ``HiggsAudioV2Processor`` (a word-level
tokenizer, a random ``DacModel`` as audio tokenizer: higgs_patch/commands/tiny_native.py). Each fix is
shown wrong unpatched first. Nothing here imports boson_multimodal: these tests run where only
transformers is installed.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

import higgs_patch

pytest.importorskip("transformers.models.higgs_audio_v2", reason="transformers' own Higgs Audio v2 ships from 5.3")

from higgs_patch.commands import tiny_native  # noqa: E402

pytestmark = [pytest.mark.core, pytest.mark.native]
NATIVE = ("native-audio-eos", "native-delay-labels", "native-loss", "native-every-parameter", "native-text-head")
BOSON = importlib.util.find_spec("boson_multimodal") is not None
VOICE = "say hello <|audio_out_bos|><|AUDIO_OUT|><|audio_eos|>"
TWO_VOICES = "say <|audio_out_bos|><|AUDIO_OUT|><|audio_eos|> now <|audio_out_bos|><|AUDIO_OUT|><|audio_eos|>"


def processed(frames=(5, 2, 3)):
    return tiny_native.batch(tiny_native.processor(), [VOICE, TWO_VOICES], list(frames))


def eos_per_segment(batch) -> list[list[int]]:
    """For each sample, each codebook: how many end-of-stream codes its audio labels supervise."""
    return (batch["audio_labels"] == tiny_native.EOS).sum(1).tolist()


# --- one engine, two upstreams -----------------------------------------------------------------------------


def _fresh(code: str) -> dict:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


STATES = "import json, higgs_patch; s = higgs_patch.apply(); print(json.dumps({p.id: [p.state, p.reason] for p in s}))"


@pytest.mark.skipif(BOSON, reason="needs a stack with only transformers (boson-multimodal is installed here)")
def test_a_bare_apply_with_only_transformers_applies_the_native_patches():
    states = _fresh(STATES)
    assert {states[i][0] for i in NATIVE} == {"pending"}  # applied at the import of transformers' module
    assert states["model-loss"] == ["not-needed", "boson-multimodal not installed"]
    for declaration in higgs_patch.engine.known().values():
        if declaration.default and declaration.id not in NATIVE and not declaration.id.startswith(
                ("trainer-", "evaluation-", "wrapper-")):  # the Trainer's patches serve either model
            assert states[declaration.id][0] == "not-needed", (declaration.id, states[declaration.id])  # boson's own


@pytest.mark.skipif(BOSON, reason="needs a stack with only transformers (boson-multimodal is installed here)")
def test_a_boson_patch_named_explicitly_is_still_refused_without_boson():
    with pytest.raises(higgs_patch.IncompatibleUpstreamError, match="boson-multimodal.*not installed"):
        higgs_patch.apply("model-loss")
    with pytest.raises(higgs_patch.IncompatibleUpstreamError, match="not installed"):
        higgs_patch.apply(text_loss_weight=1.0)  # an option names its patch


@pytest.mark.skipif(not BOSON, reason="needs boson-multimodal installed beside transformers")
def test_a_bare_apply_with_both_upstreams_serves_both():
    states = _fresh(STATES)
    assert {states[i][0] for i in NATIVE} == {"pending"}
    assert states["model-loss"][0] in ("pending", "applied")


# --- the processor's labels ----------------------------------------------------------------------------------


def test_the_end_of_stream_code_is_supervised_once_per_segment_and_codebook():
    assert eos_per_segment(processed()) == [[0] * 4, [0] * 4]  # upstream: never
    higgs_patch.apply("native-audio-eos")
    batch = processed()
    assert eos_per_segment(batch) == [[1] * 4, [2] * 4]  # sample 0 has one segment, sample 1 two
    assert not (batch["audio_labels"] == tiny_native.BOS).any()
    assert (batch["audio_labels"][0, 10:] == -100).all()  # the batch's padding frames stay unsupervised


def test_delay_tokens_are_not_text_labels():
    delay = tiny_native.tokenizer().convert_tokens_to_ids("<|reserved_special_token_6|>")
    assert (processed()["labels"] == delay).sum() == 3 * (tiny_native.CODEBOOKS - 1)  # upstream: K - 1 per segment
    higgs_patch.apply("native-delay-labels")
    batch = processed()
    assert not (batch["labels"] == delay).any()
    assert (batch["labels"] == batch["input_ids"]).sum() > 0  # the text is still supervised


# --- every update the exact mean of its micro-batches ------------------------------------------------------

SHORT, LONG = (2, 3), (24, 20)  # audio frames of the two micro-batches: few or many per text label


def micro_batches(frames) -> list[dict]:
    proc = tiny_native.processor()
    texts = [VOICE, "say hello world please speak the cat <|audio_out_bos|><|AUDIO_OUT|><|audio_eos|> now"]
    return [dict(tiny_native.batch(proc, [text], [n], seed=i)) for i, (text, n) in enumerate(zip(texts, frames))]


def trainable(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


class ReadsTheModelsLoss:
    """The community trainers' shape: a subclass whose compute_loss calls the model and reads its loss."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs, num_items_in_batch=num_items_in_batch)  # some hand the count on: it must not matter
        return (outputs["loss"], outputs) if return_outputs else outputs["loss"]


def update_ratio(tmp_path, frames, text_head: bool, lora: bool, subclass: bool = False) -> float:
    """One Trainer update under accumulation 2 (SGD, lr 1) against the mean of the micro-batches' own
    gradients (each micro-batch's loss: every term a mean over its tokens)."""
    from transformers import Trainer, TrainingArguments

    model = tiny_native.model(use_text_head=text_head)
    if lora:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    batches = micro_batches(frames)
    model.train()
    expected = {name: torch.zeros_like(p) for name, p in trainable(model).items()}
    for batch in batches:
        model.zero_grad()
        model(**batch).loss.backward()  # no count handed over: upstream's terms are each a mean over its tokens
        for name, p in model.named_parameters():
            if p.requires_grad and p.grad is not None:
                expected[name] += p.grad / len(batches)
    model.zero_grad()
    before = trainable(model)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=1, gradient_accumulation_steps=2,
                             max_steps=1, learning_rate=1.0, optim="sgd", lr_scheduler_type="constant",
                             max_grad_norm=0, weight_decay=0.0, report_to=[], save_strategy="no", use_cpu=True,
                             disable_tqdm=True, remove_unused_columns=False)
    kind = type("Subclass", (ReadsTheModelsLoss, Trainer), {}) if subclass else Trainer
    trainer = kind(model=model, args=args, train_dataset=batches, data_collator=lambda features: features[0])
    trainer.train()
    update = {name: before[name] - p for name, p in trainable(model).items()}
    done = sum((update[n] * expected[n]).sum() for n in expected)
    return float(done / sum((e * e).sum() for e in expected.values()))


CASES = [(frames, head, lora) for lora in (False, True) for head in (True, False) for frames in (SHORT, LONG)]


@pytest.mark.parametrize("frames,text_head,lora", CASES,
                         ids=[f"{'long' if f == LONG else 'short'}-{'text' if h else 'no text'}-{'lora' if l else 'bare'}"
                              for f, h, l in CASES])
def test_one_update_under_accumulation_is_the_mean_of_its_micro_batches(tmp_path, frames, text_head, lora):
    higgs_patch.apply(*NATIVE, "trainer-compute-loss")
    assert update_ratio(tmp_path, frames, text_head, lora) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("frames", [SHORT, LONG], ids=["short", "long"])
def test_a_subclass_reading_the_models_loss_updates_by_the_mean_too(tmp_path, frames):
    higgs_patch.apply(*NATIVE, "trainer-compute-loss")
    assert update_ratio(tmp_path, frames, text_head=True, lora=False, subclass=True) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("frames", [SHORT, LONG], ids=["short", "long"])
def test_unpatched_one_update_is_scaled_by_the_text_labels(tmp_path, frames):
    ratio = update_ratio(tmp_path, frames, text_head=True, lora=False)
    assert abs(ratio - 1.0) > 0.1, ratio  # the Trainer's count of text labels divides every codebook's loss


# --- the objective, an option ------------------------------------------------------------------------------


def upstream_terms(model, batch) -> tuple[float, float]:
    """Upstream's text loss and its sum over codebooks (no count handed over: each a mean), unpatched."""
    higgs_patch.revert("native-loss", "native-every-parameter")
    text = model(**{k: v for k, v in batch.items() if k != "audio_labels"}).loss
    codebooks = model(**{k: v for k, v in batch.items() if k != "labels"}).loss
    return float(text.detach()), float(codebooks.detach())


def test_the_default_objective_is_transformers_own():
    model, batch = tiny_native.model(), dict(processed())
    higgs_patch.apply("native-loss")
    patched = float(model(**batch).loss.detach())
    text, codebooks = upstream_terms(model, batch)
    assert patched == pytest.approx(text + codebooks, rel=1e-5)


@pytest.mark.parametrize("weights,expected", [
    ({}, lambda text, audio: (text + audio) / 2),
    ({"native_text_loss_weight": 2.0, "native_audio_loss_weight": 0.5}, lambda text, audio: 2 * text + 0.5 * audio),
], ids=["mean", "weighted"])
def test_bosons_objective_when_asked(weights, expected):
    model, batch = tiny_native.model(), dict(processed())
    higgs_patch.apply("native-loss", native_objective="boson", **weights)
    patched = float(model(**batch).loss.detach())
    text, codebooks = upstream_terms(model, batch)
    # every codebook supervises as many tokens here, so the mean over their tokens is the mean of their means
    assert patched == pytest.approx(expected(text, codebooks / tiny_native.CODEBOOKS), rel=1e-5)


def test_weights_without_bosons_objective_are_refused():
    with pytest.raises(higgs_patch.PatchError, match="native_objective='boson'"):
        higgs_patch.apply("native-loss", native_text_loss_weight=2.0)


def test_the_components_reach_the_trainers_logs(tmp_path):
    from transformers import Trainer, TrainingArguments

    higgs_patch.apply(*NATIVE, "trainer-compute-loss")
    batches = micro_batches(SHORT)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=1, max_steps=2, logging_steps=1,
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                             remove_unused_columns=False)
    trainer = Trainer(model=tiny_native.model(), args=args, train_dataset=batches,
                      data_collator=lambda features: features[0])
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all({"text_loss", "audio_loss", "audio_loss_cb0", "audio_loss_cb3"} <= set(e) for e in logged)


# --- a trained text head, loaded ---------------------------------------------------------------------------


def test_a_trained_text_head_is_kept_on_load(tmp_path):
    from transformers import HiggsAudioV2ForConditionalGeneration

    trained = tiny_native.model(seed=1)
    trained.save_pretrained(tmp_path)
    assert HiggsAudioV2ForConditionalGeneration.from_pretrained(tmp_path).text_lm_head is None  # upstream: dropped
    higgs_patch.apply("native-text-head")
    loaded = HiggsAudioV2ForConditionalGeneration.from_pretrained(tmp_path)
    assert torch.equal(loaded.text_lm_head.weight, trained.text_lm_head.weight)
    assert HiggsAudioV2ForConditionalGeneration.from_pretrained(tmp_path, use_text_head=False).text_lm_head is None
    higgs_patch.revert("native-text-head")
    assert HiggsAudioV2ForConditionalGeneration.from_pretrained(tmp_path).text_lm_head is None


def test_doctor_reports_the_native_patches():
    import shutil
    from pathlib import Path

    command = shutil.which("higgs-patch", path=str(Path(sys.executable).parent))
    done = subprocess.run([command, "doctor", "--json"], capture_output=True, text=True, timeout=600)
    report = json.loads(done.stdout)
    sections = {p["id"]: p for p in report["patches"]}
    for patch_id in NATIVE:
        verdict = next(c for c in sections[patch_id]["checks"] if c["name"] == "would apply")
        assert verdict["level"] == "ok" and verdict["detail"] == "yes", (patch_id, verdict)
    if not BOSON:  # only transformers: boson's patches are passed over, and nothing fails
        assert done.returncode == 0, [c for c in report["checks"] if c["level"] == "fail"]
        model_loss = sections["model-loss"]["checks"]
        assert any("boson-multimodal not installed" in c["detail"] for c in model_loss)


def test_every_native_fix_reads_symptom_cause_change():
    from higgs_patch import engine

    for declaration in engine.known().values():
        if declaration.id in NATIVE:
            module = importlib.import_module(declaration.targets[0].wrapper.partition(":")[0])
            doc = module.__doc__
            assert doc.startswith(declaration.id) and doc.index("Symptom:") < doc.index("Cause:") < doc.index("Change:")
