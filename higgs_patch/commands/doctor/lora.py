"""The LoRA check: does ``get_peft_model`` work here? Tried, not inferred from version numbers.

compat/matrix.toml knows the peft releases that crash on the torch it has seen; a crash it does not
know (another torch, a new peft) would still pass a version check. So, when peft is installed and no
rule already fails it, doctor wraps a one-layer module with LoRA in a fresh interpreter, as a training
script would (torch and transformers imported first, nothing else), while doctor imports the stack
itself: a few seconds, counted with the imports, nothing written.
A fresh interpreter, because doctor's own imports could hide the crash (peft 0.18 to 0.21 work once
something has imported ``torch.distributed.tensor``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from ... import upstream
from .report import FAIL, OK, Check, installed_version

CHECK = "peft LoRA"
TIMEOUT = 120  # seconds; importing torch, transformers and peft takes a few
#: What a training script does, reduced to one layer: the last line it prints is the verdict.
PROBE = """
import torch, transformers
from peft import LoraConfig, get_peft_model

class OneLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.q_proj(x)

try:
    wrapped = get_peft_model(OneLayer(), LoraConfig(r=2, target_modules=["q_proj"]))
    wrapped(torch.ones(1, 4)).sum().backward()
except Exception as exc:
    print(f"{type(exc).__name__}: {exc}".splitlines()[0])
    raise SystemExit(1)
print("ok")
"""


def start() -> subprocess.Popen | None:
    """Start the probe in a fresh interpreter, to run beside doctor's own imports; None without peft."""
    if installed_version("peft") is None:
        return None
    env = {k: v for k, v in os.environ.items() if k != "HIGGS_PATCH_ACTIVATE"}
    return subprocess.Popen([sys.executable, "-c", PROBE], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)


def finish(probe: subprocess.Popen | None) -> str | None:
    """The probe's outcome: "ok", or the one line saying what failed; None when none was started."""
    if probe is None:
        return None
    try:
        stdout, stderr = probe.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        probe.kill()
        probe.communicate()
        return f"did not finish in {TIMEOUT} s"
    if probe.returncode == 0:
        return "ok"
    lines = stdout.strip().splitlines() or stderr.strip().splitlines() or [f"exit {probe.returncode}"]
    return lines[-1]


def check_lora(facts: dict[str, Any], version_check: Check, outcome: str | None) -> Check | None:
    """None when there is nothing to report: peft not installed, or already failed by a known-bad rule."""
    if outcome is None or version_check.level == FAIL:
        return None
    facts["peft_lora"] = {"works": outcome == "ok", "outcome": outcome}
    if outcome == "ok":
        return Check(CHECK, OK, f"get_peft_model wraps a one-layer module and trains it (peft {installed_version('peft')})")
    known = next((rule for rule in upstream.known_bad() if rule.distribution == "peft"), None)
    fix = known.fix if known else "pip install a peft release that compat/matrix.toml lists as tested"
    return Check(CHECK, FAIL, f"get_peft_model on a one-layer module, in a fresh interpreter, failed: {outcome}", fix)
