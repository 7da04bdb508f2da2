"""The LoRA check: does ``get_peft_model`` work here? Tried, not inferred from version numbers.

compat/matrix.toml knows the peft releases that crash on the torch it has seen; a crash it does not
know (another torch, a new peft) would still pass a version check. So, when peft is installed and no
rule already fails it, doctor wraps a one-layer module with LoRA in a fresh interpreter, as a training
script would (torch and transformers imported first, nothing else): a few seconds, nothing written.
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


def check_lora(facts: dict[str, Any], version_check: Check) -> Check | None:
    """None when there is nothing to try: peft not installed, or already failed by a known-bad rule."""
    version = installed_version("peft")
    if version is None or version_check.level == FAIL:
        return None
    env = {k: v for k, v in os.environ.items() if k != "HIGGS_PATCH_ACTIVATE"}
    try:
        done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env,
                              timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        outcome = f"did not finish in {TIMEOUT} s"
    else:
        lines = done.stdout.strip().splitlines() or done.stderr.strip().splitlines() or [f"exit {done.returncode}"]
        outcome = "ok" if done.returncode == 0 else lines[-1]
    facts["peft_lora"] = {"works": outcome == "ok", "outcome": outcome}
    if outcome == "ok":
        return Check(CHECK, OK, f"get_peft_model wraps a one-layer module and trains it (peft {version})")
    known = next((rule for rule in upstream.known_bad() if rule.distribution == "peft"), None)
    fix = known.fix if known else "pip install a peft release that compat/matrix.toml lists as tested"
    return Check(CHECK, FAIL, f"get_peft_model on a one-layer module, in a fresh interpreter, failed: {outcome}", fix)
