"""cache-max-length (transformers 4.49 to 5.14)

Symptom: ``AttributeError: 'StaticCache' object has no attribute 'get_max_length'`` when a Higgs
Audio model runs with a static key/value cache (the serve engine's, and generation from a
``past_key_values_buckets`` mapping).

Cause: boson's ``_update_causal_mask`` asks a static cache for ``get_max_length()``, deprecated in
4.46 for ``get_max_cache_shape()`` and removed in 4.49 (5.15 brought it back).

Change: caches get ``get_max_length()`` back, as 4.46's alias of ``get_max_cache_shape()``. Revert
removes it.
"""

from __future__ import annotations

from typing import Any, Mapping


def get_max_length(holder: type, options: Mapping[str, Any]):
    """``Cache.get_max_length`` for a ``Cache`` class (``holder``) that lacks it."""

    def get_max_length(self):
        """The cache's maximum length, as ``get_max_cache_shape()`` gives it (None or -1: no maximum)."""
        return self.get_max_cache_shape()

    return get_max_length
