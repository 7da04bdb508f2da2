"""A strict, local conversion between boson's ``higgs_audio`` and transformers' native ``higgs_audio_v2``.

transformers' own script downloads the released checkpoint, hard-codes its 3B config and loads with
``strict=False``, so any other layout converts silently wrong. Here the direction is read from the source's
config, the config is carried over, a layout native cannot express is refused by name, every source key is
mapped, merged or dropped with a reason, every key of the target model is filled, and the tensors stream
one at a time (:mod:`.shards`). Nothing is downloaded. Both directions need transformers >= 5.3, whose
native model is the reference the keys and shapes are checked against.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from packaging.version import Version

from ..errors import ConversionError
from . import layout, shards

log = logging.getLogger("higgs_patch")

NATIVE_FROM = Version("5.3")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
    "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)
CONFIG = "config.json"


@dataclass(frozen=True)
class Conversion:
    """What a conversion wrote and why each source key that has no counterpart was left out."""

    source: Path
    target: Path
    source_type: str
    target_type: str
    tensors: int
    written: tuple[str, ...]
    merged: dict[str, tuple[str, ...]] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    copied: tuple[str, ...] = ()
    not_copied: tuple[str, ...] = ()


def convert(source: str | os.PathLike[str], target: str | os.PathLike[str], *, overwrite: bool = False) -> Conversion:
    """Convert the checkpoint directory ``source`` into ``target``, both ways between boson and native.

    ``source`` is boson's ``HiggsAudioModel`` (model_type ``higgs_audio``) of the released layout, or
    transformers' ``HiggsAudioV2ForConditionalGeneration`` (``higgs_audio_v2``) saved with its text head;
    the other format is written to ``target`` (weights, config, tokenizer files). A non-empty ``target`` is
    refused unless ``overwrite``. Raises :class:`~higgs_patch.ConversionError` naming what is wrong.
    """
    source, target = Path(source), Path(target)
    _require_native()
    if not source.is_dir():
        raise ConversionError(f"{source} is not a checkpoint directory")
    try:
        config = layout.read_config(source)
    except (OSError, ValueError) as exc:
        raise ConversionError(f"cannot read the source's config: {exc}") from None
    kind = config.get("model_type")
    if kind not in (layout.BOSON, layout.NATIVE):
        raise ConversionError(
            f"{source / CONFIG} has model_type {kind!r}: only boson's {layout.BOSON!r} and transformers' "
            f"{layout.NATIVE!r} convert"
        )
    _check_target(source, target, overwrite)
    tokens = layout.special_token_ids(source)
    if kind == layout.BOSON:
        problems = layout.refusals(config)
        if problems:
            raise ConversionError(
                f"{source} is not Higgs Audio v2's released layout, and transformers' native model cannot express: "
                + "; ".join(problems) + ". Only the released layout converts (DualFFN on every layer, codes in, "
                "no Whisper tower, no audio self-attention, the delay pattern)."
            )
    try:
        native = layout.native_config(config, tokens) if kind == layout.BOSON else _read_native_config(source)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConversionError(f"{source / CONFIG} is not a {kind} config as its model's class writes it: "
                              f"{type(exc).__name__}: {exc}") from None
    try:
        stored = shards.read_headers(source)
    except (OSError, ValueError) as exc:
        raise ConversionError(f"cannot read the source's weights: {exc}") from None
    plan = _plan(stored, kind, _native_shapes(native))

    _clear_weights(target)
    written = shards.write(source, stored, plan.shards, target)
    if kind == layout.BOSON:
        native.save_pretrained(target)
    else:
        boson = layout.boson_config(native, tokens)
        (target / CONFIG).write_text(json.dumps(boson, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    copied = tuple(name for name in TOKENIZER_FILES if (source / name).is_file())
    for name in copied:
        shutil.copy2(source / name, target / name)
    known = {CONFIG, shards.INDEX, *copied, *(info.file for info in stored.values())}
    result = Conversion(
        source=source, target=target, source_type=kind,
        target_type=layout.NATIVE if kind == layout.BOSON else layout.BOSON,
        tensors=sum(len(steps) for steps in plan.shards), written=(*written, CONFIG, *copied),
        merged=plan.merged, dropped=plan.dropped, copied=copied,
        not_copied=tuple(sorted(p.name for p in source.iterdir() if p.name not in known)),
    )
    log.info("converted %s (%s) to %s (%s): %d tensors", source, kind, target, result.target_type, result.tensors)
    return result


def summary(result: Conversion) -> str:
    """What the command prints: the direction, the files, and every key merged or dropped with its reason."""
    lines = [
        f"{result.source} ({result.source_type}) -> {result.target} ({result.target_type}): "
        f"{result.tensors} tensors in {', '.join(result.written)}"
    ]
    lines += [f"  merged {', '.join(parts)} -> {key}" for key, parts in result.merged.items()]
    lines += [f"  dropped {key}: {reason}" for key, reason in result.dropped.items()]
    if result.not_copied:
        lines.append(f"  not copied (not part of the model or its tokenizer): {', '.join(result.not_copied)}")
    if result.target_type == layout.NATIVE:
        lines.append("  load it with HiggsAudioV2ForConditionalGeneration.from_pretrained(target, use_text_head=True) "
                     "to keep the text head")
    return "\n".join(lines)


@dataclass(frozen=True)
class _Plan:
    shards: list[list[shards.Step]]
    merged: dict[str, tuple[str, ...]]
    dropped: dict[str, str]


def _plan(stored: dict[str, shards.Stored], kind: str, expected: dict[str, tuple[int, ...]]) -> _Plan:
    """Every source key's fate, and the output shards; refuses unless the target model's keys and shapes match."""
    files = list(dict.fromkeys(info.file for info in stored.values()))
    placed: dict[str, list[shards.Step]] = {name: [] for name in files}
    merged, dropped, unmapped, halves = {}, {}, [], set()
    for merge in layout.merges(kind):
        present = [k for k in (merge.first, merge.second) if k in stored]
        if not present:
            continue
        if len(present) == 1 or merge.key in stored:
            raise ConversionError(
                f"{present[0]} is half of {merge.key}, but the checkpoint holds "
                + (f"{merge.key} as well" if merge.key in stored else "not its other half")
            )
        first, second = stored[merge.first], stored[merge.second]
        if first.dtype != second.dtype or first.shape[1:] != second.shape[1:]:
            raise ConversionError(f"the halves of {merge.key} do not concatenate: {first} and {second}")
        key = layout.rename(merge.key, kind)
        shape = (first.shape[0] + second.shape[0], *first.shape[1:])
        last = max(first.file, second.file, key=files.index)
        placed[last].append(shards.Step(key, (merge.first, merge.second), first.dtype, shape))
        merged[key] = (merge.first, merge.second)
        halves.update((merge.first, merge.second))
    for key, info in stored.items():
        if key in halves:
            continue
        reason = layout.drop_reason(key)
        new = None if reason else layout.rename(key, kind)
        if reason:
            dropped[key] = reason
        elif new is None:
            unmapped.append(key)
        else:
            placed[info.file].append(shards.Step(new, (key,), info.dtype, info.shape))
    steps = [step for file_steps in placed.values() for step in file_steps]
    # Checked on native's side: the target's keys boson -> native, the source's native -> boson.
    have = {(step.key if kind == layout.BOSON else step.parts[0]): step.shape for step in steps}
    problems = []
    if unmapped:
        problems.append(f"{len(unmapped)} key(s) no rule maps: {_some(unmapped)}")
    missing, unexpected = sorted(expected.keys() - have.keys()), sorted(have.keys() - expected.keys())
    if missing:
        hint = (" (saved without use_text_head=True; boson's model needs the text head)"
                if kind == layout.NATIVE and "text_lm_head.weight" in missing else "")
        problems.append(f"{len(missing)} weight(s) of the native model missing{hint}: {_some(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} weight(s) the native model does not have: {_some(unexpected)}")
    wrong = sorted(k for k in have.keys() & expected.keys() if have[k] != expected[k])
    if wrong:
        problems.append("shapes that differ from the config's: "
                        + ", ".join(f"{k} {have[k]} where {expected[k]}" for k in wrong[:5]))
    if problems:
        raise ConversionError("the checkpoint's weights do not match its config: " + "; ".join(problems))
    return _Plan([s for s in placed.values() if s], merged, dropped)


def _read_native_config(source: Path):
    from transformers import HiggsAudioV2Config

    return HiggsAudioV2Config.from_pretrained(source)


def _native_shapes(config) -> dict[str, tuple[int, ...]]:
    """The key and shape of every weight of HiggsAudioV2ForConditionalGeneration with its text head."""
    import torch
    from transformers import HiggsAudioV2ForConditionalGeneration

    with torch.device("meta"):
        model = HiggsAudioV2ForConditionalGeneration(config, use_text_head=True)
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def _require_native() -> None:
    try:
        installed = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if installed is None or Version(installed) < NATIVE_FROM:
        raise ConversionError(
            f"converting needs transformers >= {NATIVE_FROM}, the first to ship the native Higgs Audio v2 "
            f"(HiggsAudioV2ForConditionalGeneration); this environment has transformers {installed or '(none)'}. "
            f"Convert in an environment with pip install 'transformers>={NATIVE_FROM}'."
        )


def _check_target(source: Path, target: Path, overwrite: bool) -> None:
    if target.exists() and not target.is_dir():
        raise ConversionError(f"{target} exists and is not a directory")
    if target.resolve() == source.resolve():
        raise ConversionError("the target is the source directory: convert into another one")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise ConversionError(f"{target} is not empty: pass overwrite=True (--overwrite) to write into it")


def _clear_weights(target: Path) -> None:
    """Make ``target``, without weight files a previous conversion may have left (other shard counts)."""
    target.mkdir(parents=True, exist_ok=True)
    for stale in [*target.glob("*.safetensors"), target / shards.INDEX]:
        if stale.is_file():
            log.info("removing %s before writing the converted weights", stale)
            stale.unlink()


def _some(keys: list[str], shown: int = 8) -> str:
    return ", ".join(keys[:shown]) + (f" and {len(keys) - shown} more" if len(keys) > shown else "")
