"""A safetensors checkpoint read by its headers and written tensor by tensor.

Only the headers are read to plan a conversion, so nothing is written before every key is accounted for.
Each output tensor is then read (``safe_open``, one file handle per tensor, so no mapping outlives it),
written at its offset and released: a conversion holds one tensor (two for a merged pair) in memory at a
time, whatever the size of the checkpoint or of its shards. The output shards follow the source's.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Bytes per element of each safetensors dtype.
_WIDTH = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}


@dataclass(frozen=True)
class Stored:
    """One tensor as a source file's header describes it."""

    file: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Step:
    """One output tensor: the source tensors it is made of (two are concatenated on dim 0), and its header."""

    key: str
    parts: tuple[str, ...]
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * _WIDTH[self.dtype]


def read_headers(checkpoint: Path) -> dict[str, Stored]:
    """Every tensor of a checkpoint directory (an index and its shards, or model.safetensors), headers only."""
    from safetensors import safe_open

    index = checkpoint / INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = sorted(set(weight_map.values()))
    elif (checkpoint / SINGLE).is_file():
        weight_map, files = None, [SINGLE]
    else:
        others = sorted(p.name for p in checkpoint.glob("*.bin")) + sorted(p.name for p in checkpoint.glob("*.safetensors"))
        found = f" (found {', '.join(others)})" if others else ""
        raise FileNotFoundError(
            f"{checkpoint} holds neither {INDEX} nor {SINGLE}{found}: only safetensors checkpoints convert; "
            "load the model and save_pretrained it (safetensors is the default) first"
        )
    stored: dict[str, Stored] = {}
    for name in files:
        with safe_open(str(checkpoint / name), framework="pt", device="cpu") as handle:
            for key in handle.keys():
                piece = handle.get_slice(key)
                if key in stored:
                    raise ValueError(f"{key} is stored twice: in {stored[key].file} and {name}")
                stored[key] = Stored(name, piece.get_dtype(), tuple(piece.get_shape()))
    if weight_map is not None:
        misplaced = sorted(k for k, name in weight_map.items() if k not in stored or stored[k].file != name)
        if misplaced:
            raise ValueError(f"{index} names {len(misplaced)} tensor(s) its shards do not hold as it says: {misplaced[:5]}")
    return stored


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def write(checkpoint: Path, stored: dict[str, Stored], shards: list[list[Step]], target: Path) -> list[str]:
    """Write each shard's steps, one tensor at a time; an index when there is more than one shard."""
    names = shard_names(len(shards))
    weight_map = {}
    for name, steps in zip(names, shards):
        _write_file(checkpoint, stored, steps, target / name)
        weight_map.update({step.key: name for step in steps})
    if len(names) > 1:
        total = sum(step.nbytes for steps in shards for step in steps)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (target / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        names.append(INDEX)
    return names


def _write_file(checkpoint: Path, stored: dict[str, Stored], steps: list[Step], path: Path) -> None:
    """The safetensors format: an 8-byte little-endian header length, the JSON header, then the data."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for step in steps:
        header[step.key] = {"dtype": step.dtype, "shape": list(step.shape), "data_offsets": [offset, offset + step.nbytes]}
        offset += step.nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    import torch

    with path.open("wb") as out:
        out.write(struct.pack("<Q", len(text)))
        out.write(text)
        for step in steps:
            tensor = _load(checkpoint, stored, step)
            data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
            if data.nbytes != step.nbytes:
                raise ValueError(f"{step.key}: {data.nbytes} bytes where its header says {step.nbytes}")
            out.write(memoryview(data))
            del tensor, data


def _load(checkpoint: Path, stored: dict[str, Stored], step: Step):
    import torch
    from safetensors import safe_open

    tensors = []
    for part in step.parts:
        with safe_open(str(checkpoint / stored[part].file), framework="pt", device="cpu") as handle:
            tensors.append(handle.get_tensor(part))
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0)
