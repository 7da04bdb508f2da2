"""Benchmark 2: upstream's collator, unpatched and with ``collator-audio-index`` + ``device-tensor-factory``.

The same valid batches for both: 16 voice-clone samples, each a prompt, an ``<|AUDIO|>`` reference
(4 s) and an ``<|AUDIO_OUT|>`` target (6 s), 8 codebooks at 25 frames/s (250 frames of codes per
sample). The Whisper path adds a 16 kHz waveform per segment and a real ``WhisperFeatureExtractor``.

Upstream writes into its input samples, so every timed collation gets a fresh copy of each sample's
``label_ids`` (made before the clock starts), for both variants. The patches are applied before and
reverted after each patched repeat, outside the clock; repeats alternate between the two.
"""

from __future__ import annotations

import dataclasses
import types

import torch

import higgs_patch
from harness import Row, interleave, median, now, paired

PATCHES = ("collator-audio-index", "device-tensor-factory")
BATCH, CODEBOOKS, CODES = 16, 8, 1024
FRAME_RATE, SAMPLE_RATE = 25, 16000
REFERENCE_FRAMES, TARGET_FRAMES = 4 * FRAME_RATE, 6 * FRAME_RATE


def sample(seed: int, whisper: bool):
    from higgs_patch.commands.tiny import AUDIO_IN, AUDIO_OUT, ChatMLDatasetSample

    g = torch.Generator().manual_seed(seed)
    prompt, answer = 48, 16
    words = torch.randint(1, 200, (prompt + answer,), generator=g)
    ids = torch.cat([words[:prompt], torch.tensor([AUDIO_IN, AUDIO_OUT]), words[prompt:]])
    labels = torch.cat([torch.full((prompt,), -100), torch.tensor([-100, AUDIO_OUT]), words[prompt:]])
    frames = REFERENCE_FRAMES + TARGET_FRAMES
    codes = torch.randint(0, CODES, (CODEBOOKS, frames), generator=g)
    starts = torch.tensor([0, REFERENCE_FRAMES])
    if whisper:
        per_frame = SAMPLE_RATE // FRAME_RATE
        waves, wave_starts = torch.randn(frames * per_frame, generator=g), starts * per_frame
        rates = torch.full((2,), SAMPLE_RATE)
    else:
        waves, wave_starts, rates = torch.zeros(0), torch.zeros(0, dtype=torch.long), torch.zeros(0)
    return ChatMLDatasetSample(
        input_ids=ids, label_ids=labels, audio_ids_concat=codes, audio_ids_start=starts,
        audio_waveforms_concat=waves, audio_waveforms_start=wave_starts, audio_sample_rate=rates,
        audio_speaker_indices=torch.zeros(2, dtype=torch.long),
    )


def collator(whisper: bool):
    from higgs_patch.commands import tiny

    options = dict(audio_num_codebooks=CODEBOOKS, audio_stream_bos_id=CODES, audio_stream_eos_id=CODES + 1)
    if whisper:
        import transformers

        processor = types.SimpleNamespace(feature_extractor=transformers.WhisperFeatureExtractor())
        options.update(encode_whisper_embed=True, whisper_processor=processor)
    return tiny.collator(**options)


def _fresh(samples):
    return [dataclasses.replace(s, label_ids=s.label_ids.clone()) for s in samples]


def _same(a, b) -> bool:
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if isinstance(x, torch.Tensor) and not (x.shape == y.shape and torch.equal(x, y)):
            return False
    return True


def measure(whisper: bool, repeats: int, calls: int) -> tuple[dict[str, list[float]], bool]:
    """Seconds per batch for each variant, and whether both collated to equal batches."""
    collate = collator(whisper)
    samples = [sample(seed, whisper) for seed in range(BATCH)]
    upstream_batch = collate(_fresh(samples))
    with higgs_patch.applied(*PATCHES):
        patched_batch = collate(_fresh(samples))

    def variant(patched: bool):
        def once() -> float:
            batches = [_fresh(samples) for _ in range(calls)]
            if patched:
                higgs_patch.apply(*PATCHES)
            try:
                start = now()
                for batch in batches:
                    collate(batch)
                return (now() - start) / calls
            finally:
                if patched:
                    higgs_patch.revert(*PATCHES)
        return once

    seconds = interleave({"upstream": variant(False), "patched": variant(True)}, repeats)
    return seconds, _same(upstream_batch, patched_batch)


#: The goal the design holds. Not writing into the caller's samples costs a fixed amount per sample (a shallow copy
#: with its own label_ids, the audio-token count, the dispatch of the collator's factory calls): about 10 to 30 us
#: measured. So the goal is that fixed cost, at most FIXED_COST_US per sample, rather than a throughput ratio, which
#: depends on how much work upstream does per sample (0.88x to 0.93x with codes only). On the Whisper path feature
#: extraction dominates and the cost is within its noise: there the goal is the throughput, >= 0.95x.
#: docs/performance.md explains it.
FIXED_COST_US = 40


def run(quick: bool) -> list[Row]:
    rows = []
    for whisper, repeats, calls in ((False, 5 if quick else 21, 10 if quick else 20), (True, 3 if quick else 11, 1)):
        seconds, same = measure(whisper, repeats, calls)
        rate = {name: [BATCH / s for s in found] for name, found in seconds.items()}
        path = "Whisper path" if whisper else "codes only"
        note = (f"batch {BATCH}, {CODEBOOKS} codebooks, {REFERENCE_FRAMES + TARGET_FRAMES} frames/sample; "
                f"{median(seconds['upstream']) * 1e3:.2f} vs {median(seconds['patched']) * 1e3:.2f} ms/batch; "
                f"{repeats} repeats x {calls} batches; outputs {'equal' if same else 'DIFFER'}")
        rows.append(Row(f"collator ({path})", "throughput", "samples/s", "upstream", median(rate["upstream"]),
                        "patched", median(rate["patched"]), goal=">= 0.95" if whisper else "info",
                        **paired(rate["upstream"], rate["patched"]), note=note, samples=rate))
        if whisper:  # feature extraction dominates: the fixed cost is within its noise, the ratio is the goal
            continue
        cost = (median(seconds["patched"]) - median(seconds["upstream"])) / BATCH * 1e6
        rows.append(Row(f"collator ({path})", "fixed cost per sample", "us", "upstream", None, "patched", cost,
                        goal=f"<= {FIXED_COST_US} us", passed=cost <= FIXED_COST_US,
                        note="patched minus upstream, per sample (medians): what not writing into your samples costs"))
    return rows
