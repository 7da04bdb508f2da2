"""Training under the patches trains the right thing: the tiny model generates its training targets back.

The real stock Trainer with the default patches, the real upstream model (DualFFN, delay pattern on) and
its own ``generate``; the seed's unshifted audio loss trained the same way is the contrast, measured in
the same test. Removing the audio shift from ``higgs_audio_loss`` makes these tests fail (checked once
by mutation: the patched run then measures exactly as the unshifted one).
"""

from __future__ import annotations

import pytest
import torch

from higgs_patch.commands import learnability


@pytest.fixture(scope="module")
def comparison() -> learnability.Comparison:
    return learnability.compare()


def _shown(generation: learnability.Generation) -> str:
    got = None if generation.codes is None else generation.codes.tolist()
    return f"generated {got}, target {generation.target.tolist()}, text {generation.text}"


@pytest.mark.core
def test_patched_training_generates_every_training_target(comparison):
    patched = comparison.patched
    assert len(patched.generations) >= 4
    assert patched.plateau_step is not None, f"no plateau in {patched.steps} steps: {patched.history[-5:]}"
    audio, text = patched.audio_accuracy, patched.text_accuracy
    assert audio >= learnability.REQUIRED_ACCURACY
    assert text >= learnability.REQUIRED_ACCURACY
    for generation in patched.generations:
        assert generation.exact, _shown(generation)
        # the text head ran free too: it opened the audio, and closed the turn after upstream's <|audio_eos|>
        assert generation.text[0] == learnability.AUDIO_OUT_BOS, _shown(generation)
        assert generation.text[-2:] == [learnability.AUDIO_EOS, learnability.EOT], _shown(generation)
    assert comparison.problems() == []


def test_unshifted_loss_falls_as_far_but_its_model_does_not_generate_the_targets(comparison):
    patched, unshifted = comparison.patched, comparison.unshifted
    # What a user of the seed's loss sees: it plateaus near zero, and "accuracy" at the same position is perfect.
    assert unshifted.plateau_step is not None
    assert unshifted.final_audio_loss < 2 * patched.final_audio_loss
    same_position, text = unshifted.audio_same_position_accuracy, unshifted.text_accuracy
    assert same_position >= learnability.REQUIRED_ACCURACY
    assert text >= learnability.REQUIRED_ACCURACY  # the text loss is the same in both runs
    # What it learned: to copy its input, not to predict the next code; and it generates none of its targets.
    next_code, copied = unshifted.audio_accuracy, patched.audio_same_position_accuracy
    assert next_code < 0.5
    assert unshifted.exact_matches == 0, [_shown(g) for g in unshifted.generations if g.exact]
    assert copied < 0.5


def test_targets_are_a_function_of_the_text_and_the_delay_pattern_is_on():
    data = learnability.examples()
    targets = {tuple(example.target.flatten().tolist()) for example in data}
    assert len(targets) == len(data), "two samples share a target: there would be less to learn"
    for example in data:
        assert torch.equal(learnability.target_codes(example.words), example.target)
        # the words are the prompt's text: the target is a function of what the model reads
        assert example.words.tolist() in example.prompt.input_ids.unfold(0, learnability.WORDS, 1).tolist()
    batch = learnability.collator()([data[0].sample])
    codebooks = batch.audio_out_ids.shape[0]
    # upstream's delay pattern: codebook k starts k stream-bos codes late and ends k codes later
    assert batch.audio_out_ids.shape[1] == learnability.FRAMES + 2 + codebooks - 1
    for k in range(1, codebooks):
        assert (batch.audio_out_ids[k, : k + 1] == learnability.tiny.AUDIO_BOS).all()
        assert (batch.label_audio_ids[k, : k + 1] == -100).all()


@pytest.mark.core
def test_command_prints_the_table_and_passes():
    from click.testing import CliRunner

    from higgs_patch.commands.cli import main

    result = CliRunner().invoke(main, ["learnability"])
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if "generated targets equal" in line)
    count = learnability.SAMPLES
    assert row.split()[-2:] == [f"{count}/{count}", f"0/{count}"]
    assert "learnability: passed" in result.output
