"""device-tensor-factory: the collator makes its tensors on the device of the batch's audio codes.

On a CPU-only machine the ``meta`` device stands in for a GPU: upstream's collator fails on it exactly
as it fails on ``cuda:0`` (``torch.cat`` of a CPU tensor it created with an audio-codes tensor).
"""

from __future__ import annotations

import pytest
import torch

import boson_multimodal.data_collator.higgs_audio_collator as collator_module
import higgs_patch
import tiny

PATCH = "device-tensor-factory"
AUDIO_FIELDS = ("audio_out_ids", "audio_out_ids_start", "audio_out_ids_start_group_loc", "audio_in_ids",
                "audio_in_ids_start", "label_audio_ids")


def on_meta(count: int = 2, **kwargs):
    return [tiny.sample(seed=i, device="meta", target=5 + i, **kwargs) for i in range(count)]


def on_cpu(count: int = 2, **kwargs):
    return [tiny.sample(seed=i, target=5 + i, **kwargs) for i in range(count)]


@pytest.mark.parametrize("overrides", [dict(), dict(use_delay_pattern=True), dict(return_audio_in_tokens=False)],
                         ids=["plain", "delay", "no-audio-in-tokens"])
@pytest.mark.core
@pytest.mark.parametrize("patches", [(PATCH,), ()], ids=["alone", "all-defaults"])
def test_meta_codes_fail_unpatched_collate_patched_and_fail_again_after_revert(overrides, patches):
    collator = tiny.collator(**overrides)
    with pytest.raises(RuntimeError, match="device"):
        collator(on_meta())

    cpu = collator(on_cpu())  # the same samples on CPU, upstream: the shapes to expect
    with higgs_patch.applied(*patches):
        batch = collator(on_meta())
    for name in AUDIO_FIELDS:
        value, expected = getattr(batch, name), getattr(cpu, name)
        if expected is None:
            assert value is None, name
            continue
        assert value.device.type == "meta", name
        assert value.shape == expected.shape and value.dtype == expected.dtype, name
    for name in ("input_ids", "attention_mask", "label_ids"):  # made from the token ids, which are on CPU
        assert torch.equal(getattr(batch, name), getattr(cpu, name)), name

    with pytest.raises(RuntimeError, match="device"):
        collator(on_meta())


def test_a_clamped_short_sample_on_meta_collates():
    collator = tiny.collator(return_audio_in_tokens=False)
    with higgs_patch.applied():
        batch = collator([tiny.sample(device="meta"), tiny.sample(seed=1, reference=None, device="meta")])
        cpu = collator([tiny.sample(), tiny.sample(seed=1, reference=None)])
    for name in ("audio_out_ids", "label_audio_ids", "audio_out_ids_start"):
        assert getattr(batch, name).device.type == "meta", name
        assert getattr(batch, name).shape == getattr(cpu, name).shape, name


@pytest.mark.parametrize("overrides", [dict(), dict(use_delay_pattern=True), dict(pad_left=True), dict(round_to=1),
                                       dict(return_audio_in_tokens=False)])
def test_all_cpu_batches_are_upstreams(overrides, assert_same_batch):
    collator = tiny.collator(**overrides)
    expected = collator(on_cpu(3))
    with higgs_patch.applied(PATCH):
        got = collator(on_cpu(3))
    assert_same_batch(got, expected)


def test_the_device_is_chosen_per_call_and_forgotten_after_it_even_after_an_error():
    collator = tiny.collator()
    broken = [tiny.sample(device="meta"), tiny.sample(seed=1, reference=None, device="meta")]  # upstream IndexError
    with higgs_patch.applied(PATCH):
        assert collator(on_meta()).audio_out_ids.device.type == "meta"
        assert collator(on_cpu()).audio_out_ids.device.type == "cpu"
        with pytest.raises(IndexError):
            collator(broken)
        assert collator(on_cpu()).audio_out_ids.device.type == "cpu"
        # outside a collator call the module's factories make what torch makes
        assert collator_module.torch.zeros(2).device.type == "cpu"
        assert collator_module.torch.full((1,), 3).device.type == "cpu"


def test_only_the_collator_module_sees_a_view_and_revert_puts_torch_back():
    assert collator_module.torch is torch
    with higgs_patch.applied(PATCH):
        view = collator_module.torch
        assert view is not torch and view.__wrapped__ is torch
        assert view.long is torch.long and view.cat is torch.cat  # everything else reads straight through
        assert view.full is not torch.full and view.full.__wrapped__ is torch.full
        torch.higgs_patch_added_later = object()
        try:
            assert view.higgs_patch_added_later is torch.higgs_patch_added_later
        finally:
            del torch.higgs_patch_added_later
        assert torch.full((1,), 0).device.type == "cpu"
    assert collator_module.torch is torch


def test_an_explicit_device_is_left_alone_and_only_factories_move():
    from higgs_patch.fixes import device_tensor_factory

    with higgs_patch.applied(PATCH):
        token = device_tensor_factory._device.set(torch.device("meta"))  # as inside a collator call on meta codes
        try:
            assert collator_module.torch.full((2,), 1).device.type == "meta"
            assert collator_module.torch.tensor([0, 1]).device.type == "meta"
            assert collator_module.torch.zeros(2, device="cpu").device.type == "cpu"
            assert collator_module.torch.ones_like(torch.ones(2)).device.type == "cpu"  # follows its input
            assert torch.zeros(2).device.type == "cpu"  # torch itself is untouched
        finally:
            device_tensor_factory._device.reset(token)
