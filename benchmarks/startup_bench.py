"""Benchmark 4: ``apply()`` / ``revert()`` latency, and what the start-up hook costs an interpreter.

apply / revert: in a fresh interpreter (``python benchmarks/startup_bench.py --apply``) that has
imported the upstream model, collator and ``transformers.trainer``: the first ``apply()`` (loads the
declarations and fingerprints the upstream code), the first ``revert()``, then the median of
further apply / revert cycles.

Start-up hook: ``higgs_patch.pth`` sits in site-packages and runs one line at every start. It cannot
be uninstalled here (the venv is shared), so both sides are rebuilt the same way: two temporary
directories hold copies of every ``*.pth`` of site-packages, one without ``higgs_patch.pth``;
``python -S`` (no automatic site) then runs ``site.addsitedir(<dir>)`` with site-packages on
``sys.path``, which processes those .pth files exactly as start-up does. The two commands differ by
the hook alone. HIGGS_PATCH_ACTIVATE is unset (plugin installed, not activated). We report the
median wall time of each over interleaved runs, the modules ``-X importtime`` sees one import and
not the other (the hook must import nothing), and the cost of executing the line itself.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import timeit

from harness import Row, clean_env, interleave, median, now, paired, run_child, timed_child

HOOK = "higgs_patch.pth"


def measure_apply(cycles: int) -> dict:
    """In a fresh interpreter: ms of the first apply/revert and the median of ``cycles`` more."""
    import boson_multimodal.data_collator.higgs_audio_collator  # noqa: F401
    import boson_multimodal.model.higgs_audio.modeling_higgs_audio  # noqa: F401
    import transformers.trainer  # noqa: F401

    import higgs_patch

    def timed(call) -> float:
        start = now()
        call()
        return (now() - start) * 1e3

    found = {"first_apply": timed(higgs_patch.apply), "first_revert": timed(higgs_patch.revert)}
    applies, reverts = [], []
    for _ in range(cycles):
        applies.append(timed(higgs_patch.apply))
        reverts.append(timed(higgs_patch.revert))
    applied = [s.id for s in higgs_patch.apply() if s.state == "applied"]
    higgs_patch.revert()
    return {**found, "apply": statistics.median(applies), "revert": statistics.median(reverts), "patches": applied}


def _site_dirs(root: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    purelib = pathlib.Path(sysconfig.get_paths()["purelib"])
    with_hook, without_hook = root / "with", root / "without"
    with_hook.mkdir()
    without_hook.mkdir()
    for pth in sorted(purelib.glob("*.pth")):
        shutil.copy(pth, with_hook / pth.name)
        if pth.name != HOOK:
            shutil.copy(pth, without_hook / pth.name)
    if not (with_hook / HOOK).exists():
        raise RuntimeError(f"{HOOK} is not in {purelib}: install higgs-patch (pip install .) first")
    return with_hook, without_hook


def _start_command(site_dir: pathlib.Path, *flags: str) -> list[str]:
    purelib = sysconfig.get_paths()["purelib"]
    code = f"import sys, site; sys.path.append({purelib!r}); site.addsitedir({str(site_dir)!r})"
    return [sys.executable, *flags, "-S", "-c", code]


def _imported(command: list[str]) -> set[str]:
    done = subprocess.run(command[:1] + ["-X", "importtime"] + command[1:], env=clean_env(),
                          capture_output=True, text=True, check=True)
    return {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()
            if line.startswith("import time:") and "imported package" not in line}


def _line_ns(number: int) -> float:
    purelib = pathlib.Path(sysconfig.get_paths()["purelib"])
    line = (purelib / HOOK).read_text().strip()
    code = compile(line, HOOK, "exec")
    return timeit.Timer(lambda: exec(code, {}), timer=now).timeit(number) / number * 1e9


def run(quick: bool) -> list[Row]:
    applied = run_child("startup_bench.py", "--apply", "--cycles", "5" if quick else "20")
    note = f"fresh process, upstream imported; patches: {', '.join(applied['patches'])}"
    rows = [
        Row("apply/revert", "latency", "ms", "-", None, "first apply()", applied["first_apply"],
            note=note + "; loads declarations, fingerprints upstream"),
        Row("apply/revert", "latency", "ms", "-", None, "apply() again", applied["apply"],
            note="median of later apply/revert cycles"),
        Row("apply/revert", "latency", "ms", "-", None, "first revert()", applied["first_revert"]),
        Row("apply/revert", "latency", "ms", "-", None, "revert() again", applied["revert"]),
    ]

    runs = 20 if quick else 100
    with tempfile.TemporaryDirectory(prefix="higgs-patch-bench-") as tmp:
        with_hook, without_hook = _site_dirs(pathlib.Path(tmp))
        env = clean_env()

        def start(site_dir):
            command = _start_command(site_dir)
            return lambda: timed_child(command, env) * 1e3

        ms = interleave({"without": start(without_hook), "with": start(with_hook)}, runs, warmup=2)
        extra = _imported(_start_command(with_hook)) - _imported(_start_command(without_hook))
    rows.append(Row("start-up hook", "python start", "ms", "without higgs_patch.pth", median(ms["without"]),
                    "with higgs_patch.pth", median(ms["with"]), goal="<= 1.05",
                    **paired(ms["without"], ms["with"]),
                    note=f"python -S + site.addsitedir(copy of site-packages .pth files); {runs} interleaved runs; "
                         "goal is a noise bound chosen here", samples=ms))
    rows.append(Row("start-up hook", "imported by the hook", "modules", "without", 0, "with", len(extra),
                    goal="none", ratio=None, passed=not extra,
                    note="python -X importtime, set difference: " + (", ".join(sorted(extra)) or "nothing")))
    rows.append(Row("start-up hook", "executing the line", "ns", "-", None, HOOK, _line_ns(20_000),
                    note="HIGGS_PATCH_ACTIVATE unset: one environment lookup"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--apply", action="store_true", required=True)
    parser.add_argument("--cycles", type=int, default=20)
    print(json.dumps(measure_apply(parser.parse_args().cycles)))


if __name__ == "__main__":
    main()
