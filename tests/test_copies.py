"""A model the plugin touched deep-copies, pickles and ``torch.save``s wherever the unpatched one does,
and the copy computes the same loss.

Deep copies are routine (EMA weights, TRL's reference model, model soups). What the plugin puts
where user code reaches it: its proxies on the classes, their bound forms (accelerate's mixed
precision keeps one on the instance as ``_original_forward``), and the loss it remembers on an output.
"""

from __future__ import annotations

import copy
import io
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from accelerate import Accelerator
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments

import higgs_patch
import needed
import tiny


def bare(tmp_path):
    return tiny.model()


def peft(tmp_path):
    return get_peft_model(tiny.model(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))


def accelerate_bf16(tmp_path):
    return Accelerator(mixed_precision="bf16", cpu=True).prepare(tiny.model())


def trained(tmp_path):
    model = tiny.model()
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no", max_steps=2,
                             remove_unused_columns=False, disable_tqdm=True, per_device_train_batch_size=2)
    Trainer(model=model, args=args, train_dataset=tiny.samples(4), data_collator=tiny.DictCollator(tiny.collator())).train()
    return model


MODELS = {"bare": bare, "PEFT": peft, "Accelerator bf16": accelerate_bf16, "after Trainer.train()": trained}


def torch_save(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


COPIES = {"deepcopy": copy.deepcopy, "pickle": lambda model: pickle.loads(pickle.dumps(model)), "torch.save": torch_save}


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def batch() -> dict:
    return tiny.DictCollator(tiny.collator())(tiny.samples(2))


def copied_or_error(make, how, tmp_path):
    model = make(tmp_path).eval()
    try:
        return model, COPIES[how](model)
    except Exception as error:  # noqa: BLE001 - what the unpatched upstream raises is the comparison
        return model, error


@pytest.mark.core
@pytest.mark.parametrize("how", COPIES)
@pytest.mark.parametrize("kind", MODELS)
def test_a_patched_model_copies_wherever_the_unpatched_one_does_and_the_copy_computes_the_same_loss(
        tmp_path, kind, how):
    # Unpatched, the Trainer cannot train the model (no loss): an untrained one is the comparison there.
    _, unpatched = copied_or_error(bare if MODELS[kind] is trained else MODELS[kind], how, tmp_path / "unpatched")
    with higgs_patch.applied():
        model, patched = copied_or_error(MODELS[kind], how, tmp_path / "patched")
        if isinstance(unpatched, Exception):
            assert type(patched) is type(unpatched) and str(patched) == str(unpatched)
            return
        assert not isinstance(patched, Exception), patched
        inputs = batch()
        # A pickled bound method is getattr(instance, name), resolved before the instance's own attributes
        # are back: unpickled, a prepared model runs its class's forward, without accelerate's autocast
        # (unpatched too); a deep copy keeps the instance's forward.
        forward = model.forward if how == "deepcopy" else type(model).forward.__get__(model)
        with torch.no_grad():
            expected, got = forward(**inputs).loss, patched(**inputs).loss
    assert expected is not None and expected.item() > 0
    assert torch.equal(got, expected)
    assert patched is not model and all(p is not q for p, q in zip(patched.parameters(), model.parameters()))


@pytest.mark.core
def test_what_accelerate_keeps_of_the_patched_forward_copies_as_a_bound_method_does():
    """The symptom: ``object proxy must define __deepcopy__()`` / ``__reduce__()`` on ``_original_forward``."""
    model = tiny.model()
    with higgs_patch.applied():
        model = Accelerator(mixed_precision="bf16", cpu=True).prepare(model)
        kept = model.__dict__["_original_forward"]
        twin = copy.deepcopy(model)
        assert twin.__dict__["_original_forward"].__self__ is twin
        assert copy.copy(kept) == kept or copy.copy(kept) is kept
        again = pickle.loads(pickle.dumps([model, kept]))
        assert again[1].__self__ is again[0]


@pytest.mark.core
def test_the_class_level_proxies_pickle_as_the_names_they_stand_for():
    from tiny import HiggsAudioModel

    with higgs_patch.applied():
        for value in (HiggsAudioModel.forward, vars(HiggsAudioModel)["forward"], HiggsAudioModel.from_pretrained):
            assert copy.deepcopy(value) is value and copy.copy(value) is value
            restored = pickle.loads(pickle.dumps(value))
            assert restored == value or restored.__name__ == value.__name__
    unpatched = pickle.loads(pickle.dumps(vars(HiggsAudioModel)["forward"]))
    assert unpatched is vars(HiggsAudioModel)["forward"]


@pytest.mark.core
def test_a_patched_output_with_its_loss_copies_pickles_and_saves():
    inputs = batch()
    with higgs_patch.applied(), torch.no_grad():
        outputs = tiny.model().eval()(**inputs)
        for how, make in COPIES.items():
            twin = make(outputs)
            assert torch.equal(twin.loss, outputs.loss), how
            assert torch.equal(higgs_patch.higgs_audio_loss(twin, inputs).loss, outputs.loss), how


@pytest.mark.core
def test_a_model_pickled_with_the_plugin_applied_unpickles_and_runs_where_it_is_not(tmp_path):
    """What the pickle names resolves in a process without the plugin: there, upstream's own forward."""
    with higgs_patch.applied():
        model = Accelerator(mixed_precision="bf16", cpu=True).prepare(tiny.model())
        torch.save(model, tmp_path / "model.pt")
    script = textwrap.dedent(f"""
        import sys
        import higgs_patch
        shims = {needed.shims()!r}
        if shims:
            higgs_patch.apply(*shims)  # what boson needs to import on this line, and nothing else
        import torch
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import tiny
        model = torch.load({str(tmp_path / "model.pt")!r}, weights_only=False)
        outputs = model(**tiny.fields(tiny.collator()(tiny.samples(2))))
        assert outputs.loss is None and outputs.logits is not None, outputs.loss  # upstream's forward: no loss
        assert not any(s.state == "applied" and s.id not in shims for s in higgs_patch.status())
        print("ran")
    """)
    done = subprocess.run([sys.executable, "-P", "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ran" in done.stdout, done.stderr[-3000:]
