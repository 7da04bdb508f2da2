"""Benchmark 7: ``higgs_patch.convert``'s peak memory against the size of the checkpoint it converts.

A boson checkpoint of the released widths (hidden 3,072, intermediate 8,192, 24 / 8 heads, 8 codebooks of
1,024, DualFFN on every layer, bf16) with a 32,000-token vocabulary and 2 decoder layers (quick: 1), random
values, written once as one file and once in shards. Each conversion to native runs in a fresh interpreter;
its peak RSS growth is compared with the checkpoint's size, and with what loading every tensor before
writing (transformers' own script's way) takes. Needs transformers >= 5.3.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time

from harness import Row, child_main, median, peak_bytes, reset_peak, rss_bytes, run_child

VOCAB = 32_000
VARIANTS = ("single", "sharded", "load-all")
ROOT_VARIABLE = "HIGGS_PATCH_BENCH_CONVERT_ROOT"


def write_checkpoint(root: str, layers: int) -> tuple[int, int]:
    """Boson checkpoints of the released layout at ``root``/single and ``root``/sharded; their size and their
    largest tensor's, in bytes."""
    import torch
    from safetensors.torch import save_file
    from transformers import HiggsAudioV2Config

    from higgs_patch.conversion import _native_shapes, layout

    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, audio_token_id=VOCAB - 1, audio_bos_token_id=VOCAB - 2,
               audio_delay_token_id=VOCAB - 3)  # the released ids, moved inside the smaller vocabulary
    native = HiggsAudioV2Config(vocab_size=VOCAB, num_hidden_layers=layers, codebook_size=1026, dtype="bfloat16", **ids)
    config = layout.boson_config(native, {})
    generator = torch.Generator().manual_seed(0)
    tensors = {
        layout.rename(key, layout.NATIVE): torch.randn(shape, generator=generator).to(torch.bfloat16)
        for key, shape in _native_shapes(native).items()
    }
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    largest = max(t.numel() * t.element_size() for t in tensors.values())
    for name in ("single", "sharded"):
        os.makedirs(os.path.join(root, name))
        with open(os.path.join(root, name, "config.json"), "w") as handle:
            json.dump(config, handle)
    save_file(tensors, os.path.join(root, "single", "model.safetensors"), metadata={"format": "pt"})
    shards: list[dict] = [{}]
    for key, tensor in tensors.items():  # about 4 shards, as save_pretrained's max_shard_size would cut them
        if sum(t.numel() * t.element_size() for t in shards[-1].values()) > size / 4:
            shards.append({})
        shards[-1][key] = tensor
    names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    for name, shard in zip(names, shards):
        save_file(shard, os.path.join(root, "sharded", name), metadata={"format": "pt"})
    weight_map = {key: name for name, shard in zip(names, shards) for key in shard}
    with open(os.path.join(root, "sharded", "model.safetensors.index.json"), "w") as handle:
        json.dump({"metadata": {"total_size": size}, "weight_map": weight_map}, handle)
    return size, largest


def load_all(source: str, target: str) -> None:
    """Every tensor in memory, renamed, then written: the way of a conversion that holds the whole state dict."""
    from safetensors.torch import load_file, save_file

    from higgs_patch.conversion import layout

    state = {layout.rename(k, layout.BOSON): v for k, v in load_file(os.path.join(source, "model.safetensors")).items()}
    os.makedirs(target)
    save_file(state, os.path.join(target, "model.safetensors"), metadata={"format": "pt"})


def measure_memory(name: str) -> dict:
    """In a fresh interpreter: peak RSS growth of converting the ``name`` checkpoint to native."""
    import safetensors.torch  # noqa: F401 - what the conversion imports, imported before measuring
    import transformers.models.higgs_audio_v2.modeling_higgs_audio_v2  # noqa: F401

    import higgs_patch

    root = os.environ[ROOT_VARIABLE]
    source = os.path.join(root, "sharded" if name == "sharded" else "single")
    target = os.path.join(root, f"out-{name}")
    shutil.rmtree(target, ignore_errors=True)
    method = reset_peak()
    before = rss_bytes()
    start = time.perf_counter()
    if name == "load-all":
        load_all(source, target)
    else:
        higgs_patch.convert(source, target)
    seconds = time.perf_counter() - start
    growth = peak_bytes() - before
    shutil.rmtree(target)
    return {"growth": growth, "method": method, "seconds": seconds}


def run(quick: bool) -> list[Row]:
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version("5.3"):
        print(f"  convert: skipped, transformers {transformers.__version__} has no native Higgs Audio v2 (5.3+)")
        return []
    layers = 1 if quick else 2
    root = tempfile.mkdtemp(prefix="higgs-patch-convert-bench-")
    try:
        size, largest = (n / 2**20 for n in write_checkpoint(root, layers))
        os.environ[ROOT_VARIABLE] = root
        found = {name: run_child("convert_bench.py", "--memory", name, timeout=900) for name in VARIANTS}
    finally:
        os.environ.pop(ROOT_VARIABLE, None)
        shutil.rmtree(root, ignore_errors=True)
    growth = {name: found[name]["growth"] / 2**20 for name in VARIANTS}
    shape = (f"{layers} layer(s) at the released widths, vocabulary {VOCAB:,}, bf16: {size:,.0f} MiB, the largest "
             f"tensor {largest:,.0f} MiB; fresh process each; {found['single']['method']}")
    rows = [
        Row("convert", "peak RSS growth", "MiB", "checkpoint size", size, f"convert {name}", growth[name],
            goal="<= 1.00", note=f"{shape}; {found[name]['seconds']:.1f} s")
        for name in ("single", "sharded")
    ]
    rows.append(Row("convert", "peak RSS growth", "MiB", "checkpoint size", size, "load all, then write",
                    growth["load-all"], note=f"for comparison; {found['load-all']['seconds']:.1f} s"))
    return rows


if __name__ == "__main__":
    child_main(__doc__.splitlines()[0], measure_memory, VARIANTS)
