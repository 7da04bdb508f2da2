"""torchrun for the DDP tests: both ranks in their own process group, killed together after TIMEOUT."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import torch

TESTS = str(Path(__file__).parent)
TIMEOUT = 180  # seconds each rank may live; a hang shows as a failed test, never as a stuck suite


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(folder: Path, code: str, cases: dict, patched: bool = True, timeout: int = TIMEOUT) -> subprocess.CompletedProcess | None:
    """Both ranks of ``code`` in their own process group, killed together after TIMEOUT; None if they were."""
    script = folder / "ddp.py"
    script.write_text(code)
    runner = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    command = [runner, "--nproc_per_node=2", f"--master_port={free_port()}", str(script), str(folder),
               json.dumps(cases), "patched" if patched else "unpatched", str(timeout)]
    environ = {k: v for k, v in os.environ.items() if k != "HIGGS_PATCH_ACTIVATE"}
    environ.update(PYTHONPATH=TESTS, OMP_NUM_THREADS="1")
    log = folder / "torchrun.log"
    with open(log, "w") as output:  # not a pipe: a surviving rank would keep it open
        launch = subprocess.Popen(command, cwd=folder, env=environ, stdout=output, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        try:
            launch.wait(timeout=timeout + 30)
        except subprocess.TimeoutExpired:
            os.killpg(launch.pid, signal.SIGKILL)  # the ranks' own alarm has ended them by now
            launch.wait()
            return None
    return subprocess.CompletedProcess(command, launch.returncode, log.read_text(), "")


def results(folder: Path, case: str) -> list[dict]:
    return [torch.load(folder / f"{case}.rank{rank}.pt") for rank in (0, 1)]


