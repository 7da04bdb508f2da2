"""The user's wrapper module (the model as ``.model`` in an ``nn.Module``), and PEFT, under the real Trainer.

``evaluate()`` reports the bare model's ``eval_loss``; what the Trainer saves around a wrapper
(``save_model()``, checkpoints every ``save_steps``) is the inner model's checkpoint, which
``HiggsAudioModel.from_pretrained`` / ``PeftModel.from_pretrained`` load and the Trainer resumes
from; a wrapper's prefixed state dict is refused by ``from_pretrained`` with what it is.
"""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from test_community import HoldsTheModel
from transformers import Trainer, TrainerCallback, TrainingArguments

import higgs_patch
import tiny

LORA = dict(r=4, target_modules=["q_proj", "v_proj"])


class LabelsOnly(tiny.DictCollator):
    """A collator that gives the text labels only as ``labels`` (forward-kwargs-filter passes them on)."""

    def __call__(self, batch):
        out = super().__call__(batch)
        out.pop("label_ids")
        return out


def trainer(tmp_path, model, collator=None, **overrides) -> Trainer:
    settings = dict(output_dir=str(tmp_path), use_cpu=True, report_to=[], remove_unused_columns=False,
                    disable_tqdm=True, seed=0, per_device_eval_batch_size=2, per_device_train_batch_size=2,
                    save_strategy="no", logging_steps=1, learning_rate=3e-3)
    settings.update(overrides)
    return Trainer(model=model, args=TrainingArguments(**settings), train_dataset=tiny.samples(6),
                   eval_dataset=tiny.samples(4), data_collator=collator or tiny.DictCollator(tiny.collator()))


EVALUATED = {
    "bare": lambda: tiny.model(),
    "in a wrapper": lambda: HoldsTheModel(tiny.model()),
    "PEFT, CAUSAL_LM": lambda: get_peft_model(tiny.model(), LoraConfig(task_type="CAUSAL_LM", **LORA)),
    "PEFT, no task type": lambda: get_peft_model(tiny.model(), LoraConfig(**LORA)),
    "PEFT in a wrapper": lambda: HoldsTheModel(get_peft_model(tiny.model(), LoraConfig(**LORA))),
}


@pytest.mark.core
@pytest.mark.parametrize("labels", ["label_ids and labels", "labels only"])
@pytest.mark.parametrize("kind", EVALUATED, ids=list(EVALUATED))
def test_evaluate_reports_the_bare_models_eval_loss(tmp_path, kind, labels):
    collator = tiny.DictCollator(tiny.collator()) if labels != "labels only" else LabelsOnly(tiny.collator())
    with higgs_patch.applied():
        expected = trainer(tmp_path, tiny.model()).evaluate()["eval_loss"]
        got = trainer(tmp_path, EVALUATED[kind](), collator).evaluate()
    assert "eval_loss" in got, got
    assert got["eval_loss"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.core
@pytest.mark.parametrize("kind", ["in a wrapper", "PEFT, no task type"])
def test_without_the_fix_evaluate_silently_reports_no_eval_loss(tmp_path, kind):
    """On every line for a wrapper module. From transformers 4.57 the Trainer reads the label names of PEFT's
    base model (before, of PEFT's forward(*args, **kwargs): none), so there PEFT alone evaluates."""
    with higgs_patch.applied(*[s.id for s in higgs_patch.status() if s.default and s.id != "evaluation-loss"]):
        expected = trainer(tmp_path, tiny.model()).evaluate()["eval_loss"]
        run = trainer(tmp_path, EVALUATED[kind]())
        if kind == "PEFT, no task type" and run.label_names:
            assert run.label_names == ["label_ids", "label_audio_ids"]  # the bare model's, as the patch would give
            assert run.evaluate()["eval_loss"] == pytest.approx(expected, rel=1e-6)
            return
        assert "eval_loss" not in run.evaluate()


# --- checkpoints around a wrapper ------------------------------------------------------------------------


def logits_of(model) -> torch.Tensor:
    batch = tiny.fields(tiny.collator()(tiny.samples(2)))
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def trained_wrapper(tmp_path, inner, **overrides) -> Trainer:
    run = trainer(tmp_path, HoldsTheModel(inner), **{"max_steps": 2, **overrides})
    run.train()
    return run


@pytest.mark.core
def test_save_model_of_a_wrapper_is_the_inner_models_checkpoint(tmp_path):
    with higgs_patch.applied():
        run = trained_wrapper(tmp_path / "run", tiny.model())
        run.save_model(str(tmp_path / "saved"))
        loaded = tiny.HiggsAudioModel.from_pretrained(str(tmp_path / "saved"))
    saved = tmp_path / "saved"
    assert (saved / "config.json").is_file()
    assert json.loads((saved / "config.json").read_text())["model_type"] == "higgs_audio"
    keys = safetensors.torch.load_file(str(saved / "model.safetensors")).keys()
    assert keys and not any(key.startswith("model.") for key in keys)
    assert (saved / "training_args.bin").is_file()
    torch.testing.assert_close(logits_of(loaded), logits_of(run.model.model), rtol=0, atol=0)
    assert not torch.equal(logits_of(loaded), logits_of(tiny.model()))  # the trained weights, not fresh ones


@pytest.mark.core
def test_save_model_of_a_wrapper_around_peft_is_the_adapter(tmp_path):
    with higgs_patch.applied():
        run = trained_wrapper(tmp_path / "run", get_peft_model(tiny.model(), LoraConfig(**LORA)), learning_rate=3e-2)
        run.save_model(str(tmp_path / "saved"))
        loaded = PeftModel.from_pretrained(tiny.model(), str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "adapter_config.json").is_file()
    assert not (tmp_path / "saved" / "model.safetensors").exists()
    torch.testing.assert_close(logits_of(loaded), logits_of(run.model.model), rtol=0, atol=0)
    assert not torch.equal(logits_of(loaded), logits_of(tiny.model()))


@pytest.mark.core
def test_without_the_fix_save_model_of_a_wrapper_writes_prefixed_keys_and_no_config(tmp_path):
    with higgs_patch.applied(*[s.id for s in higgs_patch.status() if s.default and s.id != "wrapper-checkpoints"]):
        run = trainer(tmp_path, HoldsTheModel(tiny.model()))
        run.save_model(str(tmp_path / "saved"))
    assert not (tmp_path / "saved" / "config.json").exists()
    keys = safetensors.torch.load_file(str(tmp_path / "saved" / "model.safetensors")).keys()
    assert all(key.startswith("model.") for key in keys)


INNER = {
    "full fine-tune": lambda: tiny.model(),
    "LoRA": lambda: get_peft_model(tiny.model(), LoraConfig(**LORA)),
}


def weights(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.core
@pytest.mark.parametrize("kind", INNER, ids=list(INNER))
def test_checkpoints_of_a_wrapper_load_and_resume_exactly(tmp_path, kind):
    arguments = dict(max_steps=4, save_strategy="steps", save_steps=2)
    with higgs_patch.applied():
        whole = trained_wrapper(tmp_path / "whole", INNER[kind](), **arguments)
        checkpoint = tmp_path / "whole" / "checkpoint-2"
        if kind == "LoRA":
            assert (checkpoint / "adapter_config.json").is_file()
            PeftModel.from_pretrained(tiny.model(), str(checkpoint))
        else:
            assert (checkpoint / "config.json").is_file()
            tiny.HiggsAudioModel.from_pretrained(str(checkpoint))
        resumed = trainer(tmp_path / "resumed", HoldsTheModel(INNER[kind]()), **arguments)
        resumed.train(resume_from_checkpoint=str(checkpoint))
    assert torch.equal(weights(resumed.model), weights(whole.model))
    assert not torch.equal(weights(whole.model), weights(HoldsTheModel(INNER[kind]())))


# --- a wrapper's own state dict -----------------------------------------------------------------------------


class HoldsItAsHiggs(torch.nn.Module):
    def __init__(self, model) -> None:
        super().__init__()
        self.higgs = model


def wrapper_state_dict(folder, attribute: str, with_config: bool) -> tuple[str, torch.nn.Module]:
    """What Trainer.save_model writes for a wrapper unpatched: its state dict, keys prefixed by the attribute."""
    folder.mkdir()
    wrapper = HoldsTheModel(tiny.model()) if attribute == "model" else HoldsItAsHiggs(tiny.model())
    safetensors.torch.save_file(wrapper.state_dict(), str(folder / "model.safetensors"), metadata={"format": "pt"})
    inner = getattr(wrapper, attribute)
    if with_config:
        inner.config.save_pretrained(str(folder))
    return str(folder), inner


REFUSED = {"'model.' without config.json": ("model", False), "'higgs.' with config.json": ("higgs", True)}


@pytest.mark.core
@pytest.mark.parametrize("case", REFUSED, ids=list(REFUSED))
def test_from_pretrained_on_a_wrappers_state_dict_says_what_it_is_and_how_to_load_it(tmp_path, case):
    attribute, with_config = REFUSED[case]
    folder, _ = wrapper_state_dict(tmp_path / "wrapper", attribute, with_config)
    with higgs_patch.applied():
        with pytest.raises(higgs_patch.InputError) as caught:
            tiny.HiggsAudioModel.from_pretrained(folder)
    message = str(caught.value)
    assert "model.safetensors" in message and f"'{attribute}.'" in message
    assert "load_state_dict" in message and f"wrapper.{attribute}.save_pretrained" in message


@pytest.mark.core
def test_without_the_fix_a_wrappers_state_dict_fails_misleadingly_or_loads_fresh_weights(tmp_path):
    folder, _ = wrapper_state_dict(tmp_path / "no-config", "model", with_config=False)
    with pytest.raises(AssertionError, match="Padding_idx must be within num_embeddings"):
        tiny.HiggsAudioModel.from_pretrained(folder)
    folder, inner = wrapper_state_dict(tmp_path / "higgs", "higgs", with_config=True)
    loaded = tiny.HiggsAudioModel.from_pretrained(folder)  # no error: every weight freshly initialised
    assert not torch.equal(loaded.embed_tokens.weight, inner.embed_tokens.weight)


@pytest.mark.core
def test_a_state_dict_prefixed_with_the_base_model_prefix_and_a_config_still_loads(tmp_path):
    """transformers strips the model's own ``base_model_prefix`` ('model.'): that checkpoint is not refused."""
    folder, inner = wrapper_state_dict(tmp_path / "wrapper", "model", with_config=True)
    with higgs_patch.applied():
        loaded = tiny.HiggsAudioModel.from_pretrained(folder)
    assert torch.equal(weights(loaded), weights(inner))


@pytest.mark.core
def test_from_pretrained_of_other_checkpoints_is_untouched(tmp_path):
    model = tiny.model()
    model.save_pretrained(str(tmp_path / "bare"))
    with higgs_patch.applied():
        loaded = tiny.HiggsAudioModel.from_pretrained(str(tmp_path / "bare"))
    torch.testing.assert_close(logits_of(loaded), logits_of(model), rtol=0, atol=0)


class StepWeights(TrainerCallback):
    def __init__(self, run) -> None:
        self.run, self.seen = run, []

    def on_step_end(self, args, state, control, **kwargs):
        self.seen.append(weights(self.run.model))


@pytest.mark.core
@pytest.mark.parametrize("kind", INNER, ids=list(INNER))
def test_load_best_model_at_end_loads_the_best_checkpoint_into_a_wrapper(tmp_path, kind):
    """greater_is_better=True makes the first checkpoint the best while the loss falls: the end is not it."""
    arguments = dict(max_steps=4, save_strategy="steps", save_steps=2, eval_strategy="steps", eval_steps=2,
                     load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=True,
                     learning_rate=3e-2)
    with higgs_patch.applied():
        run = trainer(tmp_path, HoldsTheModel(INNER[kind]()), **arguments)
        after_steps = StepWeights(run)
        run.add_callback(after_steps)
        run.train()
        assert run.state.best_model_checkpoint.endswith("checkpoint-2")
        best = HoldsTheModel(INNER[kind]())
        trainer(tmp_path / "best", best)._load_from_checkpoint(run.state.best_model_checkpoint)
    assert torch.equal(weights(run.model), weights(best))
    assert not torch.equal(weights(run.model), after_steps.seen[-1])  # the weights after the last step
