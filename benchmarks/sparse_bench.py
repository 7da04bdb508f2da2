"""Benchmark 5: ``sparse-text-logits`` against the dense path, one training step of a tiny model.

A tiny Higgs Audio model with the real 128,256-token text vocabulary and one voice-clone sample of
2,048 expanded positions (a 7-token prompt, a 1,000-frame reference, a 1,000-frame target and a
41-token supervised answer: 2% of the positions predict a supervised text token). Forward, loss
(``higgs_audio_loss``) and backward, with the default patches, with and without the opt-in patch.
Time: interleaved in this process. Memory: peak RSS growth of one step, each in a fresh interpreter
(see harness.reset_peak), after a warm-up step on a short sample.
"""

from __future__ import annotations

import gc
from concurrent.futures import ThreadPoolExecutor

import torch

import higgs_patch
from harness import Row, child_main, interleave, median, now, paired, peak_bytes, reset_peak, rss_bytes, run_child

VOCAB = 128_256
PROMPT, ANSWER, REFERENCE, TARGET = 7, 41, 998, 998  # 7 + 41 + (998 + 2) + (998 + 2) = 2,048 positions
VARIANTS = {"dense": (), "sparse": ("sparse-text-logits",)}


def model():
    from higgs_patch.commands import tiny

    return tiny.model(text_config={**tiny.config().text_config.to_dict(), "vocab_size": VOCAB}).train()


def batch(reference: int = REFERENCE, target: int = TARGET) -> dict:
    from higgs_patch.commands import tiny

    sample = tiny.sample(text=PROMPT, reference=reference, target=target, answer=ANSWER)
    return tiny.DictCollator(tiny.collator(round_to=1))([sample])


def step(net, inputs: dict, patches: tuple[str, ...]) -> float:
    net.zero_grad(set_to_none=True)
    with higgs_patch.applied(*patches):
        outputs = net(**inputs)
        loss = higgs_patch.higgs_audio_loss(outputs, inputs).loss
        loss.backward()
    return loss.item()


def measure_memory(name: str) -> dict:
    """In a fresh interpreter: peak RSS growth of one training step of ``name``."""
    higgs_patch.apply()
    net = model()
    step(net, batch(reference=8, target=8), VARIANTS[name])  # thread pools, kernels, parameter grads
    inputs = batch()
    gc.collect()
    method = reset_peak()
    before = rss_bytes()
    value = step(net, inputs, VARIANTS[name])
    return {"growth": peak_bytes() - before, "method": method, "loss": value}


def run(quick: bool) -> list[Row]:
    repeats, memory_runs = (3, 1) if quick else (7, 2)
    higgs_patch.apply()
    net, inputs = model(), batch()
    expanded = net(**{k: v for k, v in inputs.items() if k != "labels"}).expanded_labels
    supervised = int((torch.nn.functional.pad(expanded, (0, 1), value=-100)[:, 1:] != -100).sum())
    values: dict[str, float] = {}

    def timed(name):
        def once() -> float:
            start = now()
            values[name] = step(net, inputs, VARIANTS[name])
            return now() - start
        return once

    times = interleave({name: timed(name) for name in VARIANTS}, repeats)
    higgs_patch.revert()
    del net, inputs
    gc.collect()

    order = [name for index in range(memory_runs) for name in (VARIANTS if index % 2 == 0 else reversed(list(VARIANTS)))]
    with ThreadPoolExecutor(max_workers=2) as pool:
        found = list(pool.map(lambda name: run_child("sparse_bench.py", "--memory", name), order))
    memory: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for name, result in zip(order, found):
        memory[name].append(result["growth"] / 2**20)

    ms = {name: [t * 1e3 for t in found] for name, found in times.items()}
    shape = (f"V={VOCAB}, {expanded.shape[1]} expanded positions, {supervised} supervised text targets "
             f"({supervised / expanded.shape[1]:.1%}); {repeats} interleaved repeats")
    memory_ratio = median(memory["dense"]) / median(memory["sparse"])
    diff = abs(values["sparse"] - values["dense"])
    return [
        Row("sparse-text-logits", "step time", "ms", "dense", median(ms["dense"]), "sparse", median(ms["sparse"]),
            goal="<= 1.00", **paired(ms["dense"], ms["sparse"]), note=shape, samples=ms),
        Row("sparse-text-logits", "peak RSS growth", "MiB", "dense", median(memory["dense"]), "sparse",
            median(memory["sparse"]), goal="<= 0.20",
            note=f"{memory_ratio:.1f}x smaller; fresh process per run, {memory_runs} run(s) each; {found[0]['method']}",
            samples=memory),
        Row("sparse-text-logits", "loss value", "", "dense", values["dense"], "sparse", values["sparse"],
            goal="same", ratio=None, passed=diff <= 1e-5 * abs(values["dense"]), note=f"|diff| = {diff:.1e}"),
    ]


if __name__ == "__main__":
    child_main(__doc__.splitlines()[0], measure_memory, VARIANTS)
