"""sample-cache-keyword (transformers 5.24 and later)

Symptom: ``TypeError: HiggsAudioModel.forward() got an unexpected keyword argument 'cache'`` in the
first step of ``HiggsAudioModel.generate``.

Cause: 5.24 renamed the key/value cache from ``past_key_values`` to ``cache``: ``generate()`` takes the
old name for the new one and hands the decoding loop its cache as ``cache``. Boson's loop
(``HiggsAudioModel._sample``) passes what it is handed to its forward, which takes ``past_key_values``,
and keeps the cache it gets back under that name.

Change: boson's decoding loop gets the cache ``generate()`` made under the name boson uses,
``past_key_values``, as before 5.24.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

NEW, OLD = "cache", "past_key_values"


def rename_cache(original: Callable[..., Any], options: Mapping[str, Any]):
    """Layer on ``HiggsAudioModel._sample``."""

    def wrapper(wrapped, instance, args, kwargs):
        if NEW in kwargs and OLD not in kwargs:
            kwargs = dict(kwargs)
            kwargs[OLD] = kwargs.pop(NEW)
        return wrapped(*args, **kwargs)

    return wrapper
