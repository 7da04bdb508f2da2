"""collator-audio-index

Symptom: ``IndexError`` in ``ChatMLDatasetSample.get_audio_codes`` for a sample with more
``<|AUDIO|>`` / ``<|AUDIO_OUT|>`` tokens than audio segments; and, silently, all audio labels of a
sample become -100 from the second time it is collated (after the first epoch, with the Trainer's
default ``dataloader_num_workers=0``).

Cause: the collator gives every audio token the next segment index (a cumsum over both kinds) with
no bounds check; and it writes ``label_ids[audio_out_mask] = -100`` into the very sample objects it
was given, so the next collation judges the audio-out segment "not trained".

Change: before upstream's collation runs (its code is not copied), the batch is read once into a
list (a generator reaches upstream whole) and each sample is handed over as a shallow copy with its
own ``label_ids``; no audio data is copied. Every sample is checked before any is routed or counted:
an empty batch, something that is not a sample, or segment starts out of ascending order (upstream
reads them as empty segments) is an error. A sample whose audio tokens and segments differ in number
is routed by ``audio_index_policy``:

- ``clamp`` (default): tokens past the last segment read the last one, with a warning once per
  collator, unless that puts a target into its own prompt: an audio-in token reads the segment of a
  supervised audio-out token after it, and the collator uses audio-in data (its codes, or its
  waveform on the Whisper path). Then the model would learn to copy the target, so that is an
  :class:`~higgs_patch.AudioIndexError`. An audio-in token after the target is no leak (attention is
  causal), nor is a target upstream does not train. Extra segments are left unread, as upstream does;
- ``clamp-always``: the seed's clamp exactly, leak included, with a distinct warning when it leaks;
- ``strict``: any mismatch, more tokens or more segments, is an ``AudioIndexError``.

A sample with audio tokens and no segment at all is an ``AudioIndexError`` under every policy, unless
the collator reads none of them (no ``<|AUDIO_OUT|>``, and its audio-in tokens unused): then, as
upstream, nothing is read. ``None`` stands for "none" in the fields upstream lets be ``None`` (what
``HiggsAudioServeEngine`` builds: ``label_ids``, the waveform fields, and the audio codes and their
starts without reference audio); such a sample reaches upstream as it was given.
"""

from __future__ import annotations

import copy
import logging
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from ..errors import AudioIndexError, InputError, PatchError
from . import collator_batch

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
        samples, args, kwargs = collator_batch(args, kwargs)
        # Every sample is checked before any is counted or routed: a refused batch leaves no trace.
        plans = [_plan(instance, sample, position, policy) for position, sample in enumerate(samples)]
        routed = [_own_sample(instance, sample, plan, i) for i, (sample, plan) in enumerate(zip(samples, plans))]
        return wrapped(routed, *args, **kwargs)

    return wrapper


@dataclass(frozen=True)
class _Plan:
    """How one sample's audio tokens will read its segments."""

    route: torch.Tensor  # the segment each audio token reads, in token order
    clamped: int
    leaks: bool


def _plan(collator: Any, sample: Any, position: int, policy: str) -> _Plan | None:
    """None when the sample goes to upstream as it is; raises what the policy refuses."""
    if not (hasattr(sample, "input_ids") and hasattr(sample, "audio_ids_start")):
        raise InputError(
            f"sample {position} of the batch is a {type(sample).__name__}, not a ChatMLDatasetSample: "
            "collate the samples your dataset returns"
        )
    n_segments = len(_segment_starts(sample, position))
    n_in, n_out = _count_tokens(sample.input_ids, collator.audio_in_token_id, collator.audio_out_token_id)
    if n_in + n_out == n_segments or (n_in + n_out < n_segments and policy != "strict"):
        return None  # extra segments stay unread, as upstream leaves them
    where = f"sample {position} of the batch has {n_in} audio-in and {n_out} audio-out tokens but {n_segments} audio segment(s)"
    if n_in + n_out < n_segments:
        raise AudioIndexError(
            f"{where} (audio_index_policy='strict'): upstream would leave the extra segments unread. "
            "Give the sample one segment per audio token, in token order, or apply with audio_index_policy='clamp'"
        )
    if n_segments == 0 and not (n_out or (n_in and _uses_audio_in(collator))):
        return None  # upstream reads no segment of this sample: there is nothing to route
    if n_segments == 0:
        raise AudioIndexError(f"{where}: there is no audio to read for its audio tokens; give it its audio codes")
    if policy == "strict":
        raise AudioIndexError(
            f"{where} (audio_index_policy='strict'): give the sample one segment per audio token, in token "
            "order, or apply with audio_index_policy='clamp' to let the extra tokens read the last segment"
        )
    route = torch.arange(n_in + n_out).clamp_(max=n_segments - 1)
    leaks = _uses_audio_in(collator) and _target_in_its_prompt(collator, sample, route)
    if leaks and policy == "clamp":
        raise AudioIndexError(
            f"{where}: clamping makes an audio-in token read the segment of a supervised audio-out token after "
            "it, so the target audio would be in its own prompt and the model would learn to copy it. This is "
            "the voice-clone layout with only the target audio supplied. Supply the reference audio as its own "
            "segment (before the target), or apply with audio_index_policy='clamp-always' to clamp anyway."
        )
    return _Plan(route, n_in + n_out - n_segments, leaks)


def _segment_starts(sample: Any, position: int) -> list[int]:
    """The sample's segment starts, refused unless they ascend within their concatenation (waveforms too).

    Upstream reads starts out of order as empty or overlapping segments, without a word.
    """
    starts = _as_list(sample.audio_ids_start)
    if starts:
        _check_ascending(starts, _length(sample.audio_ids_concat), "audio_ids_start", position)
    wave_starts = _as_list(sample.audio_waveforms_start)
    if wave_starts:
        _check_ascending(wave_starts, sample.audio_waveforms_concat.shape[-1], "audio_waveforms_start", position)
    return starts


def _as_list(values: Any) -> list[int]:
    """The starts as a list; ``None`` (the serve engine's sample without that audio) is none."""
    if values is None:
        return []
    return values.tolist() if isinstance(values, torch.Tensor) else list(values)


def _length(concat: Any) -> int:
    return 0 if concat is None else concat.shape[-1]


def _check_ascending(starts: list[int], total: int, name: str, position: int) -> None:
    if not starts or (starts == sorted(starts) and starts[0] >= 0 and starts[-1] <= total):
        return
    raise AudioIndexError(
        f"sample {position} of the batch has {name} {starts}, not in ascending order within [0, {total}]: "
        f"segment k must start where segment k - 1 ends; build {name} as the cumulative sum of the segment "
        "lengths, starting at 0, in the order the audio tokens appear"
    )


def _target_in_its_prompt(collator: Any, sample: Any, route: torch.Tensor) -> bool:
    """Does an audio-in token read the segment of a supervised audio-out token that comes after it?

    That is a leak: the target's audio is in its own prompt. An audio-in token after the target is
    not (attention is causal, the target never sees it), nor is an audio-out token upstream will not
    train (its ``<|AUDIO_OUT|>`` label is negative, or the sample has no labels).
    """
    ids = sample.input_ids
    is_audio = (ids == collator.audio_in_token_id) | (ids == collator.audio_out_token_id)
    is_out = (ids[is_audio] == collator.audio_out_token_id).tolist()
    labels = sample.label_ids
    trained = [False] * len(is_out) if labels is None else (labels[is_audio] >= 0).tolist()
    read_by_prompt: set[int] = set()
    for segment, out, supervised in zip(route.tolist(), is_out, trained):
        if not out:
            read_by_prompt.add(segment)
        elif supervised and segment in read_by_prompt:
            return True
    return False


def _own_sample(collator: Any, sample: Any, plan: _Plan | None, position: int) -> Any:
    """A shallow copy of ``sample`` the collator may write into, its segments routed by ``plan``."""
    owned = _shallow_copy(sample)
    if sample.label_ids is not None:
        owned.label_ids = sample.label_ids.clone()
    if plan is None:
        return owned
    _count(collator, position, plan.clamped, plan.leaks)
    return _routed(owned, plan.route)


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
    if len(_as_list(sample.audio_waveforms_start)) == len(codes_start):
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
