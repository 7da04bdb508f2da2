"""``from_pretrained`` of a wrapper's prefixed state dict is refused, naming the file and the prefix, on
every load path: safetensors or ``.bin``, one file or sharded, in a ``subfolder=``, in a script that
never imported the Trainer.

A wrapper's state dict is what ``Trainer.save_model`` writes for a module holding the model when
``wrapper-checkpoints`` is not applied: every key prefixed by the attribute that holds the model.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from huggingface_hub import save_torch_state_dict

import higgs_patch
import tiny

#: name -> (safetensors, the largest shard): how transformers (through huggingface_hub) writes each layout.
LAYOUTS = {
    "model.safetensors": (True, "10GB"),
    "sharded safetensors": (True, "200KB"),
    "pytorch_model.bin": (False, "10GB"),
    "sharded pytorch_model.bin": (False, "200KB"),
}
FILES = {"model.safetensors": "model.safetensors", "sharded safetensors": "model.safetensors.index.json",
         "pytorch_model.bin": "pytorch_model.bin", "sharded pytorch_model.bin": "pytorch_model.bin.index.json"}


class Holds(torch.nn.Module):
    def __init__(self, attribute: str, model) -> None:
        super().__init__()
        setattr(self, attribute, model)


def write_wrapper_state_dict(root, layout: str, attribute: str = "higgs", subfolder: str = "",
                             with_config: bool = True):
    """A wrapper's state dict in ``layout`` under ``root/subfolder`` (config.json beside it); the inner model."""
    folder = os.path.join(root, subfolder)
    safe, shard = LAYOUTS[layout]
    inner = tiny.model()
    os.makedirs(folder, exist_ok=True)
    save_torch_state_dict(Holds(attribute, inner).state_dict(), folder, safe_serialization=safe, max_shard_size=shard)
    assert os.path.isfile(os.path.join(folder, FILES[layout])), os.listdir(folder)
    if with_config:
        inner.config.save_pretrained(folder)
    return inner


def load(root, subfolder: str):
    return tiny.HiggsAudioModel.from_pretrained(str(root), **({"subfolder": subfolder} if subfolder else {}))


@pytest.mark.core
@pytest.mark.parametrize("layout", ["pytorch_model.bin", "sharded pytorch_model.bin", "sharded safetensors"])
def test_unpatched_a_wrappers_state_dict_beside_a_config_loads_fresh_weights_in_every_layout(tmp_path, layout):
    """The symptom: no error, every weight freshly initialised, only transformers' missing-keys warning."""
    inner = write_wrapper_state_dict(tmp_path, layout)
    loaded = load(tmp_path, "")
    assert not torch.equal(loaded.embed_tokens.weight, inner.embed_tokens.weight)


@pytest.mark.core
@pytest.mark.parametrize("subfolder", ["", "checkpoint"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_wrappers_state_dict_is_refused_naming_the_file_and_the_prefix(tmp_path, layout, subfolder):
    write_wrapper_state_dict(tmp_path, layout, subfolder=subfolder)
    with higgs_patch.applied(), pytest.raises(higgs_patch.InputError) as caught:
        load(tmp_path, subfolder)
    message = str(caught.value)
    assert os.path.join(str(tmp_path), subfolder, FILES[layout]) in message
    assert "'higgs.'" in message and "wrapper.higgs.save_pretrained" in message


@pytest.mark.core
@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_base_model_prefix_with_a_config_still_loads_in_every_layout(tmp_path, layout):
    """transformers strips the model's own ``base_model_prefix`` ('model.'): that checkpoint loads."""
    inner = write_wrapper_state_dict(tmp_path, layout, attribute="model")
    with higgs_patch.applied():
        loaded = load(tmp_path, "")
    assert torch.equal(loaded.embed_tokens.weight, inner.embed_tokens.weight)


@pytest.mark.core
def test_a_prefixed_state_dict_given_to_from_pretrained_is_refused(tmp_path):
    inner = tiny.model()
    with higgs_patch.applied(), pytest.raises(higgs_patch.InputError, match="the state_dict passed .* 'higgs.'"):
        tiny.HiggsAudioModel.from_pretrained(None, config=inner.config, state_dict=Holds("higgs", inner).state_dict())


@pytest.mark.core
def test_the_refusal_holds_in_a_script_that_never_imports_the_trainer(tmp_path):
    """The Trainer's module is where wrapper-checkpoints waits; the refusal must not wait with it."""
    for layout in LAYOUTS:
        write_wrapper_state_dict(tmp_path / layout.replace(" ", "-"), layout)
    script = textwrap.dedent(f"""
        import os, sys
        import higgs_patch
        higgs_patch.apply()
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import tiny
        for layout, file in {FILES!r}.items():
            try:
                tiny.HiggsAudioModel.from_pretrained(os.path.join({str(tmp_path)!r}, layout.replace(" ", "-")))
            except higgs_patch.InputError as error:
                assert file in str(error) and "'higgs.'" in str(error), error
            else:
                raise SystemExit(f"{{layout}} loaded")
        assert "transformers.trainer" not in sys.modules
        print("refused")
    """)
    done = subprocess.run([sys.executable, "-P", "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "refused" in done.stdout, done.stdout[-2000:] + done.stderr[-3000:]
