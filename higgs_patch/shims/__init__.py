"""One module per compatibility shim: what boson_multimodal 0.1.1 needs from a transformers line it
was not written for. Each reads top to bottom as symptom, cause, change, like the fixes.

A shim's declaration in ``patches/`` says which lines it serves (``[serves]``); elsewhere it is not
needed and the engine leaves it out. Factories follow the fixes' convention: a wrapped target's
factory is ``factory(original, options) -> wrapper``; an added name's (``provides``) is
``factory(holder, options) -> value``, the object put where ``holder`` lacks the name. Differences
between lines are read from transformers' own signatures once, when a factory runs, never by
comparing version numbers inside a wrapper.
"""

from __future__ import annotations

import contextvars
import inspect
from typing import Any, Callable, Mapping

#: The names transformers has given a layer's key/value cache argument: 4.46-4.55, 4.56-5.23, 5.24-.
CACHE_KEYWORDS = ("past_key_value", "past_key_values", "cache")


def keyword(function: Callable[..., Any], candidates: tuple[str, ...]) -> str:
    """The one of ``candidates`` that ``function`` takes as a parameter (its newest name wins).

    Decorators that keep ``__wrapped__`` (transformers' ``deprecate_kwarg``) are seen through, so
    the name is the one the function itself declares.
    """
    parameters = inspect.signature(inspect.unwrap(function)).parameters
    found = [name for name in candidates if name in parameters]
    if not found:
        raise LookupError(f"{function.__qualname__} takes none of {', '.join(candidates)}")
    return found[-1]


def scope(flag: contextvars.ContextVar[bool], what: str):
    """A wrapper factory for a boson target during whose call ``flag`` is set: a transformers target's
    layer reads it, and acts only inside that call (other models' calls are untouched)."""

    def factory(original: Callable[..., Any], options: Mapping[str, Any]):
        def wrapper(wrapped, instance, args, kwargs):
            token = flag.set(True)
            try:
                return wrapped(*args, **kwargs)
            finally:
                flag.reset(token)

        return wrapper

    factory.__doc__ = f"Layer on {what}: the flag {flag.name} is set while it runs."
    return factory
