"""The layering written in pyproject.toml's import contracts holds, and the contracts catch what they forbid."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")



def lint(source: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` with this repository's contracts, on the ``higgs_patch`` package found in ``source``."""
    assert LINT.is_file(), f"no {LINT}: install the [test] extra, which has import-linter"
    env = {**os.environ, "PYTHONPATH": str(source)}
    env.pop("PYTHONSAFEPATH", None)
    return subprocess.run([str(LINT), "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=source, env=env,
                          capture_output=True, text=True, timeout=120)


def test_the_package_keeps_its_import_contracts():
    done = lint(ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


@pytest.mark.parametrize("module, line, contract", [
    ("engine.py", "from .commands import cli", "Rooms"),                   # the engine importing a command
    ("fixes/model_loss.py", "from ..commands import smoke", "Rooms"),      # a fix importing a command
    ("fixes/model_loss.py", "from .. import engine", "Rooms"),             # a fix importing the engine
    ("engine.py", "from . import startup", "Rooms"),                       # the engine <-> startup cycle, back
    ("commands/doctor/report.py", "from . import patches", "Doctor"),      # a cycle inside doctor
])
def test_an_import_against_the_layers_breaks_a_contract(tmp_path, module, line, contract):
    copy = tmp_path / "higgs_patch"
    shutil.copytree(ROOT / "higgs_patch", copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / module
    target.write_text(target.read_text(encoding="utf-8") + f"\n{line}  # noqa\n", encoding="utf-8")
    done = lint(tmp_path)
    assert done.returncode == 1, done.stdout[-3000:]
    verdict = re.search(rf"^{contract}:.*?(KEPT|BROKEN)$", done.stdout, re.S | re.M)
    assert verdict and verdict.group(1) == "BROKEN", done.stdout[-3000:]
