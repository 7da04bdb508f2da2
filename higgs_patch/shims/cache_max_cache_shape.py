"""cache-max-cache-shape (transformers 5.20 and later)

Symptom: ``AttributeError: 'StaticCache' object has no attribute 'get_max_cache_shape'`` when
``HiggsAudioModel.generate`` runs with a static cache (the serve engine's, cache buckets).

Cause: boson reads a cache's size with ``get_max_cache_shape()`` in its forward, its static-cache
masks and its cache-bucket promotion; 5.16 deprecated it for ``get_max_length()`` and 5.20 removed it.

Change: caches get ``get_max_cache_shape(layer_idx=0)`` back, as 5.19's alias of
``get_max_length(layer_idx)``. Revert removes it.
"""

from __future__ import annotations

from typing import Any, Mapping


def get_max_cache_shape(holder: type, options: Mapping[str, Any]):
    """``Cache.get_max_cache_shape`` for a ``Cache`` class (``holder``) that lacks it."""

    def get_max_cache_shape(self, layer_idx: int = 0):
        """The cache's maximum length, as ``get_max_length(layer_idx)`` gives it (-1: no maximum)."""
        return self.get_max_length(layer_idx)

    return get_max_cache_shape
