import logging
import os

import pytest

import higgs_patch
import needed

# Child interpreters must import the installed plugin, as this one does (python -P), never the source
# tree in the working directory: the source tree has no start-up hook.
os.environ["PYTHONSAFEPATH"] = "1"


# On a transformers line boson_multimodal was not written for, it imports and runs only with the shims in
# place, applied before it is imported (as users must): every test starts from that stack. On 4.46 none is needed.
SHIMS = needed.shims()


def _only_the_shims() -> None:
    higgs_patch.revert()
    if SHIMS:
        higgs_patch.apply(*SHIMS)


_only_the_shims()


@pytest.fixture(autouse=True)
def _no_patch_leaks():
    """Every test starts and ends with nothing applied but the shims this line needs, whatever it did."""
    _only_the_shims()
    yield
    _only_the_shims()


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state, and TrainingArguments(bf16=True) leaves
    ACCELERATE_MIXED_PRECISION=bf16 in the environment for every later Trainer: both are put back."""
    from accelerate.state import AcceleratorState

    saved = {k: v for k, v in os.environ.items() if k.startswith("ACCELERATE_")}
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    for name in [k for k in os.environ if k.startswith("ACCELERATE_")]:
        del os.environ[name]
    os.environ.update(saved)


@pytest.fixture
def patch_log(caplog):
    caplog.set_level(logging.INFO, logger="higgs_patch")
    return caplog


def _assert_same_batch(got, expected) -> None:
    """Two collated batches (HiggsAudioBatchInput or dict) are equal field by field: torch.equal, None == None."""
    import dataclasses

    import torch

    def as_dict(batch) -> dict:
        return batch if isinstance(batch, dict) else {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}

    got, expected = as_dict(got), as_dict(expected)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert isinstance(got[name], torch.Tensor), name
            assert got[name].device == value.device, name
            assert got[name].dtype == value.dtype, name
            assert got[name].shape == value.shape, name
            if value.device.type != "meta":
                assert torch.equal(got[name], value), name
        else:
            assert got[name] == value, name


@pytest.fixture
def assert_same_batch():
    """``assert_same_batch(got, expected)``: collated batches equal field by field."""
    return _assert_same_batch


def _copy_upstream_with_edit(root, old: bytes, new: bytes, module: str = "data_collator/higgs_audio_collator.py"):
    """A copy of the installed boson_multimodal under ``root`` with ``old`` replaced by ``new`` once in ``module``."""
    import shutil
    from pathlib import Path

    import boson_multimodal

    shutil.copytree(Path(boson_multimodal.__file__).parent, Path(root) / "boson_multimodal",
                    ignore=shutil.ignore_patterns("__pycache__"))
    target = Path(root) / "boson_multimodal" / module
    source = target.read_bytes()
    assert source.count(old) == 1, old
    target.write_bytes(source.replace(old, new))
    return Path(root)


@pytest.fixture(scope="session")
def copy_upstream_with_edit():
    """``copy_upstream_with_edit(root, old, new)``: a copy of the upstream, edited, to put on PYTHONPATH."""
    return _copy_upstream_with_edit


@pytest.fixture(scope="module")
def edited_upstream(tmp_path_factory):
    """A copy of the installed upstream with one token of the collator's __call__ changed."""
    import shutil

    import boson_multimodal.data_collator.higgs_audio_collator as collator_module

    root = tmp_path_factory.mktemp("edited")
    shutil.copytree(os.path.dirname(os.path.dirname(collator_module.__file__)), root / "boson_multimodal")
    target = root / "boson_multimodal" / "data_collator" / "higgs_audio_collator.py"
    source = target.read_bytes()
    target.write_bytes(source.replace(b"value=-100)", b"value=-99)", 1))
    assert target.read_bytes() != source
    return root
