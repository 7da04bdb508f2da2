"""status() and applied() tell the state that holds now: after revert, with a bypassed patch, nested."""

from __future__ import annotations

import pytest

import higgs_patch
from higgs_patch import engine

import boson_multimodal.model.higgs_audio.modeling_higgs_audio as modeling


def states() -> dict[str, str]:
    return {s.id: s.state for s in higgs_patch.status()}


def options(patch_id: str) -> dict:
    return dict(next(s for s in higgs_patch.status() if s.id == patch_id).options)


def declared_defaults(patch_id: str) -> dict:
    return dict(engine.known()[patch_id].defaults)


def test_status_reports_the_declared_options_once_a_patch_is_reverted():
    higgs_patch.apply("model-loss", audio_loss_weight=0.5)
    assert options("model-loss")["audio_loss_weight"] == 0.5
    higgs_patch.revert("model-loss")
    assert states()["model-loss"] == "not-applied"
    assert options("model-loss") == declared_defaults("model-loss")  # not the options of a patch no longer there
    higgs_patch.apply("model-loss")
    assert options("model-loss") == declared_defaults("model-loss")


def test_applied_leaves_a_bypassed_patch_it_did_not_apply(replaced_forward_after_apply):
    assert states()["model-loss"] == "bypassed"
    with higgs_patch.applied():
        pass
    assert states()["model-loss"] == "bypassed"  # still the user's apply(): applied() did not apply it
    assert states()["forward-kwargs-filter"] == "bypassed"


@pytest.fixture
def replaced_forward_after_apply():
    higgs_patch.apply()
    saved = vars(modeling.HiggsAudioModel)["forward"]
    through = modeling.HiggsAudioModel.forward

    def forward(self, *args, **kwargs):
        return through(self, *args, **kwargs)

    modeling.HiggsAudioModel.forward = forward
    yield
    modeling.HiggsAudioModel.forward = saved
    higgs_patch.revert()


def test_nested_applied_blocks_revert_only_their_own():
    with higgs_patch.applied("model-loss"):
        with higgs_patch.applied() as inner:
            assert {s.id for s in inner} >= {"model-loss", "forward-kwargs-filter"}
            with higgs_patch.applied("model-loss"):
                pass
            assert states()["model-loss"] == "applied"
        assert states()["model-loss"] == "applied" and states()["forward-kwargs-filter"] == "not-applied"
    assert states()["model-loss"] == "not-applied"
