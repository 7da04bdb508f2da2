"""transformers' own Higgs Audio v2 learns to stop with the native patches, and not without.

The same training (processor labels, optimizer, steps, seed) with and without the native patches, then
upstream's greedy ``generate``: patched, each prompt's training codes and a stop at frame T + K + 1;
unpatched (every end-of-stream code hidden from the labels), all ``MAX_FRAMES`` frames.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers.models.higgs_audio_v2", reason="transformers' own Higgs Audio v2 ships from 5.3")

from higgs_patch.commands import learnability_native as check  # noqa: E402
from higgs_patch.commands import tiny_native  # noqa: E402

pytestmark = [pytest.mark.core, pytest.mark.native]


@pytest.fixture(scope="module")
def runs():
    return check.compare()


def test_patched_the_native_model_generates_its_codes_and_stops(runs):
    patched, _ = runs
    for generation, frames in zip(patched.generations, check.FRAMES):
        assert generation.exact, (generation.generated, generation.target)
        assert len(generation.generated) == frames + tiny_native.CODEBOOKS + 1  # T + K + 1


def test_unpatched_the_same_training_never_stops(runs):
    _, unpatched = runs
    assert all(len(g.generated) == check.MAX_FRAMES and not g.stopped for g in unpatched.generations)
    assert check.problems(*runs) == []
    assert check.problems(unpatched, unpatched)  # the unpatched model fails the proof


def test_the_command_passes():
    command = shutil.which("higgs-patch", path=str(Path(sys.executable).parent))
    done = subprocess.run([command, "learnability", "--native"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "never stopped" in done.stdout and "the training codes, then stopped" in done.stdout
