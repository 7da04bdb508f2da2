"""What every benchmark shares: a clock, interleaved repeats, medians, result rows, peak-RSS accounting.

Timings on a shared machine drift, so a candidate is never compared with a reference measured at
another moment: ``interleave`` runs one repeat of every variant in turn, reversing the order every
other repeat (A B, B A, ...). Every value reported is a median over those repeats, and a ratio is
the median of the per-repeat ratios (``paired``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

HERE = os.path.dirname(os.path.abspath(__file__))

# The clock every benchmark reads. "cpu": CPU time of the calling thread, so time spent descheduled
# while other people's jobs hold the cores is not counted (right when torch runs on this one thread);
# "wall": time.perf_counter. Children inherit the choice through CLOCK_VARIABLE.
CLOCKS = {"cpu": time.thread_time, "wall": time.perf_counter}
CLOCK_VARIABLE = "HIGGS_PATCH_BENCH_CLOCK"
_clock = CLOCKS[os.environ.get(CLOCK_VARIABLE, "cpu")]


def use_clock(kind: str) -> None:
    global _clock
    _clock = CLOCKS[kind]
    os.environ[CLOCK_VARIABLE] = kind


def now() -> float:
    return _clock()


def timed_child(command: list[str], env: dict[str, str]) -> float:
    """Seconds a child process took: its user + system CPU time on the "cpu" clock, else wall time."""
    if _clock is time.perf_counter:
        start = time.perf_counter()
        subprocess.run(command, env=env, check=True)
        return time.perf_counter() - start
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(command, env=env, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


@dataclass
class Row:
    """One line of the table: a candidate against a reference measured in the same run."""

    benchmark: str
    metric: str
    unit: str
    reference_label: str
    reference: float | None  # None for an absolute measurement
    candidate_label: str
    candidate: float
    goal: str = "info"  # e.g. "<= 1.30", ">= 1.00", or "info" where the issue sets none
    # candidate / reference: for interleaved repeats the median of the per-repeat ratios (see paired),
    # otherwise the ratio of the two values; None where a ratio means nothing
    ratio: float | None = None
    spread: tuple[float, float] | None = None  # 25th-75th percentile of the per-repeat ratios
    passed: bool | None = None
    note: str = ""
    samples: dict[str, list[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.ratio is None and self.reference:  # neither None nor 0
            self.ratio = self.candidate / self.reference
        self.passed = _judge(self.goal, self.ratio) if self.passed is None else self.passed

    def as_json(self) -> dict:
        return asdict(self)


def _judge(goal: str, ratio: float | None) -> bool | None:
    match = re.fullmatch(r"(<=|>=)\s*([0-9.]+)", goal.strip())
    if match is None or ratio is None:
        return None
    bound = float(match.group(2))
    return ratio <= bound if match.group(1) == "<=" else ratio >= bound


def interleave(variants: dict[str, Callable[[], float]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run each variant ``warmup`` times (discarded), then ``repeats`` times in alternating order.

    A variant is a callable that does its own untimed set-up and returns the seconds (or any
    measure) of the part that counts.
    """
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    found: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else reversed(names):
            found[name].append(variants[name]())
    return found


def median(values: list[float]) -> float:
    return statistics.median(values)


def paired(reference: list[float], candidate: list[float]) -> dict:
    """The ratio of an interleaved measurement: the median of the per-repeat ratios candidate / reference.

    Each repeat's candidate ran next to that repeat's reference, so drift in the machine's load cancels
    in its ratio; the 25th-75th percentiles of those ratios are the noise band shown beside it.
    """
    ratios = [c / r for r, c in zip(reference, candidate)]
    if len(ratios) < 2:
        return {"ratio": ratios[0], "spread": (ratios[0], ratios[0])}
    low, middle, high = statistics.quantiles(ratios, n=4, method="inclusive")
    return {"ratio": middle, "spread": (low, high)}


def clean_env() -> dict[str, str]:
    """This environment without HIGGS_PATCH_ACTIVATE: apply() publishes it, and children must not inherit it."""
    env = {k: v for k, v in os.environ.items() if k != "HIGGS_PATCH_ACTIVATE"}
    env.setdefault("PYTHONHASHSEED", "0")
    return env


def run_child(script: str, *args: str, timeout: float = 300) -> dict:
    """Run ``python benchmarks/<script> args...`` in a fresh interpreter; it prints one JSON object last."""
    done = subprocess.run(
        [sys.executable, os.path.join(HERE, script), *args],
        env=clean_env(), capture_output=True, text=True, timeout=timeout,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{script} {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def child_main(description: str, measure: Callable[[str], dict], variants) -> None:
    """What ``run_child`` runs: ``--memory NAME`` measures one variant and prints its JSON last."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--memory", choices=sorted(variants), required=True)
    print(json.dumps(measure(parser.parse_args().memory)))


# -- peak resident memory ------------------------------------------------------------------------

def _status_kib(key: str) -> int:
    with open("/proc/self/status") as handle:
        return int(re.search(rf"^{key}:\s+(\d+) kB", handle.read(), re.M).group(1))


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def reset_peak() -> str:
    """Reset the kernel's peak-RSS mark to the current RSS; say which method the peak then uses.

    Linux resets VmHWM when "5" is written to /proc/self/clear_refs (since 4.0). Where that is not
    allowed we fall back to ru_maxrss, which is only right in a fresh process whose earlier peak
    was below its current RSS (the children here allocate nothing big before measuring).
    """
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return "VmHWM after /proc/self/clear_refs reset"
    except OSError:
        return "ru_maxrss in a fresh process"


def peak_bytes() -> int:
    try:
        return _status_kib("VmHWM") * 1024
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
