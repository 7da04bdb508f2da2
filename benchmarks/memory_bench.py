"""Benchmark 6: gradient checkpointing and sparse-text-logits at the released widths, one LoRA step.

The released architecture (hidden 3,072, intermediate 8,192, 24 / 8 heads, vocabulary 128,256,
DualFFN on every layer with an audio FFN of 3,072 / 8,192, 8 codebooks of 1,024) with 2 decoder
layers (``--layers 4`` for 4) instead of 28, bf16 weights, random init; LoRA r 16 on attention, MLP
and audio MLP; one voice-clone sample of 2,048 expanded positions (2% predict a supervised text
token). Four variants: plain, checkpointing (``gradient_checkpointing_enable()``, transformers'
default: reentrant), sparse-text-logits, both. Each runs in a fresh interpreter: a warm-up step on a
short sample, then one measured step (forward, ``higgs_audio_loss``, backward): its peak RSS growth,
its CPU time, and the bytes it saved for backward (distinct storages, parameters excluded), per
decoder layer and outside them. The memory model (``higgs_patch.commands.memory``) is checked against it.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import sys

import torch

import higgs_patch
from harness import Row, median, now, peak_bytes, reset_peak, rss_bytes, run_child

VARIANTS = {
    "plain": dict(checkpointing=False, sparse=False),
    "checkpointing": dict(checkpointing=True, sparse=False),
    "sparse": dict(checkpointing=False, sparse=True),
    "both": dict(checkpointing=True, sparse=True),
}
PROMPT, ANSWER, POSITIONS = 7, 41, 2048  # 7 + 41 + (998 + 2) + (998 + 2) = 2,048 positions
LORA_RANK = 16
SPECIAL_TOKEN_IDS = ("pad_token_id", "audio_in_token_idx", "audio_out_token_idx", "audio_out_bos_token_id",
                     "audio_eos_token_id")
LAYERS = 2  # run.py --layers sets it


def model(layers: int, device: str = "cpu"):
    from peft import LoraConfig, get_peft_model

    from higgs_patch.commands import memory, tiny

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: no fp32 copy of 1.2 B parameters on the way
    try:
        from boson_multimodal.model.higgs_audio.modeling_higgs_audio import HiggsAudioModel

        with torch.device(device):
            # the special token ids of higgs_patch.commands.tiny's samples, which build the batch
            settings = {name: getattr(tiny.config(), name) for name in SPECIAL_TOKEN_IDS}
            net = HiggsAudioModel(memory.released_config(layers, **settings))
    finally:
        torch.set_default_dtype(torch.float32)
    config = LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=list(memory.LORA_TARGETS))
    return get_peft_model(net, config).train()


def batch(positions: int = POSITIONS) -> dict:
    """One voice-clone sample of ``positions`` expanded positions: prompt, reference, target, a 41-token answer."""
    from higgs_patch.commands import memory, tiny

    audio = (positions - PROMPT - ANSWER - 4) // 2  # each segment adds its bos and eos frames
    if audio < 1:
        raise ValueError(f"a sample needs more than {PROMPT + ANSWER + 4} positions (got {positions})")
    sample = tiny.sample(text=PROMPT, reference=audio, target=positions - PROMPT - ANSWER - 4 - audio, answer=ANSWER,
                         codebooks=memory.RELEASED["audio_num_codebooks"], codebook_size=memory.RELEASED["audio_codebook_size"])
    collator = tiny.collator(round_to=1, audio_num_codebooks=memory.RELEASED["audio_num_codebooks"],
                             audio_stream_bos_id=memory.RELEASED["audio_codebook_size"],
                             audio_stream_eos_id=memory.RELEASED["audio_codebook_size"] + 1)
    return tiny.DictCollator(collator)([sample])


class SavedBytes:
    """Bytes saved for backward during a forward, by the decoder layer that saved them (None: outside)."""

    def __init__(self, net, layers) -> None:
        self.parameters = {p.untyped_storage().data_ptr() for p in net.parameters()}
        self.owner: dict[int, tuple[int | None, int]] = {}
        self.current: list[int] = []
        self.handles = []
        for index, layer in enumerate(layers):
            self.handles.append(layer.register_forward_pre_hook(functools.partial(self._enter, index)))
            self.handles.append(layer.register_forward_hook(self._leave))

    def _enter(self, index: int, module, args) -> None:
        self.current.append(index)

    def _leave(self, module, args, output) -> None:
        self.current.pop()

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in self.parameters and key not in self.owner:
            self.owner[key] = (self.current[-1] if self.current else None, storage.nbytes())
        return tensor

    def by_layer(self, layers: int) -> tuple[list[int], int]:
        per_layer = [0] * layers
        outside = 0
        for owner, size in self.owner.values():
            if owner is None:
                outside += size
            else:
                per_layer[owner] += size
        return per_layer, outside

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def step(net, inputs: dict, saved: SavedBytes | None = None) -> float:
    net.zero_grad(set_to_none=True)
    hooks = torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t) if saved else contextlib.nullcontext()
    with hooks:
        outputs = net(**inputs)
        loss = higgs_patch.higgs_audio_loss(outputs, inputs).loss
    loss.backward()
    return loss.item()


def measure(name: str, layers: int, quick: bool) -> dict:
    """In a fresh interpreter: one measured step of ``name``."""
    flags = VARIANTS[name]
    higgs_patch.apply()
    if flags["sparse"]:
        higgs_patch.apply("sparse-text-logits")
    net = model(layers)
    if flags["checkpointing"]:
        net.gradient_checkpointing_enable()
    decoder = net.base_model.model.layers
    step(net, batch(96))  # thread pools, kernels, LoRA gradients
    inputs = batch(POSITIONS // 2 if quick else POSITIONS)
    gc.collect()
    saved = SavedBytes(net, decoder)
    method = reset_peak()
    before = rss_bytes()
    start = now()
    value = step(net, inputs, saved)
    seconds = now() - start
    growth = peak_bytes() - before
    saved.close()
    per_layer, outside = saved.by_layer(layers)
    labels = torch.nn.functional.pad(inputs["label_ids"], (0, 1), value=-100)[:, 1:]
    return {
        "variant": name, "layers": layers, "growth": growth, "seconds": seconds, "loss": value, "method": method,
        "saved_per_layer": per_layer, "saved_outside": outside,
        "positions": int(inputs["input_ids"].shape[1] + inputs["audio_in_ids"].shape[1] + inputs["audio_out_ids"].shape[1] - 2),
        "supervised_text": int((labels != -100).sum()),
    }


def run(quick: bool) -> list[Row]:
    from higgs_patch.commands import memory

    layers = LAYERS
    found = {name: run_child("memory_bench.py", "--memory", name, "--layers", str(layers), *(["--quick"] if quick else []),
                             timeout=1800)
             for name in VARIANTS}
    plain = found["plain"]
    mib = 2**20
    shape = (f"released widths, {layers} decoder layers, bf16, LoRA r {LORA_RANK}; {plain['positions']:,} expanded positions, "
             f"{plain['supervised_text']} supervised text targets; one step per variant, each in a fresh process")
    rows = []
    for name in ("checkpointing", "sparse", "both"):
        result = found[name]
        goal = {"both": "<= 0.25"}.get(name, "info")
        rows.append(Row("memory (real widths)", "peak RSS growth", "MiB", "plain", plain["growth"] / mib, name,
                        result["growth"] / mib, goal=goal, note=shape if name == "checkpointing" else ""))
    for name in ("checkpointing", "sparse", "both"):
        result = found[name]
        goal = {"checkpointing": "<= 1.40"}.get(name, "info")
        rows.append(Row("memory (real widths)", "step time", "s", "plain", plain["seconds"], name, result["seconds"], goal=goal))
    for name in ("checkpointing",):
        per_layer = median(found[name]["saved_per_layer"]) / mib
        rows.append(Row("memory (real widths)", "saved for backward per layer", "MiB", "plain",
                        median(plain["saved_per_layer"]) / mib, name, per_layer))
    for name in ("sparse", "both"):
        rows.append(Row("memory (real widths)", "saved outside the layers", "MiB", "plain", plain["saved_outside"] / mib,
                        name, found[name]["saved_outside"] / mib))
    for name, result in found.items():
        diff = abs(result["loss"] - plain["loss"])
        if name != "plain":
            rows.append(Row("memory (real widths)", "loss value", "", "plain", plain["loss"], name, result["loss"],
                            goal="same", ratio=None, passed=diff <= 2e-2 * abs(plain["loss"]), note=f"|diff| = {diff:.1e} (bf16)"))
    shipped = memory.measured_figures()
    # The figures were measured at 2,048 positions: --quick's 1,024 shows how far linear scaling carries on a CPU.
    judged = plain["positions"] == POSITIONS
    for name, result in found.items():
        predicted = memory.activation_peak(shipped, layers=layers, positions=result["positions"],
                                           supervised=result["supervised_text"], **VARIANTS[name])
        close = abs(predicted / result["growth"] - 1) <= 0.15
        rows.append(Row("memory model", f"peak growth, {layers} layers", "MiB", f"measured {name}", result["growth"] / mib,
                        "predicted", predicted / mib, goal="within 15%" if judged else "info",
                        passed=close if judged else None,
                        note="compat/memory.toml's figures" if name == "plain" else ""))
    measured = f"benchmarks/run.py --only memory --layers {layers}{' --quick' if quick else ''}: {shape}"
    print("figures of this run, in the form of compat/memory.toml:\n" + memory.figures_toml(memory.figures_from(found), measured))
    return rows


def child(argv: list[str]) -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory", choices=sorted(VARIANTS), required=True)
    parser.add_argument("--layers", type=int, default=LAYERS)
    parser.add_argument("--quick", action="store_true")
    arguments = parser.parse_args(argv)
    print(json.dumps(measure(arguments.memory, arguments.layers, arguments.quick)))


if __name__ == "__main__":
    child(sys.argv[1:])
