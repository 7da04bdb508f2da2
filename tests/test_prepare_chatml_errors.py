"""prepare-chatml-errors: boson's prepare_chatml_sample raises its real error, reproduced unpatched first."""

from __future__ import annotations

import dacite
import pytest
import tiny
from boson_multimodal.data_types import ChatMLSample, Message
from boson_multimodal.dataset import chatml_dataset

import higgs_patch

PATCH = "prepare-chatml-errors"


def recipient_on_a_user_message() -> ChatMLSample:
    return ChatMLSample(messages=[Message(role="user", content="w1 w2", recipient="w3"),
                                  Message(role="assistant", content="w4")])


MALFORMED_DICT = {"messages": [{"role": "user", "content": 3}]}  # content must be text or audio
WELL_FORMED = {"messages": [{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": "w4 w5"}],
               "start_index": 1}


@pytest.mark.core
def test_unpatched_the_real_error_is_hidden_behind_a_type_error_or_four_nones(capsys):
    with pytest.raises(TypeError, match="Object of type ChatMLSample is not JSON serializable"):
        chatml_dataset.prepare_chatml_sample(recipient_on_a_user_message(), tiny.tokenizer())
    assert chatml_dataset.prepare_chatml_sample(dict(MALFORMED_DICT), tiny.tokenizer()) == (None, None, None, None)
    assert "Failed to convert to ChatMLSample" in capsys.readouterr().out  # the real error: printed only


@pytest.mark.core
def test_patched_the_real_error_is_raised_and_revert_restores_upstream():
    with higgs_patch.applied(PATCH):
        with pytest.raises(AssertionError, match="Recipient is only available for assistant role") as raised:
            chatml_dataset.prepare_chatml_sample(recipient_on_a_user_message(), tiny.tokenizer())
        assert raised.traceback[-1].name == "prepare_chatml_sample"  # raised where it happened, not in the patch
        with pytest.raises(dacite.DaciteError, match="messages.content"):
            chatml_dataset.prepare_chatml_sample(dict(MALFORMED_DICT), tiny.tokenizer())
    with pytest.raises(TypeError, match="not JSON serializable"):
        chatml_dataset.prepare_chatml_sample(recipient_on_a_user_message(), tiny.tokenizer())


@pytest.mark.core
def test_patched_a_well_formed_conversation_tokenizes_as_before_and_json_still_serializes():
    expected = chatml_dataset.prepare_chatml_sample(dict(WELL_FORMED), tiny.tokenizer())
    higgs_patch.apply()
    assert [s.state for s in higgs_patch.status() if s.id == PATCH] == ["applied"]
    assert chatml_dataset.prepare_chatml_sample(dict(WELL_FORMED), tiny.tokenizer()) == expected
    assert expected[1] == [-100] * 10 + [4, 5, 255]  # the assistant's words and <|eot_id|>
    assert chatml_dataset.json.dumps({"a": [1]}) == '{"a": [1]}'
