"""Does training under the patches train the right thing? A tiny model learns its targets and generates them back.

A falling loss does not show it: a loss that scores audio logits against the codes at the same position
(no shift, as the seed did) falls to near zero while the audio head learns to copy its input, and the
model then generates garbage. The proof users care about is what the model *generates*.

So: voice-clone samples whose target codes are a deterministic function of their text (memorising is
enough), the released DualFFN architecture with the delay pattern on, trained under the stock
``Trainer`` with the default patches until the loss plateaus; then the audio and text heads'
teacher-forced accuracy, and free-running greedy generation through the upstream's own
``HiggsAudioModel.generate`` with a static cache, as its serve engine calls it, with the delay pattern
reverted by the upstream's helper and the codes compared with the targets. The same is run with
:func:`unshifted_seed_loss` as the contrast.

Accuracies are measured with their own shift, not the loss module's, so that a broken loss cannot
also break the ruler it is measured with.

This module imports torch, transformers and boson_multimodal; the command and the tests import it.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, NamedTuple

import torch
import torch.nn.functional as F
import transformers
from boson_multimodal.dataset.chatml_dataset import ChatMLDatasetSample
from boson_multimodal.model.higgs_audio.utils import revert_delay_pattern
from transformers.cache_utils import StaticCache
from transformers.trainer_callback import PrinterCallback, ProgressCallback, TrainerCallback

import higgs_patch

from . import tiny

SAMPLES = 8
BATCH_SIZE = 4
WORDS = 4  # text tokens per sample: what the target codes are a function of
FRAMES = 8  # target audio frames per sample
REFERENCE_FRAMES = 5  # the reference audio (the voice to clone) in the prompt
LEARNING_RATE = 3e-3
MAX_STEPS = 400
PLATEAU_WINDOW = 20  # steps
PLATEAU_TOLERANCE = 0.002  # the mean loss of the last window fell by less than this (nats): a plateau
REQUIRED_ACCURACY = 0.99
SEED = 0

IGNORE_INDEX = -100
# The chat layout's tokens the checks read, inside the tiny vocabulary; <|audio_out_bos|> and <|audio_eos|>
# are the tiny config's own audio_out_bos_token_id and audio_eos_token_id.
EOT = tiny.SPECIAL_TOKENS["<|eot_id|>"]
AUDIO_OUT_BOS = tiny.config().audio_out_bos_token_id
AUDIO_EOS = tiny.config().audio_eos_token_id
REFERENCE_AUDIO, TARGET_AUDIO = "reference.wav", "target.wav"  # the audio's names in the conversation

PATCHED, UNSHIFTED = "patched", "unshifted"


@dataclass(frozen=True)
class Example:
    """One voice-clone sample for training, the prompt generation starts from, and the codes it must produce."""

    sample: ChatMLDatasetSample
    prompt: ChatMLDatasetSample
    target: torch.Tensor  # (codebooks, FRAMES)
    words: torch.Tensor  # (WORDS,): the text's token ids, which the target is a function of


def target_codes(words: torch.Tensor) -> torch.Tensor:
    """The target audio of a text: code (k, t) depends on word t mod WORDS, the codebook k and the frame t."""
    frames = torch.arange(FRAMES)
    codebooks = torch.arange(tiny.CODEBOOKS)[:, None]
    return (words[frames % len(words)] * (codebooks + 1) + 3 * frames + 7 * codebooks) % tiny.CODEBOOK_SIZE


def conversation(words: torch.Tensor) -> dict[str, Any]:
    """The voice-clone conversation of ``words`` (tiny-vocabulary word ids), as a line of a JSON-lines file reads."""
    text = " ".join(f"w{int(word)}" for word in words)
    return {"messages": [
        {"role": "user", "content": [text, {"type": "audio", "audio_url": REFERENCE_AUDIO}]},
        {"role": "assistant", "content": {"type": "audio", "audio_url": TARGET_AUDIO}},
    ]}


def examples(count: int = SAMPLES) -> list[Example]:
    """``count`` samples made by :func:`higgs_patch.training_sample` from voice-clone conversations::

        user:      words… <|audio_bos|> <|AUDIO|> <|audio_eos|>          (the reference audio, an input)
        assistant: <|audio_out_bos|> <|AUDIO_OUT|> <|audio_eos|> <|eot_id|>  (the target audio)

    in boson's chat format (``prepare_chatml_sample``), with the tiny tokenizer; the assistant's tokens
    are the text labels (upstream's collator masks the <|AUDIO_OUT|> label). The prompt is everything
    before the assistant's <|audio_out_bos|>, so the model has to start the audio itself.
    """
    tokenizer, config = tiny.tokenizer(), tiny.config(use_delay_pattern=True)
    found = []
    for index in range(count):
        g = torch.Generator().manual_seed(1000 + index)
        words = torch.randint(1, 200, (WORDS,), generator=g)
        reference = torch.randint(0, tiny.CODEBOOK_SIZE, (tiny.CODEBOOKS, REFERENCE_FRAMES), generator=g)
        target = target_codes(words)
        sample = higgs_patch.training_sample(conversation(words), tokenizer, config,
                                             codes={REFERENCE_AUDIO: reference, TARGET_AUDIO: target})
        found.append(Example(sample=sample, prompt=_prompt(sample), target=target, words=words))
    return found


def _prompt(sample: ChatMLDatasetSample) -> ChatMLDatasetSample:
    """The sample up to its (one) <|audio_out_bos|>, with the audio before it, and no labels."""
    end = int((sample.input_ids == AUDIO_OUT_BOS).nonzero()[0])
    inputs = int(torch.isin(sample.input_ids[:end], torch.tensor([tiny.AUDIO_IN, tiny.AUDIO_OUT])).sum())
    frames = int(torch.cat([sample.audio_ids_start, torch.tensor([sample.audio_ids_concat.shape[1]])])[inputs])
    return dataclasses.replace(
        sample, input_ids=sample.input_ids[:end], label_ids=None, audio_ids_concat=sample.audio_ids_concat[:, :frames],
        audio_ids_start=sample.audio_ids_start[:inputs], audio_speaker_indices=sample.audio_speaker_indices[:inputs],
    )


def collator(**overrides: Any) -> tiny.HiggsAudioSampleCollator:
    """The tiny collator with the delay pattern on, as the released model's serve engine builds it."""
    return tiny.collator(use_delay_pattern=True, **overrides)


# --- the contrast --------------------------------------------------------------------------------------


class SeedLoss(NamedTuple):
    total: torch.Tensor
    text: torch.Tensor
    audio: torch.Tensor


def unshifted_seed_loss(outputs: Any, batch: Any) -> SeedLoss:
    """The contrast, not a feature: the seed's audio loss, audio logits at t scored against the code at t.

    Everything else as the patched loss: text logits at t against the label at t + 1, the total the
    mean of text and audio. Only the missing audio shift differs.
    """
    text_targets = F.pad(outputs.expanded_labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    text = F.cross_entropy(outputs.logits.flatten(0, 1), text_targets.flatten(), ignore_index=IGNORE_INDEX)
    audio_targets = batch["label_audio_ids"].t()  # (tokens, codebooks), no shift
    audio = F.cross_entropy(outputs.audio_logits.flatten(0, 1), audio_targets.flatten(), ignore_index=IGNORE_INDEX)
    return SeedLoss((text + audio) / 2, text, audio)


class UnshiftedSeedTrainer(transformers.Trainer):
    """A community-shaped Trainer whose ``compute_loss`` is the seed's: see :func:`unshifted_seed_loss`."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        loss = unshifted_seed_loss(outputs, inputs).total
        return (loss, outputs) if return_outputs else loss


# --- training -----------------------------------------------------------------------------------------


class StopAtPlateau(TrainerCallback):
    """Stop when the mean loss of the last window is less than ``tolerance`` below the window before."""

    def __init__(self, window: int = PLATEAU_WINDOW, tolerance: float = PLATEAU_TOLERANCE) -> None:
        self.window, self.tolerance = window, tolerance
        self.losses: list[float] = []
        self.plateau_step: int | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])
        if len(self.losses) >= 2 * self.window:
            before = sum(self.losses[-2 * self.window:-self.window]) / self.window
            last = sum(self.losses[-self.window:]) / self.window
            if before - last < self.tolerance:
                self.plateau_step = state.global_step
                control.should_training_stop = True
        return control


@dataclass
class Generation:
    """What free-running greedy generation produced from one prompt."""

    text: list[int]  # the generated text tokens
    codes: torch.Tensor | None  # (codebooks, frames), delay pattern reverted, stream bos/eos stripped
    target: torch.Tensor

    @property
    def exact(self) -> bool:
        return self.codes is not None and self.codes.shape == self.target.shape and torch.equal(self.codes, self.target)

    @property
    def code_agreement(self) -> float:
        """The fraction of target codes generated at their place (0 when no audio was generated)."""
        if self.codes is None:
            return 0.0
        frames = min(self.codes.shape[1], self.target.shape[1])
        return float((self.codes[:, :frames] == self.target[:, :frames]).sum()) / self.target.numel()


@dataclass
class Outcome:
    """One training run, measured."""

    loss_name: str  # PATCHED or UNSHIFTED
    steps: int
    plateau_step: int | None
    seconds: float
    history: list[float] = field(repr=False)  # the Trainer's logged loss, one per step
    final_loss: float  # the run's own training objective on the training set, after training
    final_text_loss: float
    final_audio_loss: float
    audio_accuracy: float  # teacher-forced: logits at t predict the code at t + 1
    audio_same_position_accuracy: float  # logits at t "predict" the code at t: what the unshifted loss rewards
    text_accuracy: float  # teacher-forced, where text is supervised
    audio_positions: int
    text_positions: int
    generations: list[Generation] = field(repr=False)

    @property
    def exact_matches(self) -> int:
        return sum(g.exact for g in self.generations)


@dataclass
class Comparison:
    patched: Outcome
    unshifted: Outcome

    def problems(self) -> list[str]:
        """What keeps this from proving that the patches train the right thing (empty: it proves it)."""
        found = []
        p, u = self.patched, self.unshifted
        if len(p.generations) < 4:
            found.append(f"only {len(p.generations)} samples; the check needs at least 4")
        if p.plateau_step is None:
            found.append(f"the patched loss did not plateau within {p.steps} steps")
        if p.audio_accuracy < REQUIRED_ACCURACY:
            found.append(f"patched: teacher-forced audio accuracy {p.audio_accuracy:.1%} < {REQUIRED_ACCURACY:.0%}")
        if p.text_accuracy < REQUIRED_ACCURACY:
            found.append(f"patched: teacher-forced text accuracy {p.text_accuracy:.1%} < {REQUIRED_ACCURACY:.0%}")
        if p.exact_matches < len(p.generations):
            found.append(f"patched: {p.exact_matches} of {len(p.generations)} generated targets equal their training targets")
        if u.exact_matches:
            found.append(
                f"unshifted: {u.exact_matches} of {len(u.generations)} generated targets equal their training targets; "
                "the contrast does not tell the losses apart"
            )
        return found


def train(loss_name: str, data: list[Example], max_steps: int = MAX_STEPS) -> Outcome:
    """Train a fresh tiny model under the default patches until the loss plateaus; measure it.

    ``PATCHED``: the stock ``Trainer``, the loss as the patches deliver it. ``UNSHIFTED``: the same with
    :class:`UnshiftedSeedTrainer`. Generation runs after this call has reverted what it applied.
    """
    trainers = {PATCHED: transformers.Trainer, UNSHIFTED: UnshiftedSeedTrainer}
    if loss_name not in trainers:
        raise ValueError(f"loss_name {loss_name!r} is not one of {sorted(trainers)}")
    trainer_class = trainers[loss_name]
    plateau = StopAtPlateau()
    with higgs_patch.applied(), tempfile.TemporaryDirectory(prefix="higgs-patch-learnability-") as output_dir:
        arguments = transformers.TrainingArguments(
            output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=BATCH_SIZE,
            learning_rate=LEARNING_RATE, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
            remove_unused_columns=False, dataloader_num_workers=0, seed=SEED, data_seed=SEED, disable_tqdm=True,
        )
        trainer = trainer_class(
            model=tiny.model(seed=SEED, use_delay_pattern=True),
            args=arguments,
            train_dataset=[example.sample for example in data],
            data_collator=tiny.DictCollator(collator()),
            callbacks=[plateau],
        )
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
        model = trainer.model.eval()
        measured = _measure(model, data, loss_name)
    return Outcome(
        loss_name=loss_name, steps=trainer.state.global_step, plateau_step=plateau.plateau_step, seconds=seconds,
        history=plateau.losses, **measured, generations=[generate(model, example) for example in data],
    )


def compare(count: int = SAMPLES) -> Comparison:
    """Both runs on the same samples: the patches, and the seed's unshifted audio loss."""
    data = examples(count)
    with one_thread():
        return Comparison(patched=train(PATCHED, data), unshifted=train(UNSHIFTED, data))


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one CPU thread inside: the same numbers on any machine, and no thread hand-offs.

    The model is so small that extra threads only wait on each other (on a busy 2-core machine the
    check took minutes instead of seconds).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# --- measuring ----------------------------------------------------------------------------------------


@torch.no_grad()
def _measure(model: tiny.HiggsAudioModel, data: list[Example], loss_name: str) -> dict[str, Any]:
    """Teacher-forced accuracies and the run's own objective, on the whole training set in one batch."""
    batch = tiny.DictCollator(collator())([example.sample for example in data])
    outputs = model(**batch)
    if loss_name == PATCHED:
        loss = higgs_patch.higgs_audio_loss(outputs, batch)
        final = (float(loss.loss), float(loss.text), float(loss.audio))
    else:
        final = tuple(float(value) for value in unshifted_seed_loss(outputs, batch))
    codes = outputs.audio_logits.argmax(-1).t()  # (codebooks, tokens)
    labels = batch["label_audio_ids"]
    audio_accuracy, audio_positions = _accuracy(codes, _next(labels))
    same_position, _ = _accuracy(codes, labels)
    text_accuracy, text_positions = _accuracy(outputs.logits.argmax(-1), _next(outputs.expanded_labels))
    return dict(
        final_loss=final[0], final_text_loss=final[1], final_audio_loss=final[2],
        audio_accuracy=audio_accuracy, audio_same_position_accuracy=same_position, text_accuracy=text_accuracy,
        audio_positions=audio_positions, text_positions=text_positions,
    )


def _next(labels: torch.Tensor) -> torch.Tensor:
    """Position t holds the label of t + 1 (its own shift: see the module docstring)."""
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


def _accuracy(predicted: torch.Tensor, targets: torch.Tensor) -> tuple[float, int]:
    supervised = targets != IGNORE_INDEX
    count = int(supervised.sum())
    return float((predicted[supervised] == targets[supervised]).sum()) / max(count, 1), count


def generate(model: tiny.HiggsAudioModel, example: Example) -> Generation:
    """Greedy free-running generation from the prompt, through ``HiggsAudioModel.generate``.

    Called as ``HiggsAudioServeEngine.generate`` calls it (boson_multimodal/serve/serve_engine.py), with
    static KV caches sized as the engine sizes its own (text layers plus DualFFN layers) on the CPU, in two
    buckets: the first outgrown half-way through the audio, so that generation moves to the second as the
    engine's does when a sequence outgrows a bucket (upstream's ``_copy_kv_cache``). Three differences: greedy (``do_sample=False``); repetition-aware sampling off (``ras_win_len=None``:
    it resamples repeated codes at random, even under greedy); the ``<|eot_id|>`` id as
    ``eos_token_id`` instead of stop strings, which need a tokenizer. The prompt is collated as the engine
    does (``round_to=1``), with the audio-in codes the tiny model reads instead of Whisper features.
    """
    prompt = collator(round_to=1)([example.prompt])
    inputs = tiny.fields(prompt)
    inputs.pop("label_ids"), inputs.pop("label_audio_ids")
    max_new_tokens = 2 * (FRAMES + tiny.CODEBOOKS) + 8  # room for a run that does not stop where it should
    cache_config = copy.deepcopy(model.config.text_config)
    cache_config.num_hidden_layers += len(model.config.audio_dual_ffn_layers or [])
    prompt_length = prompt.input_ids.shape[1] + prompt.audio_in_ids.shape[1]
    caches = collections.OrderedDict(
        (length, StaticCache(config=cache_config, max_batch_size=1, max_cache_len=length, device=model.device,
                             dtype=model.dtype))
        for length in (prompt_length + FRAMES // 2, prompt_length + max_new_tokens)
    )
    sequences, audio = model.generate(
        **inputs, max_new_tokens=max_new_tokens, use_cache=True, do_sample=False, past_key_values_buckets=caches,
        ras_win_len=None, eos_token_id=EOT, pad_token_id=tiny.PAD,
    )
    text = sequences[0, prompt.input_ids.shape[1]:].tolist()
    # As the serve engine decodes: revert the delay pattern, drop the stream's bos and eos columns.
    codes = revert_delay_pattern(audio[0])[:, 1:-1].cpu() if audio else None
    return Generation(text=text, codes=codes, target=example.target)


def report(comparison: Comparison) -> str:
    """The comparison as a table, for the command and the README."""
    p, u = comparison.patched, comparison.unshifted
    rows = [
        ("", "patched loss", "unshifted seed loss"),
        ("steps (stopped at the plateau)", *(f"{o.steps}" + ("" if o.plateau_step else " (no plateau)") for o in (p, u))),
        ("final loss (its own objective)", *(f"{o.final_loss:.4f}" for o in (p, u))),
        ("  text / audio", *(f"{o.final_text_loss:.4f} / {o.final_audio_loss:.4f}" for o in (p, u))),
        ("teacher-forced audio accuracy (next code)", *(f"{o.audio_accuracy:.1%}" for o in (p, u))),
        ("same-position audio \"accuracy\"", *(f"{o.audio_same_position_accuracy:.1%}" for o in (p, u))),
        ("teacher-forced text accuracy", *(f"{o.text_accuracy:.1%}" for o in (p, u))),
        ("generated targets equal to training targets", *(f"{o.exact_matches}/{len(o.generations)}" for o in (p, u))),
        ("generated codes at their place", *(f"{_mean([g.code_agreement for g in o.generations]):.1%}" for o in (p, u))),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.append(
        f"  ({p.audio_positions} supervised audio codes, {p.text_positions} supervised text tokens; "
        f"trained in {p.seconds:.1f} s and {u.seconds:.1f} s)"
    )
    return "\n".join(lines)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
