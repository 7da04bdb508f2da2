"""DDP on mixed data: torchrun, 2 gloo ranks, half the samples without ``<|AUDIO_OUT|>``.

A step in which one rank's batch has no audio-out (or no audio at all) leaves the audio head (and
the audio codebook embeddings) out of that rank's graph. With ``ddp_find_unused_parameters=False``
(DDP's own advice, and the Trainer's choice under gradient checkpointing) the ranks then wait for
each other forever. Patched, every parameter takes part in every step (an exact zero where there is
nothing to score), so every setting finishes with the same weights on both ranks and the same update
as ``find_unused_parameters=True``; the one combination DDP cannot run (reentrant checkpointing with
``find_unused_parameters=True``) is a clear error at the first step.

All cases run in one torchrun launch (each case a Trainer of its own, in the same process group),
killed whole if it outlives its timeout.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from packaging.specifiers import SpecifierSet

import higgs_patch
import tiny
from launch import TIMEOUT, results, torchrun


SCRIPT = textwrap.dedent("""
    import json, os, signal, sys, tempfile
    import torch, torch.distributed as dist

    signal.alarm(int(sys.argv[4]))  # a rank that hangs ends itself, whatever became of its launcher
    from torch.utils.data import SequentialSampler
    import higgs_patch

    if sys.argv[3] == "patched":
        higgs_patch.apply()  # before boson_multimodal is imported (from transformers 4.48 its import needs the shims)
    import tiny
    from test_accumulation import HoldsTheModel
    from transformers import Trainer, TrainingArguments
    # Batches of 2 in this order; rank r takes batches r, r + 2: rank 0 [voice, voice], [voice, asr];
    # rank 1 [text, text] (no audio token at all), [asr, voice]. Half the samples have no audio-out.
    DATA = [tiny.sample(0), tiny.sample(1), tiny.without_audio_out(2, keep_audio_in=False),
            tiny.without_audio_out(3, keep_audio_in=False), tiny.sample(4), tiny.without_audio_out(5),
            tiny.without_audio_out(6), tiny.sample(7)]

    class InOrder(Trainer):
        def _get_train_sampler(self, *args):  # 4.55 on pass the dataset
            return SequentialSampler(self.train_dataset)

        def compute_loss(self, model, inputs, *args, **kwargs):
            self.audio_out.append(int(inputs["audio_out_ids"].shape[-1]))
            return super().compute_loss(model, inputs, *args, **kwargs)

    rank = int(os.environ["RANK"])
    for name, settings in json.loads(sys.argv[2]).items():
        model = tiny.model()
        if settings.pop("lora", False):
            from peft import LoraConfig, get_peft_model
            model = get_peft_model(model, LoraConfig(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
        inner = model
        if settings.pop("wrapper", False):
            model = HoldsTheModel(model)
        without = settings.pop("without", [])  # patches this case runs without, applied again after it
        if without:
            higgs_patch.revert(*without)
        args = TrainingArguments(**{**dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=2, max_steps=4,
                                           learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                                           remove_unused_columns=False, disable_tqdm=True, ddp_backend="gloo"),
                                    **settings})
        trainer = InOrder(model=model, args=args, train_dataset=DATA, data_collator=tiny.DictCollator(tiny.collator()))
        trainer.audio_out = []
        try:
            trainer.train()
            result = {"audio_out": trainer.audio_out, "state": {k: v.detach() for k, v in inner.state_dict().items()},
                      "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
                      "multiplies": bool(trainer.args.average_tokens_across_devices and trainer.model_accepts_loss_kwargs)}
        except Exception as exc:
            result = {"error": f"{type(exc).__name__}: {exc}", "steps": len(trainer.audio_out)}
        if without:
            higgs_patch.apply(*without)
        torch.save(result, os.path.join(sys.argv[1], f"{name}.rank{rank}.pt"))
        dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # torch 2.13's gloo can abort while the interpreter tears down; the results are on disk
""")

# transformers' default up to 4.57; 5.x defaults to use_reentrant=False, so the reentrant cases say it
REENTRANT = {"use_reentrant": True}
REFERENCE = "find_unused_parameters=True"
CASES = {
    REFERENCE: {"ddp_find_unused_parameters": True},
    "find_unused_parameters=False": {"ddp_find_unused_parameters": False},
    "checkpointing (reentrant)": {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": REENTRANT},
    "checkpointing (non-reentrant)": {"gradient_checkpointing": True,
                                      "gradient_checkpointing_kwargs": {"use_reentrant": False}},
    "checkpointing (non-reentrant), find_unused_parameters=True": {
        "gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False},
        "ddp_find_unused_parameters": True},
    "checkpointing (reentrant), find_unused_parameters=True": {
        "gradient_checkpointing": True, "gradient_checkpointing_kwargs": REENTRANT, "ddp_find_unused_parameters": True},
}
REFUSED = "checkpointing (reentrant), find_unused_parameters=True"
LORA_REFERENCE = "LoRA, find_unused_parameters=True"
CASES.update({
    LORA_REFERENCE: {"lora": True, "ddp_find_unused_parameters": True},
    "LoRA, checkpointing (reentrant), find_unused_parameters=False": {
        "lora": True, "gradient_checkpointing": True, "gradient_checkpointing_kwargs": REENTRANT,
        "ddp_find_unused_parameters": False},
})


def launched(tmp_path_factory, name: str, cases: dict) -> Path:
    """The folder of one torchrun launch of ``cases`` that finished, each rank within the timeout."""
    folder = tmp_path_factory.mktemp(name)
    done = torchrun(folder, SCRIPT, cases)
    assert done is not None, f"the ranks did not finish within {TIMEOUT} s"
    assert done.returncode == 0, done.stdout[-4000:]
    return folder


@pytest.fixture(scope="module")
def patched_run(tmp_path_factory):
    return launched(tmp_path_factory, "ddp", CASES)


@pytest.mark.parametrize("case", [c for c in CASES if c not in (REFERENCE, REFUSED, LORA_REFERENCE)])
def test_every_setting_finishes_on_mixed_data_with_the_update_of_find_unused_parameters(patched_run, case):
    reference, _ = results(patched_run, LORA_REFERENCE if case.startswith("LoRA") else REFERENCE)
    assert "error" not in reference, reference
    ranks = results(patched_run, case)
    assert all("error" not in r for r in ranks), [r.get("error") for r in ranks]
    # the data did what it is for: a step where rank 0 had audio-out and rank 1 had no audio at all
    assert ranks[0]["audio_out"][0] > 0 and ranks[1]["audio_out"][0] == 0 and len(ranks[0]["audio_out"]) == 4
    for name, value in reference["state"].items():
        assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name]), f"{name} differs between ranks"
        assert torch.equal(ranks[0]["state"][name], value), f"{name} differs from {REFERENCE}'s update"
    if case.startswith("LoRA"):  # the adapters trained (lora_B starts at zero)
        assert all(value.abs().max() > 0 for name, value in ranks[0]["state"].items() if "lora_B" in name)
    else:  # and the audio head, which rank 1's first batch had nothing for
        head = "audio_decoder_proj.audio_lm_head.weight"
        assert not torch.equal(ranks[0]["state"][head], tiny.model().state_dict()[head])


def test_reentrant_checkpointing_with_find_unused_parameters_is_a_clear_error_at_the_first_step(patched_run):
    for rank in results(patched_run, REFUSED):
        assert rank["steps"] == 0  # raised before the first forward
        assert rank["error"].startswith("ValueError: gradient checkpointing with use_reentrant=True")
        for says in ("ddp_find_unused_parameters=True", "ddp_find_unused_parameters=False",
                     "gradient_checkpointing_kwargs={'use_reentrant': False}"):
            assert says in rank["error"]


# --- a wrapper module's loss under DDP ----------------------------------------------------------------------

# One SGD step, no clipping: an update scaled by c is c times the bare model's, exactly what the loss was scaled by.
ONE_STEP = {"optim": "sgd", "max_grad_norm": 0, "lr_scheduler_type": "constant", "max_steps": 1, "logging_steps": 1}
WRAPPED = {
    "bare": dict(ONE_STEP),
    "in a wrapper": {**ONE_STEP, "wrapper": True},
    "in a wrapper, without trainer-compute-loss": {**ONE_STEP, "wrapper": True, "without": ["trainer-compute-loss"]},
}


@pytest.fixture(scope="module")
def wrapper_run(tmp_path_factory):
    return launched(tmp_path_factory, "ddp-wrapper", WRAPPED)


def update(folder: Path, case: str) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Rank 0's update (both ranks' are checked equal by the tests above) and its logged losses."""
    ranks = results(folder, case)
    assert all("error" not in r for r in ranks), [r.get("error") for r in ranks]
    initial = tiny.model().state_dict()
    return {name: value - initial[name] for name, value in ranks[0]["state"].items()}, ranks[0]["losses"]


@pytest.mark.core
def test_a_wrappers_update_and_logged_loss_under_ddp_are_the_bare_models(wrapper_run):
    """transformers 4.55 turned average_tokens_across_devices on: the Trainer multiplies the loss of a model
    that takes loss kwargs (a wrapper's forward(**kwargs)) by the number of processes, taking it for a sum."""
    expected, expected_losses = update(wrapper_run, "bare")
    got, losses = update(wrapper_run, "in a wrapper")
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
    assert losses == expected_losses
    assert any(value.abs().max() > 0 for value in expected.values())


@pytest.mark.core
def test_without_the_fix_a_wrapper_under_ddp_takes_world_size_times_the_update_where_the_trainer_multiplies(
        wrapper_run):
    expected, expected_losses = update(wrapper_run, "bare")
    got, losses = update(wrapper_run, "in a wrapper, without trainer-compute-loss")
    multiplies = results(wrapper_run, "in a wrapper, without trainer-compute-loss")[0]["multiplies"]
    if SpecifierSet(">=4.55").contains(transformers.__version__):  # on by default there: what users get
        assert multiplies
    factor = 2 if multiplies else 1
    for name, value in expected.items():
        torch.testing.assert_close(got[name], factor * value, rtol=1e-4, atol=2 ** -22, msg=name)  # weights near 1: their rounding
    assert losses == pytest.approx([factor * loss for loss in expected_losses], rel=1e-3)


@pytest.mark.core
def test_every_parameter_takes_part_in_a_step_without_audio_out_or_without_audio():
    """The same in one process: what DDP waits for is a gradient for every trainable parameter."""
    batches = {"asr-like": [tiny.without_audio_out(0), tiny.without_audio_out(1)],
               "text only": [tiny.without_audio_out(0, keep_audio_in=False)]}
    upstream = {name: tiny.model()(**tiny.DictCollator(tiny.collator(), with_labels=False)(samples)).logits
                for name, samples in batches.items()}
    with higgs_patch.applied():
        for name, samples in batches.items():
            model = tiny.model().train()
            batch = tiny.DictCollator(tiny.collator())(samples)
            outputs = model(**batch)
            outputs.loss.backward()
            missing = [n for n, p in model.named_parameters() if p.grad is None]
            assert not missing, f"{name}: {missing}"
            assert float(model.audio_decoder_proj.audio_lm_head.weight.grad.abs().max()) == 0.0
            assert torch.equal(outputs.logits, upstream[name])  # the zeros change no value
