"""``higgs-patch smoke``: train the built-in tiny Higgs Audio model for a few steps, patched.

Nothing is downloaded: the model (:mod:`higgs_patch.tiny`) has random weights and the voice-clone
dataset is made in memory. The run uses what users use: the transformers ``Trainer`` and
boson_multimodal's own collator, wrapped in :class:`~higgs_patch.tiny.DictCollator` so that the
Trainer gets a dict with ``labels``. It passes when the text and audio losses are finite and falling.

:func:`probe` runs, in the current patch state, each failure the patches fix; run unpatched it shows
what breaks out of the box (``--compare``), run patched it shows that each is fixed.

This module imports torch, transformers and boson_multimodal, and is imported only by the command.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import transformers
from transformers.trainer_callback import PrinterCallback, ProgressCallback

import higgs_patch

from .. import engine
from . import tiny
from .doctor import one_line

log = logging.getLogger("higgs_patch")

DEFAULT_STEPS = 40
DATASET_SIZE = 16
BATCH_SIZE = 4
LEARNING_RATE = 3e-3
SEED = 0
#: From this many steps on, the first and last quarters are far enough apart for the losses to fall
#: beyond step-to-step noise (seeded, the audio loss first falls after 5); fewer steps are judged
#: finite only, and the verdict says so.
FALLING_FROM = 10


@dataclass(frozen=True)
class ProbeResult:
    """One thing users do that fails without a patch; ``failure`` is None when it worked."""

    patch: str
    what: str
    failure: str | None


@dataclass
class TrainResult:
    device: str
    parameters: int
    samples: int
    batch_size: int
    steps: int
    seconds: float
    history: list[dict[str, float]]  # the Trainer's training logs, one per step
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def series(self, key: str) -> list[float]:
        return [entry[key] for entry in self.history if key in entry]


def resolve_device(device: str) -> str:
    """``auto`` is ``cuda`` when a CUDA device is usable, else ``cpu``; ``cuda`` without one is an error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: torch sees no usable CUDA device (torch.cuda.is_available() is False)")
    return device


def short_sample(seed: int) -> Any:
    """A voice-clone sample whose answer ends in an ``<|AUDIO_OUT|>`` token its codes were cut from.

    Three audio tokens, two segments: upstream's collator raises ``IndexError``; patched, the extra
    token reads the last segment (the target), which does not leak the target into the prompt.
    """
    sample = tiny.sample(seed=seed)
    sample.input_ids = torch.cat([sample.input_ids, torch.tensor([tiny.AUDIO_OUT])])
    sample.label_ids = torch.cat([sample.label_ids, torch.tensor([-100])])
    return sample


def dataset(size: int = DATASET_SIZE) -> list[Any]:
    """A synthetic voice-clone dataset: reference audio in, target audio out; the last sample is short."""
    return tiny.samples(size - 1) + [short_sample(seed=size - 1)]


def unpatched_probe(device: str = "cpu") -> list[ProbeResult]:
    """:func:`probe` with upstream as installed (and the compatibility shims it needs to import at all on this
    transformers); refused while a fix is applied in this process."""
    known = engine.known()
    active = [s.id for s in higgs_patch.status() if s.state in engine.ACTIVE and not known[s.id].shim]
    if active:
        raise RuntimeError(f"cannot show upstream unpatched: {', '.join(active)} already applied in this process")
    return probe(device)


def patched_probe(device: str = "cpu") -> list[ProbeResult]:
    """:func:`probe` with the default patches applied (reverted after, if this call applied them)."""
    with higgs_patch.applied():
        return probe(device)


def probe(device: str = "cpu") -> list[ProbeResult]:
    """Run every failure the patches fix, in the current patch state; each failure is one line."""
    gpu = "cuda" if device == "cuda" else "meta"
    checks: list[tuple[str, str, Callable[[], str | None]]] = [
        ("forward-kwargs-filter", "Trainer step, batch with labels", lambda: _train_step(device, with_labels=True)),
        ("model-loss", "Trainer step, batch without labels", lambda: _train_step(device, with_labels=False)),
        ("collator-audio-index", "collate a sample one audio segment short", _collate_short),
        ("collator-audio-index", "collate the same samples a second time", _collate_twice),
        (
            "device-tensor-factory",
            f"collate audio codes on {gpu}" + (" (a GPU stand-in)" if gpu == "meta" else ""),
            lambda: _collate_on(gpu),
        ),
    ]
    results = []
    for patch, what, attempt in checks:
        try:
            failure = attempt()
        except Exception as exc:  # the very failures we came to show: each is reported, none hidden
            failure = one_line(exc, limit=180)
        log.debug("probe %s (%s): %s", what, patch, failure or "works")
        results.append(ProbeResult(patch, what, failure))
    return results


def train(steps: int = DEFAULT_STEPS, device: str = "cpu") -> TrainResult:
    """Apply the default patches, train the tiny model ``steps`` steps, revert what this call applied."""
    data = dataset()
    with higgs_patch.applied():
        with tempfile.TemporaryDirectory(prefix="higgs-patch-smoke-") as output_dir:
            trainer = _trainer(output_dir, device, steps, with_labels=True, data=data, progress=True)
            started = time.perf_counter()
            trainer.train()
            seconds = time.perf_counter() - started
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    result = TrainResult(
        device=device,
        parameters=sum(p.numel() for p in trainer.model.parameters()),
        samples=len(data),
        batch_size=BATCH_SIZE,
        steps=trainer.state.global_step,
        seconds=seconds,
        history=history,
    )
    result.problems = _judge(result)
    return result


def judges_falling(steps: int) -> bool:
    """Whether ``steps`` steps can show the losses falling: fewer show only that training runs."""
    return steps >= FALLING_FROM


def _judge(result: TrainResult) -> list[str]:
    """Finite, and with enough steps falling: the mean of the last quarter of each loss below the first's."""
    problems = []
    for key in ("loss", "text_loss", "audio_loss"):
        values = result.series(key)
        if not values:
            problems.append(f"the Trainer logged no {key!r}")
            continue
        if not all(math.isfinite(value) for value in values):
            problems.append(f"{key} is not finite: {[v for v in values if not math.isfinite(v)][:3]}")
            continue
        if not judges_falling(len(values)):
            continue
        window = max(1, len(values) // 4)
        first, last = _mean(values[:window]), _mean(values[-window:])
        if len(values) < 2 or not last < first:
            problems.append(
                f"{key} is not falling: {first:.4f} over the first {window} step(s), {last:.4f} over the last"
            )
    grad_norms = result.series("grad_norm")
    if not all(math.isfinite(value) for value in grad_norms):
        problems.append("grad_norm is not finite")
    return problems


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _trainer(
    output_dir: str, device: str, steps: int, with_labels: bool, data: list[Any], progress: bool = False
) -> transformers.Trainer:
    arguments = transformers.TrainingArguments(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=BATCH_SIZE,
        learning_rate=LEARNING_RATE,
        warmup_steps=0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=device == "cpu",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        seed=SEED,
        data_seed=SEED,
        disable_tqdm=not progress,
    )
    trainer = transformers.Trainer(
        model=tiny.model(seed=SEED),
        args=arguments,
        train_dataset=data,
        data_collator=tiny.DictCollator(tiny.collator(), with_labels=with_labels),
    )
    # The command prints the loss curve itself: no printed dict per log, a progress bar at most.
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if progress:
        trainer.add_callback(_ProgressBarOnly())
    return trainer


def _train_step(device: str, with_labels: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="higgs-patch-probe-") as output_dir:
        trainer = _trainer(output_dir, device, steps=1, with_labels=with_labels, data=tiny.samples(BATCH_SIZE))
        trainer.train()
    return None


def _collate_short() -> None:
    tiny.collator()([short_sample(seed=0)])
    return None


def _collate_twice() -> str | None:
    collator, batch = tiny.collator(), tiny.samples(2)
    first = int((collator(batch).label_audio_ids != -100).sum())
    second = int((collator(batch).label_audio_ids != -100).sum())
    if second == first:
        return None
    return f"audio labels lost: {first} supervised audio codes the first time, {second} the second"


def _collate_on(device: str) -> str | None:
    batch = tiny.collator()([tiny.sample(seed=0, device=device)])
    if batch.audio_out_ids.device.type != torch.device(device).type:
        return f"audio codes on {device} came back on {batch.audio_out_ids.device}"
    return None


class _ProgressBarOnly(ProgressCallback):
    """The Trainer's tqdm bar without a printed dict per log: the command prints the curve itself."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return None
