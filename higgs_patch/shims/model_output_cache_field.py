"""model-output-cache-field (transformers 5.24 and later)

Symptom: ``TypeError: HiggsAudioModelOutputWithPast.__init__() got an unexpected keyword argument
'cache'`` at the end of every forward of a Higgs Audio model.

Cause: 5.24 renamed the cache of every model output from ``past_key_values`` to ``cache``. For old
callers, ``ModelOutput`` renames the old name to the new one everywhere: in the keyword arguments of
every subclass's ``__init__`` (wrapped by its metaclass when the dataclass is made), and in every item
and attribute set or read. Boson's output classes (``HiggsAudioModelOutputWithPast``,
``HiggsAudioGenerationOutput``) declare the field ``past_key_values`` themselves, so the renamed
argument matches no field, and a value set under it would be stored under a name they lack.

Change: a ``ModelOutput`` class that declares ``past_key_values`` (or ``cache_params``) as a field of
its own keeps that name: its ``__init__`` is not wrapped, and its items and attributes are not renamed.
Every other output class renames as 5.24 does. A class made while the shim is on keeps its unwrapped
``__init__`` after a revert.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

#: The names 5.24 renames to ``cache``.
OLD_NAMES = ("past_key_values", "cache_params")


def _declares(cls: type, name: str) -> bool:
    return name in getattr(cls, "__dataclass_fields__", {})


def keep_declared_init(original: Callable[..., Any], options: Mapping[str, Any]):
    """Layer on the output metaclass's ``__setattr__``: a class declaring an old name gets its own ``__init__``."""

    def wrapper(wrapped, instance, args, kwargs):
        name, value = args
        if name == "__init__" and any(_declares(instance, old) for old in OLD_NAMES):
            return type.__setattr__(instance, name, value)
        return wrapped(*args, **kwargs)

    return wrapper


def keep_declared_name(original: Callable[..., Any], options: Mapping[str, Any]):
    """Layer on ``ModelOutput._replace_old_cache_name``: a field the class declares keeps its name."""

    def wrapper(wrapped, instance, args, kwargs):
        key = args[0] if args else kwargs["key"]
        if key in OLD_NAMES and _declares(type(instance), key):
            return key
        return wrapped(*args, **kwargs)

    return wrapper
