"""The memory model of the released model and ``higgs-patch memory`` (checked against CPU runs by benchmarks/)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from higgs_patch.commands import memory
from higgs_patch.commands.cli import main

GIB = 2**30


def by_variant(estimates) -> dict[str, memory.Estimate]:
    return {e.variant: e for e in estimates}


def test_the_released_config_built_on_meta_has_the_released_size():
    counts = memory.parameters()
    assert 5.6e9 < counts.total < 5.9e9  # about 3.6 B text + 2.2 B audio
    # r 1 on q, k, v, o (3,072 -> 3,072 / 1,024) and both FFNs (3,072 <-> 8,192), per layer, 28 layers
    per_layer = (3072 + 3072) * 2 + (3072 + 1024) * 2 + 2 * 3 * (3072 + 8192)
    assert counts.lora_per_rank == 28 * per_layer


def test_lora_at_4096_positions_with_both_patches_fits_16_gib_where_the_plain_path_needs_over_35():
    found = by_variant(memory.estimate(4096, batch=1, lora=16))
    assert found["both"].total < 16 * GIB
    assert found["plain"].total > 35 * GIB
    assert found["both"].weights == found["plain"].weights == memory.parameters().total * 2
    assert found["both"].activations < found["gradient-checkpointing"].activations < found["plain"].activations
    assert found["both"].activations < found["sparse-text-logits"].activations < found["plain"].activations


def test_activations_grow_with_positions_layers_and_supervision():
    figures = memory.measured_figures()

    def peak(**changes):
        settings = dict(layers=28, positions=4096, supervised=82, checkpointing=False, sparse=True)
        return memory.activation_peak(figures, **{**settings, **changes})

    assert peak(positions=8192, supervised=164) > 1.9 * peak()
    share = 1 + figures.backward_per_layer  # saved by the layer, plus what backward holds of it
    assert peak(layers=29) - peak() == pytest.approx(4096 * figures.layer * share)
    assert peak(checkpointing=True, layers=29) - peak(checkpointing=True) == pytest.approx(
        4096 * figures.layer_checkpointed * share)
    assert peak(checkpointing=True) - peak() < 0  # what checkpointing saves far exceeds the layer it recomputes
    assert peak(supervised=4096) > peak()
    assert peak(sparse=False) == peak(supervised=4096)  # dense: every position has a text-logit row


def test_a_full_fine_tune_keeps_gradients_and_optimizer_moments_for_every_parameter():
    full = by_variant(memory.estimate(2048, lora=None))["plain"]
    lora = by_variant(memory.estimate(2048, lora=16))["plain"]
    assert full.states == memory.parameters().total * memory.FULL_STATE_BYTES
    assert lora.states == memory.parameters().lora_per_rank * 16 * memory.LORA_STATE_BYTES
    assert full.activations == lora.activations


@pytest.mark.parametrize("settings, message", [
    (dict(seq=0), "seq, batch and layers must be positive"),
    (dict(seq=4096, lora=0), "LoRA rank must be positive"),
    (dict(seq=4096, supervised_fraction=1.5), "between 0 and 1"),
])
def test_bad_settings_are_errors_that_say_what_is_wrong(settings, message):
    with pytest.raises(ValueError, match=message):
        memory.estimate(**settings)


def test_the_command_prints_the_four_variants_and_its_assumptions():
    result = CliRunner().invoke(main, ["memory", "--seq", "4096", "--lora", "16"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "LoRA r 16, batch 1 x 4,096 positions" in lines[0]
    for variant in memory.VARIANTS:
        assert any(line.strip().startswith(variant + " ") for line in lines), variant
    both = next(line for line in lines if line.strip().startswith("both "))
    assert both.rstrip().endswith("16 GiB")
    assert "Assumptions:" in result.output and "Activation figures:" in result.output


def test_the_command_as_json_and_its_usage_errors():
    result = CliRunner().invoke(main, ["memory", "--seq", "2048", "--full", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["lora"] is None and [e["variant"] for e in report["estimates"]] == list(memory.VARIANTS)
    expected = by_variant(memory.estimate(2048, lora=None))
    assert all(e["total"] == pytest.approx(expected[e["variant"]].total) for e in report["estimates"])
    for arguments in (["--seq", "0"], ["--supervised", "2"], ["--lora", "0"]):
        bad = CliRunner().invoke(main, ["memory", *arguments])
        assert bad.exit_code == 2 and arguments[0] in bad.output
