"""Run the higgs-patch benchmarks: each candidate as a ratio against a reference measured in the same run.

    python benchmarks/run.py [--quick] [--json PATH] [--only loss,collator,forward,startup,sparse,memory,convert]
                             [--threads N] [--clock cpu|wall] [--layers 2|4]

Prints the machine, a table (reference, candidate, ratio with its interquartile band over repeats,
goal, PASS / FAIL / info) and notes, and writes everything as JSON (default
benchmarks/results/latest.json). Exits 1 if any goal fails. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SUITES = ("loss", "collator", "forward", "startup", "sparse", "memory", "convert")


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, for smoke-testing")
    parser.add_argument("--json", default=os.path.join(HERE, "results", "latest.json"), help="where to write results")
    parser.add_argument("--only", default=",".join(SUITES), help=f"comma-separated subset of {','.join(SUITES)}")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: on a shared machine OpenMP barrier waits make "
                             "multi-threaded timings of small ops erratic)")
    parser.add_argument("--clock", choices=("cpu", "wall"),
                        help="cpu: CPU time of the measuring thread (children: their CPU time), immune to time "
                             "spent descheduled; the default with one thread. wall: perf_counter; the default, "
                             "and the only choice, with more threads")
    parser.add_argument("--layers", type=int, choices=(2, 4), default=2,
                        help="decoder layers of the memory benchmark's released-width model (4: about 8 GiB of RAM)")
    arguments = parser.parse_args()
    arguments.clock = arguments.clock or ("cpu" if arguments.threads == 1 else "wall")
    if arguments.clock == "cpu" and arguments.threads != 1:
        parser.error("--clock cpu measures one thread: use it with --threads 1")
    unknown = set(arguments.only.split(",")) - set(SUITES)
    if unknown:
        parser.error(f"unknown suite(s) {sorted(unknown)}; choose from {SUITES}")
    return arguments


def machine() -> dict:
    import torch
    import transformers
    import wrapt

    model = "unknown"
    try:
        with open("/proc/cpuinfo") as handle:
            model = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or model
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "wrapt": wrapt.__version__,
    }


def _value(value: float | None, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, int):
        return f"{value:,} {unit}".strip()
    digits = 4 if unit == "" else (0 if abs(value) >= 100 else 2 if abs(value) < 10 else 1)
    return f"{value:,.{digits}f} {unit}".strip()


def _ratio(row) -> str:
    if row.ratio is None:
        return "-"
    text = f"{row.ratio:.3f}x"
    if row.spread is not None:
        text += f" [{row.spread[0]:.2f}-{row.spread[1]:.2f}]"
    return text


def table(rows) -> str:
    header = ("benchmark", "metric", "reference", "candidate", "ratio [p25-p75]", "goal", "result")
    lines = [header]
    for row in rows:
        reference = f"{row.reference_label}: {_value(row.reference, row.unit)}" if row.reference is not None else "-"
        result = "info" if row.passed is None else ("PASS" if row.passed else "FAIL")
        lines.append((row.benchmark, row.metric, reference, f"{row.candidate_label}: {_value(row.candidate, row.unit)}",
                      _ratio(row), row.goal, result))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = [" | ".join(cell.ljust(width) for cell, width in zip(line, widths)) for line in lines]
    out.insert(1, "-+-".join("-" * width for width in widths))
    notes = [f"  [{index}] {row.benchmark} / {row.candidate_label}: {row.note}"
             for index, row in enumerate(rows, 1) if row.note]
    return "\n".join(out + ["", "notes:"] + notes)


def main() -> int:
    arguments = _arguments()
    # Before torch is imported, here and in every child process (they inherit the environment).
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[name] = str(arguments.threads)
    sys.path.insert(0, HERE)
    import harness

    harness.use_clock(arguments.clock)
    import collator_bench
    import convert_bench
    import forward_bench
    import loss_bench
    import memory_bench
    import sparse_bench
    import startup_bench

    modules = {"loss": loss_bench, "collator": collator_bench, "forward": forward_bench, "startup": startup_bench,
               "sparse": sparse_bench, "memory": memory_bench,
               "convert": convert_bench}
    memory_bench.LAYERS = arguments.layers
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores ({info['usable_cores']} usable), {info['memory_gib']} GiB, "
          f"load {info['load_average']}; python {info['python']}, torch {info['torch']} "
          f"({info['torch_threads']} thread(s)), transformers {info['transformers']}, wrapt {info['wrapt']}")
    print(f"mode: {'quick' if arguments.quick else 'full'}; clock: {arguments.clock}; suites: {arguments.only}\n",
          flush=True)

    started = time.perf_counter()
    rows, seconds = [], {}
    for suite in arguments.only.split(","):
        begin = time.perf_counter()
        print(f"running {suite} ...", flush=True)
        rows.extend(modules[suite].run(arguments.quick))
        seconds[suite] = round(time.perf_counter() - begin, 1)
    total = round(time.perf_counter() - started, 1)

    print()
    print(table(rows))
    failed = [row for row in rows if row.passed is False]
    print(f"\n{len(failed)} goal(s) failed; took {total} s ({', '.join(f'{k} {v} s' for k, v in seconds.items())})")

    report = {
        "command": " ".join([os.path.relpath(sys.executable), *sys.argv]),
        "mode": "quick" if arguments.quick else "full",
        "clock": arguments.clock,
        "machine": {**info, "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "seconds": {**seconds, "total": total},
        "rows": [row.as_json() for row in rows],
    }
    os.makedirs(os.path.dirname(os.path.abspath(arguments.json)), exist_ok=True)
    with open(arguments.json, "w") as handle:
        json.dump(report, handle, indent=2, default=str)
    print(f"wrote {arguments.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
