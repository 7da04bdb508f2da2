"""collator-audio-index

Symptom: ``IndexError`` in ``ChatMLDatasetSample.get_audio_codes`` for a sample with more
``<|AUDIO|>`` / ``<|AUDIO_OUT|>`` tokens than audio segments; and, silently, all audio labels of a
sample become -100 from the second time it is collated (after the first epoch, with the Trainer's
default ``dataloader_num_workers=0``).

Cause: the collator gives every audio token the next segment index (a cumsum over both kinds) with
no bounds check; and it writes ``label_ids[audio_out_mask] = -100`` into the very sample objects it
was given, so the next collation judges the audio-out segment "not trained".

Change: before upstream's collation runs (its code is not copied), each sample is handed over as a
shallow copy with its own ``label_ids``; no audio data is copied. A sample whose audio tokens
outnumber its segments is routed by ``audio_index_policy``:

- ``clamp`` (default): tokens past the last segment read the last one, with a warning once per
  collator, unless an audio-in token then reads the same segment as an audio-out token and the
  collator uses audio-in data (its codes, or its waveform on the Whisper path): clamping would put
  the target into the prompt, so that is an :class:`~higgs_patch.AudioIndexError`;
- ``clamp-always``: the seed's clamp exactly, leak included, with a distinct warning when it leaks;
- ``strict``: any mismatch is an ``AudioIndexError``.

A sample with audio tokens and no segment at all is an ``AudioIndexError`` under every policy.
"""

from __future__ import annotations

import copy
import logging
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from ..errors import AudioIndexError, PatchError

log = logging.getLogger("higgs_patch")

POLICIES = ("clamp", "clamp-always", "strict")


@dataclass
class AudioIndexCounts:
    """What the routine did for one collator in this process."""

    clamped_samples: int = 0
    clamped_tokens: int = 0
    leaked_samples: int = 0


_counts: "weakref.WeakKeyDictionary[object, AudioIndexCounts]" = weakref.WeakKeyDictionary()
_counts_lock = threading.Lock()


def audio_index_counts(collator: object) -> AudioIndexCounts:
    """Counts of clamped and leaking samples seen by ``collator`` in this process (zeros if none)."""
    with _counts_lock:
        return copy.copy(_counts.get(collator, AudioIndexCounts()))


def route_samples(original: Callable[..., Any], options: Mapping[str, Any]):
    policy = options["audio_index_policy"]
    if policy not in POLICIES:
        raise PatchError(f"audio_index_policy={policy!r} is not one of {list(POLICIES)}")

    def wrapper(wrapped, instance, args, kwargs):
        batch = list(args[0] if args else kwargs.pop("batch"))
        routed = [_own_sample(instance, sample, position, policy) for position, sample in enumerate(batch)]
        return wrapped(routed, *args[1:], **kwargs)

    return wrapper


def _own_sample(collator: Any, sample: Any, position: int, policy: str) -> Any:
    """A shallow copy of ``sample`` the collator may write into, its segments routed if needed."""
    owned = _shallow_copy(sample)
    if sample.label_ids is not None:
        owned.label_ids = sample.label_ids.clone()
    n_in, n_out = _count_tokens(sample.input_ids, collator.audio_in_token_id, collator.audio_out_token_id)
    n_segments = len(sample.audio_ids_start)
    if n_in + n_out <= n_segments:
        return owned
    ids = sample.input_ids
    is_in, is_out = ids == collator.audio_in_token_id, ids == collator.audio_out_token_id
    where = f"sample {position} of the batch has {n_in} audio-in and {n_out} audio-out tokens but {n_segments} audio segment(s)"
    if n_segments == 0:
        raise AudioIndexError(f"{where}: there is no audio to read for its audio tokens; give it its audio codes")
    if policy == "strict":
        raise AudioIndexError(f"{where} (audio_index_policy='strict')")

    route = torch.arange(n_in + n_out).clamp_(max=n_segments - 1)
    kinds = is_out[is_in | is_out]  # True for audio-out, in token order
    leaks = _uses_audio_in(collator) and bool(
        torch.isin(route[~kinds], route[kinds]).any() if n_in and n_out else False
    )
    if leaks and policy == "clamp":
        raise AudioIndexError(
            f"{where}: clamping makes an audio-in token read the same segment as an audio-out token, so the "
            "target audio would also be in the prompt and the model would learn to copy it. This is the "
            "voice-clone layout with only the target audio supplied. Supply the reference audio as its own "
            "segment (before the target), or apply with audio_index_policy='clamp-always' to clamp anyway."
        )
    _count(collator, position, n_in + n_out - n_segments, leaks)
    return _routed(owned, route)


def _shallow_copy(sample: Any) -> Any:
    if not hasattr(sample, "__dict__"):
        return copy.copy(sample)
    owned = object.__new__(type(sample))
    owned.__dict__.update(sample.__dict__)
    return owned


def _count_tokens(ids: torch.Tensor, audio_in: int, audio_out: int) -> tuple[int, int]:
    if len(ids) <= 512:  # below this a Python count beats two tensor comparisons and reductions
        values = ids.tolist()
        return values.count(audio_in), values.count(audio_out)
    return int((ids == audio_in).sum()), int((ids == audio_out).sum())


def _uses_audio_in(collator: Any) -> bool:
    return bool(collator.return_audio_in_tokens or collator.encode_whisper_embed)


def _routed(sample: Any, route: torch.Tensor) -> Any:
    """Lay out the sample's segments so that upstream's sequential index k reads segment route[k]."""
    codes_start, codes_len = _segments(sample.audio_ids_start, sample.audio_ids_concat.shape[-1])
    columns = _gather_index(codes_start[route], codes_len[route])
    sample.audio_ids_concat = sample.audio_ids_concat[:, columns.to(sample.audio_ids_concat.device)]
    if sample.audio_label_ids_concat is not None:
        sample.audio_label_ids_concat = sample.audio_label_ids_concat[:, columns.to(sample.audio_label_ids_concat.device)]
    sample.audio_ids_start = _starts(codes_len[route])
    if len(sample.audio_waveforms_start) == len(codes_start):
        wv_start, wv_len = _segments(sample.audio_waveforms_start, sample.audio_waveforms_concat.shape[-1])
        samples = _gather_index(wv_start[route], wv_len[route])
        sample.audio_waveforms_concat = sample.audio_waveforms_concat[samples.to(sample.audio_waveforms_concat.device)]
        sample.audio_waveforms_start = _starts(wv_len[route])
        sample.audio_sample_rate = sample.audio_sample_rate[route.to(sample.audio_sample_rate.device)]
    return sample


def _segments(starts: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.as_tensor(starts, dtype=torch.long).cpu()
    ends = torch.cat([starts[1:], torch.tensor([total])])
    return starts, ends - starts


def _gather_index(starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Indices of the concatenation of [start, start + length) ranges, without a Python loop."""
    offsets = _starts(lengths)
    return torch.repeat_interleave(starts - offsets, lengths) + torch.arange(int(lengths.sum()))


def _starts(lengths: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(lengths, 0) - lengths


def _count(collator: Any, position: int, clamped: int, leaks: bool) -> None:
    with _counts_lock:
        counts = _counts.setdefault(collator, AudioIndexCounts())
        first_clamp, first_leak = counts.clamped_samples == 0, leaks and counts.leaked_samples == 0
        counts.clamped_samples += 1
        counts.clamped_tokens += clamped
        counts.leaked_samples += int(leaks)
    if first_leak:
        log.warning(
            "(audio-index-leak) sample %d: clamped audio tokens make an audio-in token read the target's "
            "segment: the target audio is in the prompt (audio_index_policy='clamp-always'); "
            "logged once per collator, see higgs_patch.audio_index_counts()", position
        )
    elif first_clamp:
        log.warning(
            "(audio-index-clamp) sample %d has more audio tokens than audio segments; the extra tokens read "
            "the last segment. Logged once per collator, see higgs_patch.audio_index_counts()", position
        )
