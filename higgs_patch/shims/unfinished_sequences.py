"""unfinished-sequences-arguments (transformers 4.50 and later)

Symptom: ``TypeError: GenerationMixin._has_unfinished_sequences() got an unexpected keyword argument
'cur_len'`` as soon as ``HiggsAudioModel.generate`` starts its loop.

Cause: boson's ``_sample`` asks whether to go on as 4.46 did, passing ``cur_len`` and ``max_length``;
4.50 removed both parameters (they only mattered under torch.compile, which boson's loop does not run in).

Change: those two arguments are dropped from a call that passes them, when the installed method does
not take them. Calls without them are untouched.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

#: What 4.46's signature took and later ones do not.
REMOVED = ("cur_len", "max_length")


def drop_removed_arguments(original: Callable[..., Any], options: Mapping[str, Any]):
    """Layer on ``GenerationMixin._has_unfinished_sequences``."""
    taken = inspect.signature(original).parameters
    removed = tuple(name for name in REMOVED if name not in taken)

    def wrapper(wrapped, instance, args, kwargs):
        if any(name in kwargs for name in removed):
            kwargs = {name: value for name, value in kwargs.items() if name not in removed}
        return wrapped(*args, **kwargs)

    return wrapper
