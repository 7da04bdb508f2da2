"""sample-streamer (transformers 4.57 and later)

Symptom: ``TypeError: HiggsAudioModel._sample() missing 1 required positional argument: 'streamer'``
when ``HiggsAudioModel.generate`` is called without a streamer.

Cause: boson's ``_sample`` declares ``streamer`` without a default; from 4.57 ``generate()`` passes
it only when the caller gave one.

Change: ``_sample`` gets ``streamer=None`` when ``generate()`` passed none, as before 4.57.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping


def default_streamer(original: Callable[..., Any], options: Mapping[str, Any]):
    """Layer on ``HiggsAudioModel._sample``."""
    position = list(inspect.signature(original).parameters).index("streamer") - 1  # without self

    def wrapper(wrapped, instance, args, kwargs):
        if "streamer" not in kwargs and len(args) <= position:
            kwargs = {**kwargs, "streamer": None}
        return wrapped(*args, **kwargs)

    return wrapper
