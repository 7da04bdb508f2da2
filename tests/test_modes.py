"""A forward with labels runs, and returns the same loss, in every autograd mode the unpatched one runs in.

``torch.inference_mode()`` is the usual validation loop (Lightning's default for validation), and
boson's ``generate`` runs in it: tensors made there carry no in-place version counter, which the loss
cache read (``RuntimeError: Inference tensors do not track version counter``).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import higgs_patch
import tiny

MODES = {
    "inference_mode": torch.inference_mode,
    "no_grad": torch.no_grad,
    "with gradients": contextlib.nullcontext,
}


def forward(mode: str, batch: dict):
    model = tiny.model().eval()
    with MODES[mode]():
        return model(**batch)


@pytest.fixture(scope="module")
def batch() -> dict:
    return tiny.fields(tiny.collator()(tiny.samples(2)))


@pytest.mark.core
@pytest.mark.parametrize("mode", MODES)
def test_the_unpatched_forward_with_labels_runs_in_every_mode(mode, batch):
    outputs = forward(mode, batch)
    assert outputs.loss is None and outputs.expanded_labels is not None


@pytest.mark.core
def test_the_loss_with_labels_is_the_same_under_inference_mode_no_grad_and_with_gradients(batch):
    with higgs_patch.applied():
        losses = {mode: forward(mode, batch).loss for mode in MODES}
        again = higgs_patch.higgs_audio_loss(forward("inference_mode", batch), batch).loss
    assert losses["with gradients"].requires_grad and losses["with gradients"].item() > 0
    for mode, loss in losses.items():
        assert torch.equal(loss.detach(), losses["with gradients"].detach()), mode
    assert torch.equal(again, losses["inference_mode"])


@pytest.mark.core
def test_the_loss_of_an_output_made_under_inference_mode_is_scored_afresh_after_an_in_place_change(batch):
    with higgs_patch.applied(), torch.inference_mode():
        outputs = tiny.model().eval()(**batch)
        first = higgs_patch.higgs_audio_loss(outputs, batch).loss
        outputs.logits.mul_(0)  # in place, where torch counts no version: the cache must not answer
        changed = higgs_patch.higgs_audio_loss(outputs, batch).loss
    assert not torch.equal(first, changed)


@pytest.mark.core
def test_generate_with_label_ids_behaves_as_unpatched():
    """boson's generate runs in inference mode and hands ``label_ids`` to the forward of its first step."""
    from test_shims import GENERATION_SEED, generate

    unpatched = generate(tiny.model(seed=GENERATION_SEED, use_delay_pattern=True).eval(), "one", label_ids=True)
    with higgs_patch.applied():
        patched = generate(tiny.model(seed=GENERATION_SEED, use_delay_pattern=True).eval(), "one", label_ids=True)
    assert len(patched) == len(unpatched)
    for got, expected in zip(patched, unpatched):
        assert (got is None and expected is None) or torch.equal(torch.as_tensor(got), torch.as_tensor(expected))
