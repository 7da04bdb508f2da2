"""Every command at the edges of what it accepts: a usage error (exit 2) or a verdict, never a traceback,
never a false alarm on a healthy install; and every command reachable as Python users reach commands."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from higgs_patch.commands.cli import main

HUGE = "9" * 400


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def assert_usage_error(result, option: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    assert option in result.output


# --- memory ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, option", [
    (("--supervised", "nan"), "--supervised"),
    (("--seq", HUGE), "--seq"),
    (("--seq", "200000"), "--seq"),  # beyond the released model's 131,072 positions
    (("--batch", HUGE), "--batch"),
    (("--lora", HUGE), "--lora"),
    (("--lora", "4096"), "--lora"),  # above full rank of the narrowest adapted projection (1,024)
    (("--full", "--lora", "8"), "--lora"),  # one or the other: --full ignored the rank silently
], ids=lambda value: " ".join(value)[:40] if isinstance(value, tuple) else value)
def test_memory_refuses_what_it_cannot_estimate(args, option):
    assert_usage_error(invoke("memory", *args), option)
    assert_usage_error(invoke("memory", "--json", *args), option)


@pytest.mark.parametrize("args", [("--seq", "131072"), ("--lora", "1024"), ("--supervised", "0"),
                                  ("--supervised", "1"), ("--full",), ("--batch", "64")])
def test_memory_serves_the_edges_of_what_it_accepts(args):
    result = invoke("memory", "--json", *args)
    assert result.exit_code == 0, result.output
    totals = [row["total"] for row in json.loads(result.output)["estimates"]]
    assert len(totals) == 4 and all(math.isfinite(t) and t > 0 for t in totals)


# --- smoke ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", ["2", "3", "4"])
def test_smoke_with_few_steps_does_not_fail_a_healthy_install(steps):
    result = invoke("smoke", "--steps", steps, "--device", "cpu")
    assert result.exit_code == 0, result.output
    verdict = [line for line in result.output.splitlines() if line.startswith("smoke: ")][-1]
    assert verdict.startswith("smoke: passed: losses finite") and "falling" in verdict and "too few" in verdict


# --- run ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, named", [
    (("--option", "audio_index_policy=bad"), "audio_index_policy"),
    (("--option", "no_such_option=1"), "no_such_option"),
    (("--patch", "no-such-patch"), "no-such-patch"),
])
def test_run_refuses_options_and_ids_apply_does_not_allow_as_usage_errors(args, named):
    before = os.environ.get("HIGGS_PATCH_ACTIVATE")
    result = invoke("run", *args, "--", sys.executable, "-c", "pass")
    assert result.exit_code == 2 and named in result.output, result.output
    assert os.environ.get("HIGGS_PATCH_ACTIVATE") == before


# --- python -m ----------------------------------------------------------------------------------------


def commands() -> list[str]:
    return sorted(main.commands)


@pytest.mark.parametrize("module", ["higgs_patch", "higgs_patch.commands.cli"])
def test_every_command_is_reachable_with_python_m(module):
    for name in commands():
        done = subprocess.run([sys.executable, "-m", module, name, "--help"], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, (module, name, done.stderr)
        assert "Usage:" in done.stdout and name in done.stdout.splitlines()[0], done.stdout
    done = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "higgs-patch, version" in done.stdout
    done = subprocess.run([sys.executable, "-m", module, "memory", "--seq", "0"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr


def test_the_command_list_is_the_documented_one():
    assert commands() == sorted(["list", "doctor", "smoke", "learnability", "fingerprint", "run", "memory", "convert"])
    assert isinstance(main, click.Group)


# --- doctor: LoRA tried, not inferred ------------------------------------------------------------------


def doctor_json(pythonpath=None) -> tuple[int, dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("HIGGS_PATCH_FORCE", "PYTHONPATH", "HIGGS_PATCH_ACTIVATE")}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    done = subprocess.run([sys.executable, "-m", "higgs_patch", "doctor", "--json"], capture_output=True, text=True,
                          env=env, timeout=600)
    return done.returncode, json.loads(done.stdout)


def check(report: dict, name: str) -> dict:
    return next(c for c in report["checks"] if c["name"] == name)


def test_doctor_tries_lora_on_this_install():
    code, report = doctor_json()
    lora = check(report, "peft LoRA")
    assert code == 0 and lora["level"] == "ok" and "get_peft_model" in lora["detail"]
    assert report["environment"]["peft_lora"] == {"works": True, "outcome": "ok"}


def test_doctor_fails_a_peft_whose_lora_crashes_though_no_rule_knows_its_version(tmp_path):
    """A peft that no known-bad rule names (0.17.1 is tested good), crashing as peft 0.18.1+ does on torch >= 2.5."""
    (tmp_path / "peft-0.17.1.dist-info").mkdir()
    (tmp_path / "peft-0.17.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: peft\nVersion: 0.17.1\n")
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "__init__.py").write_text(
        "import torch\n__version__ = '0.17.1'\n"
        "class LoraConfig:\n    def __init__(self, **kwargs):\n        self.kwargs = kwargs\n"
        "def get_peft_model(model, config):\n"
        "    return isinstance(model.q_proj.weight, torch.distributed.tensor.DTensor)  # not imported first\n"
    )
    code, report = doctor_json(pythonpath=tmp_path)
    assert check(report, "peft")["level"] == "ok"  # the version alone looks fine
    lora = check(report, "peft LoRA")
    assert lora["level"] == "fail" and "has no attribute 'tensor'" in lora["detail"] and "peft==0.13.2" in lora["fix"]
    assert code == 1 and report["ok"] is False
