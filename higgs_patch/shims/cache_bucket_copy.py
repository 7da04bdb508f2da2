"""cache-bucket-copy (transformers 4.56 and later)

Symptom: ``AttributeError: 'StaticCache' object has no attribute 'key_cache'`` when generation with
``past_key_values_buckets`` (the serve engine's static caches of several sizes) outgrows a bucket
and moves to the next one.

Cause: boson's ``_copy_kv_cache`` copies the smaller bucket into the larger through the cache's
``key_cache`` and ``value_cache`` lists. 4.56 rebuilt caches as a list of layers (``cache.layers``,
each with its own ``keys`` and ``values``), allocated at their first update; a larger bucket not yet
used holds none. From 5.15 a static layer also counts what it holds (``cumulative_length``) and writes
the next position there, where 4.46 wrote at the position it was given.

Change: the copy goes layer by layer: a layer of the larger bucket not yet allocated is allocated
like the smaller one's, gets its keys and values in the first positions, and its count where it
keeps one. As before, a target smaller than the source is an error, and every layer boson counts
(text layers plus DualFFN layers) is copied.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping


def copy_by_layer(original: Callable[..., Any], options: Mapping[str, Any]):
    """Layer on ``HiggsAudioModel._copy_kv_cache``; does the copy itself (the original needs ``key_cache``)."""
    signature = inspect.signature(original)

    def wrapper(wrapped, instance, args, kwargs):
        bound = signature.bind(instance, *args, **kwargs).arguments
        source, target = bound["from_cache"], bound["to_cache"]
        config = instance.config
        count = config.text_config.num_hidden_layers + len(config.audio_dual_ffn_layers or ())
        for index in range(count):
            _copy_layer(source.layers[index], target.layers[index], index)

    return wrapper


def _copy_layer(source: Any, target: Any, index: int) -> None:
    if not _allocated(source):
        return  # nothing was written into it: nothing to copy
    length = source.max_cache_len
    if target.max_cache_len < length:
        raise AssertionError(f"The target cache size {target.max_cache_len} is smaller than the source cache size {length}.")
    if not _allocated(target):
        _allocate_like(target, source)
    target.keys[:, :, :length, :] = source.keys
    target.values[:, :, :length, :] = source.values
    if hasattr(source, "cumulative_length"):
        target.cumulative_length.copy_(source.cumulative_length)


def _allocated(layer: Any) -> bool:
    return bool(getattr(layer, "is_initialized", getattr(layer, "keys", None) is not None))


def _allocate_like(target: Any, source: Any) -> None:
    """The layer's own lazy allocation, fed the source's keys (and values, where it takes them)."""
    if len(inspect.signature(target.lazy_initialization).parameters) >= 2:
        target.lazy_initialization(source.keys, source.values)
    else:
        target.lazy_initialization(source.keys)
