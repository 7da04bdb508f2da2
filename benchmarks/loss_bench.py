"""Benchmark 1: the loss hook (``higgs_patch.higgs_audio_loss``), forward + backward, on CPU.

Three ways to compute the same loss on the same synthetic model output:

- reference: one plain ``F.cross_entropy`` over the text logits viewed as (B*T, V), labels shifted by
  padding (``F.pad(labels, (0, 1), value=-100)[:, 1:]``), plus one over all audio codebooks at once;
- hook: ``higgs_patch.higgs_audio_loss(outputs, batch).loss``;
- seed: the seed's approach, ``logits[:, :-1].contiguous()``, boolean-mask indexing
  ``logits[valid_mask]``, one ``cross_entropy`` per codebook (with the audio shift the seed forgot,
  so that all give the same value);
- gather (for information, not a goal): the reference, but the text cross-entropy runs only on the
  rows with a label (``index_select`` of the supervised rows, labels shifted by padding, no slice
  copy). It shows what skipping the -100 rows would save where most text labels are -100.

The total is the mean of the text and audio means, as the hook's default is.

Time: all three in this process, interleaved, median over repeats. Peak memory: every run in a fresh
interpreter (``python benchmarks/loss_bench.py --memory VARIANT``) so that no allocator state is
shared; it warms the same operations up on a small input, allocates the full inputs, resets the
kernel's peak-RSS mark, runs forward + backward once and reports peak RSS minus the RSS just before.
That growth includes ``logits.grad`` (the same 262 MB for every variant).
"""

from __future__ import annotations

import gc
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from harness import Row, child_main, interleave, median, now, paired, peak_bytes, reset_peak, rss_bytes, run_child

IGNORE = -100
FULL = dict(batch=2, tokens=1024, vocab=32000, audio_tokens=500, codebooks=8, codebook_vocab=1026)
WARMUP = dict(batch=2, tokens=64, vocab=512, audio_tokens=64, codebooks=8, codebook_vocab=130)


@dataclass
class Inputs:
    logits: torch.Tensor  # (B, T, V), requires grad
    labels: torch.Tensor  # (B, T), the model's expanded_labels
    audio_logits: torch.Tensor  # (N, C, V_a), requires grad
    audio_labels: torch.Tensor  # (C, N), the batch's label_audio_ids

    def clear_grads(self) -> None:
        self.logits.grad = None
        self.audio_logits.grad = None


def make_inputs(batch, tokens, vocab, audio_tokens, codebooks, codebook_vocab, seed=0) -> Inputs:
    """A realistic layout: per row a prompt and the audio-out positions are -100, row 1 ends in padding.

    Audio: two audio-out segments, each ``[-100, codes..., eos]`` per codebook, as the collator builds
    them. Tensors are filled in place (no temporaries), so the RSS before a measurement is its peak.
    """
    g = torch.Generator().manual_seed(seed)
    logits = torch.empty(batch, tokens, vocab).normal_(generator=g).requires_grad_()
    labels = torch.randint(0, vocab, (batch, tokens), generator=g)
    prompt, audio_span = tokens // 4, audio_tokens // batch
    labels[:, :prompt] = IGNORE
    labels[:, prompt:prompt + audio_span] = IGNORE
    labels[batch - 1, tokens - tokens // 8:] = IGNORE
    audio_logits = torch.empty(audio_tokens, codebooks, codebook_vocab).normal_(generator=g).requires_grad_()
    audio_labels = torch.randint(0, codebook_vocab - 2, (codebooks, audio_tokens), generator=g)
    segment = audio_tokens // 2
    for start in (0, segment):
        audio_labels[:, start] = IGNORE
        audio_labels[:, min(start + segment, audio_tokens) - 1] = codebook_vocab - 1  # eos
    return Inputs(logits, labels, audio_logits, audio_labels)


def reference(x: Inputs) -> torch.Tensor:
    targets = F.pad(x.labels, (0, 1), value=IGNORE)[:, 1:]
    text = F.cross_entropy(x.logits.view(-1, x.logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE)
    audio_targets = F.pad(x.audio_labels, (0, 1), value=IGNORE)[:, 1:].t()  # (N, C), as audio_logits
    audio = F.cross_entropy(
        x.audio_logits.view(-1, x.audio_logits.shape[-1]), audio_targets.reshape(-1), ignore_index=IGNORE
    )
    return (text + audio) / 2


def hook(x: Inputs) -> torch.Tensor:
    from higgs_patch import higgs_audio_loss

    outputs = {"logits": x.logits, "expanded_labels": x.labels, "audio_logits": x.audio_logits}
    return higgs_audio_loss(outputs, {"label_audio_ids": x.audio_labels}).loss


def seed(x: Inputs) -> torch.Tensor:
    shift_logits = x.logits[:, :-1, :].contiguous()
    shift_labels = x.labels[:, 1:].contiguous()
    valid_mask = shift_labels != IGNORE
    text = F.cross_entropy(shift_logits[valid_mask], shift_labels[valid_mask])
    per_codebook = []
    for codebook in range(x.audio_logits.shape[1]):
        codebook_logits = x.audio_logits[:-1, codebook, :].contiguous()
        codebook_labels = x.audio_labels[codebook, 1:]
        valid_mask = codebook_labels != IGNORE
        per_codebook.append(F.cross_entropy(codebook_logits[valid_mask], codebook_labels[valid_mask]))
    audio = torch.stack(per_codebook).mean()
    return (text + audio) / 2


def gather(x: Inputs) -> torch.Tensor:
    targets = F.pad(x.labels, (0, 1), value=IGNORE)[:, 1:].reshape(-1)
    rows = (targets != IGNORE).nonzero().squeeze(1)
    text = F.cross_entropy(x.logits.flatten(0, 1).index_select(0, rows), targets.index_select(0, rows))
    audio_targets = F.pad(x.audio_labels, (0, 1), value=IGNORE)[:, 1:].t()
    audio = F.cross_entropy(
        x.audio_logits.view(-1, x.audio_logits.shape[-1]), audio_targets.reshape(-1), ignore_index=IGNORE
    )
    return (text + audio) / 2


VARIANTS = {"reference": reference, "hook": hook, "seed": seed, "gather": gather}
LABELS = {"reference": "plain F.cross_entropy", "hook": "higgs_audio_loss", "seed": "seed approach",
          "gather": "valid-row gather"}


def forward_backward(variant, x: Inputs) -> float:
    x.clear_grads()
    loss = variant(x)
    loss.backward()
    return loss.item()


def measure_memory(name: str) -> dict:
    """In a fresh interpreter: peak RSS growth of one forward + backward of ``name``."""
    variant = VARIANTS[name]
    forward_backward(variant, make_inputs(**WARMUP))  # thread pools, autograd, kernels: not the loss's cost
    x = make_inputs(**FULL)
    gc.collect()
    method = reset_peak()
    before = rss_bytes()
    forward_backward(variant, x)
    return {"growth": peak_bytes() - before, "before": before, "method": method}


def run(quick: bool) -> list[Row]:
    repeats, memory_runs = (3, 1) if quick else (7, 3)
    x = make_inputs(**FULL)
    values: dict[str, float] = {}

    def timed(name):
        def once() -> float:
            start = now()
            values[name] = forward_backward(VARIANTS[name], x)
            return now() - start
        return once

    times = interleave({name: timed(name) for name in VARIANTS}, repeats)
    ignored = float((x.labels == IGNORE).float().mean())
    del x
    gc.collect()

    # Peak RSS is per process, so two children at a time (one per core) do not disturb each other.
    order = [name for index in range(memory_runs)
             for name in (VARIANTS if index % 2 == 0 else reversed(list(VARIANTS)))]
    with ThreadPoolExecutor(max_workers=2) as pool:
        found = list(pool.map(lambda name: run_child("loss_bench.py", "--memory", name), order))
    memory: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for name, result in zip(order, found):
        memory[name].append(result["growth"] / 2**20)
    method = found[0]["method"]

    ms = {name: [t * 1e3 for t in found] for name, found in times.items()}
    shape = (f"B={FULL['batch']} T={FULL['tokens']} V={FULL['vocab']} ({ignored:.0%} of text labels -100); "
             f"audio N={FULL['audio_tokens']} C={FULL['codebooks']} V_a={FULL['codebook_vocab']}; "
             f"{repeats} interleaved repeats")
    notes = {
        "hook": {"time": shape, "memory": f"fresh process per run, {memory_runs} run(s) each; {method}; "
                                          "includes logits.grad"},
        "seed": {"time": f"the hook takes {median(ms['hook']) / median(ms['seed']):.0%} of the seed's time",
                 "memory": f"hook minus seed: {median(memory['hook']) - median(memory['seed']):+.0f} MiB"},
        "gather": {"time": "not a goal: skips the -100 rows", "memory": "not a goal: skips the -100 rows"},
    }
    reference_label = LABELS["reference"]
    rows = []
    for name in ("hook", "seed", "gather"):
        goal = "<= 1.30" if name == "hook" else "info"
        rows.append(Row("loss", "fwd+bwd time", "ms", reference_label, median(ms["reference"]), LABELS[name],
                        median(ms[name]), goal=goal, **paired(ms["reference"], ms[name]),
                        note=notes[name]["time"], samples={"reference": ms["reference"], name: ms[name]}))
    for name in ("hook", "seed", "gather"):
        goal = "<= 1.15" if name == "hook" else "info"
        rows.append(Row("loss", "peak RSS growth", "MiB", reference_label, median(memory["reference"]),
                        LABELS[name], median(memory[name]), goal=goal, note=notes[name]["memory"],
                        samples={"reference": memory["reference"], name: memory[name]}))
    for name in ("hook", "seed", "gather"):
        diff = abs(values[name] - values["reference"])
        same = diff <= 1e-5 * abs(values["reference"])
        rows.append(Row("loss", "loss value", "", reference_label, values["reference"], LABELS[name],
                        values[name], goal="same" if name == "hook" else "info", ratio=None,
                        passed=same if name == "hook" else None, note=f"|diff| = {diff:.1e}"))
    return rows


if __name__ == "__main__":
    child_main(__doc__.splitlines()[0], measure_memory, VARIANTS)
