"""Benchmark 3: the ``forward-kwargs-filter`` patch on ``HiggsAudioModel.forward``.

- A tiny real model's forward (``higgs_patch.commands.tiny``, eval mode, no grad, so the wrapper's share is
  as large as it gets) without and with the patch: with the same keyword arguments (the patch's
  fast path), and with what the Trainer / PEFT pass (``labels`` instead of ``label_ids`` and
  ``num_items_in_batch``) against the unpatched forward called with the equivalent ``label_ids``.
  Calls alternate one by one between the patched model and an unpatched twin (see _model_variants).
- The wrapper alone, on a trivial method with the forward's kind of signature: higgs_patch's slot
  (one ``wrapt.FunctionWrapper`` running the fix's layer) against a bare ``wrapt.FunctionWrapper``
  whose wrapper only calls through, both installed on a class and called on an instance.
"""

from __future__ import annotations

import copy
import timeit
import types

import torch
import wrapt

import higgs_patch
from harness import Row, interleave, median, now, paired

PATCH = "forward-kwargs-filter"


def _model_variants(model, batch):
    """One call each, on the same weights: the patched class, and a twin whose forward is the original.

    Switching by apply / revert costs milliseconds and disturbs the caches, so both sides stay
    installed and every repeat is a single call: the twin is a shallow copy of the model whose class
    is a subclass with ``forward`` set back to the very function the patch wraps.
    """
    from boson_multimodal.model.higgs_audio.modeling_higgs_audio import HiggsAudioModel

    original = vars(HiggsAudioModel)["forward"].__wrapped__
    twin = copy.copy(model)
    twin.__class__ = type("UnpatchedHiggsAudioModel", (HiggsAudioModel,), {"forward": original})
    trainer_kwargs = {k: v for k, v in batch.items() if k != "label_ids"}
    trainer_kwargs.update(labels=batch["label_ids"], num_items_in_batch=7)

    def call(target, kwargs):
        def once() -> float:
            start = now()
            target(**kwargs)
            return now() - start
        return once

    return {
        "unpatched": call(twin, batch),
        "patched, same kwargs": call(model, batch),
        "patched, Trainer kwargs": call(model, trainer_kwargs),
    }


def _pass_through(wrapped, instance, args, kwargs):
    return wrapped(*args, **kwargs)


class _Target:
    def forward(self, input_ids=None, attention_mask=None, label_ids=None, label_audio_ids=None):
        return input_ids


def _wrapper_calls(number: int) -> dict[str, float]:
    """ns per call of the trivial method: bare, under a bare wrapt pass-through, under our slot."""
    from higgs_patch.fixes.forward_kwargs_filter import filter_kwargs
    from higgs_patch.slots import Slot

    module = types.ModuleType("higgs_patch_benchmark_target")
    module.Bare = type("Bare", (_Target,), {})
    module.Wrapt = type("Wrapt", (_Target,), {})
    module.Slotted = type("Slotted", (_Target,), {})
    module.Wrapt.forward = wrapt.FunctionWrapper(_Target.forward, _pass_through)
    slot = Slot("higgs_patch_benchmark_target:Slotted.forward", module, "Slotted.forward")
    layer = filter_kwargs(slot.original, {})
    slot.add(layer)
    try:
        bare, plain, ours = module.Bare(), module.Wrapt(), module.Slotted()
        calls = {
            "unwrapped": lambda: bare.forward(input_ids=1, attention_mask=2, label_ids=3),
            "bare wrapt pass-through": lambda: plain.forward(input_ids=1, attention_mask=2, label_ids=3),
            "higgs_patch, fast path": lambda: ours.forward(input_ids=1, attention_mask=2, label_ids=3),
            "higgs_patch, filter path": lambda: ours.forward(input_ids=1, attention_mask=2, labels=3,
                                                             num_items_in_batch=4),
        }
        return {name: timeit.Timer(call, timer=now).timeit(number) / number * 1e9 for name, call in calls.items()}
    finally:
        slot.remove(layer)


def run(quick: bool) -> list[Row]:
    from higgs_patch.commands import tiny

    repeats = 60 if quick else 400
    model = tiny.model().eval()
    batch = tiny.fields(tiny.collator()(tiny.samples(4)))
    with higgs_patch.applied(PATCH), torch.no_grad():
        seconds = interleave(_model_variants(model, batch), repeats, warmup=5)
    ms = {name: [s * 1e3 for s in found] for name, found in seconds.items()}
    rows = [
        Row("forward-kwargs-filter", "tiny forward", "ms", "unpatched", median(ms["unpatched"]), name,
            median(ms[name]), goal="<= 1.05", **paired(ms["unpatched"], ms[name]),
            note=f"{repeats} interleaved single calls each; " + (
                "same kwargs as unpatched" if "same" in name else
                "labels + num_items_in_batch vs unpatched with label_ids"),
            samples={"unpatched": ms["unpatched"], name: ms[name]})
        for name in ("patched, same kwargs", "patched, Trainer kwargs")
    ]

    number, micro_repeats = (20_000, 3) if quick else (100_000, 7)
    found: dict[str, list[float]] = {}
    for _ in range(micro_repeats):
        for name, ns in _wrapper_calls(number).items():
            found.setdefault(name, []).append(ns)
    unwrapped = median(found["unwrapped"])
    for name in ("higgs_patch, fast path", "higgs_patch, filter path"):
        rows.append(Row("wrapper alone", "per call", "ns", "bare wrapt pass-through",
                        median(found["bare wrapt pass-through"]), name, median(found[name]),
                        **paired(found["bare wrapt pass-through"], found[name]),
                        note=f"unwrapped call {unwrapped:.0f} ns; {micro_repeats} x {number} calls",
                        samples={k: found[k] for k in ("bare wrapt pass-through", name)}))
    return rows
