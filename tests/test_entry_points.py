"""Every entry point as a user enters it: a shell, a fresh interpreter, nothing applied beforehand.

conftest applies this line's shims in the test process; a subprocess inherits none of that (its
environment names no patch to activate), so each test here starts where a user starts. On every
transformers from 4.48 boson_multimodal does not even import unless the shims come first: a command
that imports it must put them in place itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_docs import README, blocks

pytestmark = pytest.mark.core


def fresh_env() -> dict[str, str]:
    """The test's environment less anything that would patch or redirect the child."""
    return {k: v for k, v in os.environ.items() if not k.startswith("HIGGS_PATCH_") and k != "PYTHONPATH"}


def script() -> list[str]:
    """The console script next to this interpreter, as pip installed it."""
    path = Path(sys.executable).with_name("higgs-patch")
    assert path.is_file(), f"no console script at {path}: install the plugin into this interpreter's environment"
    return [str(path)]


def module() -> list[str]:
    return [sys.executable, "-m", "higgs_patch"]


def shell(words: list[str], cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(words, capture_output=True, text=True, env=fresh_env(), cwd=cwd, timeout=timeout)


def said(done: subprocess.CompletedProcess) -> str:
    return f"exit {done.returncode}\n--- stdout\n{done.stdout[-4000:]}\n--- stderr\n{done.stderr[-4000:]}"


# (arguments, what its last verdict line says): every command of the CLI that does work
COMMANDS = [
    (["doctor"], "doctor: all good"),
    (["smoke", "--steps", "4", "--device", "cpu"], "smoke: passed"),
    (["smoke", "--steps", "2", "--device", "cpu", "--compare"], "smoke: passed"),
    (["learnability"], "learnability: passed"),
    (["memory", "--seq", "1024"], "Activation figures:"),
    (["list"], "forward-kwargs-filter"),
    (["fingerprint"], "[[release]]"),
]


@pytest.mark.parametrize("arguments, verdict", COMMANDS, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_every_command_runs_from_a_shell(arguments, verdict):
    done = shell(script() + arguments)
    assert done.returncode == 0, said(done)
    assert verdict in done.stdout, said(done)
    assert "Traceback" not in done.stderr, said(done)


def test_python_dash_m_is_the_same_command():
    done = shell(module() + ["smoke", "--steps", "2", "--device", "cpu"])
    assert done.returncode == 0, said(done)
    assert "smoke: passed" in done.stdout, said(done)


def test_run_patches_the_program_it_starts(tmp_path):
    program = tmp_path / "train.py"
    program.write_text(
        "import higgs_patch\n"
        "from boson_multimodal.model.higgs_audio.modeling_higgs_audio import HiggsAudioModel\n"
        "states = {s.id: s.state for s in higgs_patch.status()}\n"
        "assert states['model-loss'] == 'applied', states\n"
        "print('patched program ran')\n"
    )
    done = shell(script() + ["run", "--", sys.executable, str(program)], cwd=tmp_path)
    assert done.returncode == 0, said(done)
    assert "patched program ran" in done.stdout


def test_the_readmes_first_example_runs_as_a_script(tmp_path):
    where, code = next((w, c) for w, c in blocks("python") if w.startswith(README.name) and "trainer.train()" in c)
    example = tmp_path / "first_example.py"
    example.write_text(code)
    done = shell([sys.executable, str(example)], cwd=tmp_path)
    assert done.returncode == 0, f"{where}\n{said(done)}"
    assert "'model-loss'" in done.stdout and "applied" in done.stdout


def test_apply_then_importing_the_upstream_and_the_trainer_logs_no_warning():
    """A training script's first lines, on a stack the plugin is tested on: nothing to warn about. Before issue 26,
    on transformers 5.25 every apply() warned '(already-there) ... modeling_attn_mask_utils' (a shim whose target
    5.25 ships again)."""
    code = (
        "import logging, warnings\n"
        "records = []\n"
        "class Keep(logging.Handler):\n"
        "    def emit(self, record): records.append(f'{record.levelname}: {record.getMessage()}')\n"
        "logging.getLogger('higgs_patch').addHandler(Keep(logging.WARNING))\n"
        "import higgs_patch\n"
        "higgs_patch.apply()\n"
        "from boson_multimodal.model.higgs_audio.modeling_higgs_audio import HiggsAudioModel\n"
        "from boson_multimodal.data_collator.higgs_audio_collator import HiggsAudioSampleCollator\n"
        "from transformers import Trainer, TrainingArguments\n"
        "import sys\n"
        "from higgs_patch import engine\n"
        "# pending is right for a patch of a module the script never imports (5.x: transformers' own Higgs Audio v2)\n"
        "waits = {s.id for s in higgs_patch.status() if s.state == 'pending'\n"
        "         and not any(t.module in sys.modules for t in engine.known()[s.id].targets)}\n"
        "states = {s.state for s in higgs_patch.status() if s.id not in waits}\n"
        "assert not states & {'incompatible', 'bypassed', 'pending'}, higgs_patch.status()\n"
        "assert not records, records\n"
        "print('quiet')\n"
    )
    done = shell([sys.executable, "-c", code])
    assert done.returncode == 0, said(done)
    assert done.stdout.strip() == "quiet"
