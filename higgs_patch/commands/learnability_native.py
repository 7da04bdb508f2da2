"""``higgs-patch learnability --native``: transformers' own Higgs Audio v2 learns to stop with the plugin.

The tiny native model (higgs_patch/commands/tiny_native.py) memorises two short code sequences, each
the audio of a different prompt, through transformers' real ``HiggsAudioV2Processor`` labels; then
upstream's greedy ``generate`` speaks each prompt back. With the native patches it generates the codes
and stops at frame T + K + 1 (the begin frame, T frames of codes, K frames of the delay pattern's end);
without them (the processor's labels hide every end-of-stream code) it runs to ``MAX_FRAMES``. The
same training both times: the optimizer, steps and seed. CPU, one thread, a few seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import engine
from . import tiny_native

PROMPTS = ("please say hello now", "please say world now")  # at least K tokens before <|audio_out_bos|>
FRAMES = (4, 6)  # frames of codes of each prompt's audio
STEPS, LEARNING_RATE, MAX_FRAMES = 200, 3e-2, 30
SEGMENT = " <|audio_out_bos|><|AUDIO_OUT|><|audio_eos|>"


@dataclass(frozen=True)
class Generation:
    prompt: str
    target: list[list[int]]  # the training audio, delay pattern and all: (frames, codebooks)
    generated: list[list[int]]

    @property
    def stopped(self) -> bool:
        """Generation ended on its own: the last frame is all end-of-stream, before MAX_FRAMES."""
        return len(self.generated) < MAX_FRAMES and all(code == tiny_native.EOS for code in self.generated[-1])

    @property
    def exact(self) -> bool:
        """The codes generated are the training codes, up to their first all-EOS frame, and it stopped there."""
        end = next(i for i, frame in enumerate(self.target) if all(c == tiny_native.EOS for c in frame)) + 1
        return self.stopped and self.generated == self.target[:end]


@dataclass(frozen=True)
class Run:
    patched: bool
    loss: float
    generations: tuple[Generation, ...]


def native_patches() -> list[str]:
    """The ids of the patches of transformers' own Higgs Audio v2 (implemented in higgs_patch.native)."""
    return [d.id for d in engine.known().values()
            if all(t.wrapper.startswith("higgs_patch.native.") for t in d.targets)]


def run(patched: bool, steps: int = STEPS) -> Run:
    """Train the tiny native model on the two prompts, then generate each back greedily."""
    engine.revert(*native_patches())
    if patched:
        engine.apply(*native_patches())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same arithmetic on every machine, and fast at this size
    try:
        return _train_and_generate(patched, steps)
    finally:
        torch.set_num_threads(threads)
        engine.revert(*native_patches())


def _train_and_generate(patched: bool, steps: int) -> Run:
    processor = tiny_native.processor()
    batch = dict(tiny_native.batch(processor, [p + SEGMENT for p in PROMPTS], list(FRAMES)))
    model = tiny_native.model(seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    generations = []
    for index, prompt in enumerate(PROMPTS):
        ids = processor.tokenizer([prompt + " <|audio_out_bos|>"], return_tensors="pt")
        with torch.no_grad():
            audio = model.generate(**ids, max_new_tokens=MAX_FRAMES, do_sample=False)
        valid = batch["audio_input_ids_mask"][index]
        generations.append(Generation(prompt, batch["audio_input_ids"][index][valid].tolist(), audio[0].tolist()))
    return Run(patched, float(loss.detach()), tuple(generations))


def compare(steps: int = STEPS) -> tuple[Run, Run]:
    """The patched run, then the same training without the native patches."""
    return run(True, steps), run(False, steps)


def problems(patched: Run, unpatched: Run) -> list[str]:
    found = [f"patched: {g.prompt!r} generated {len(g.generated)} frames that are not its training codes and a stop"
             for g in patched.generations if not g.exact]
    found += [f"unpatched: {g.prompt!r} stopped after {len(g.generated)} frames: the contrast shows nothing"
              for g in unpatched.generations if g.stopped]
    return found


def report(patched: Run, unpatched: Run) -> str:
    lines = []
    for run_ in (patched, unpatched):
        lines.append(f"  {'with' if run_.patched else 'without'} the native patches: loss {run_.loss:.3f} after {STEPS} steps")
        for g in run_.generations:
            verdict = "the training codes, then stopped" if g.exact else "stopped" if g.stopped else "never stopped"
            lines.append(f"    {g.prompt!r}: {len(g.generated)} frames generated ({verdict})")
    return "\n".join(lines)
