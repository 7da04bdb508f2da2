"""The one patching mechanism: a slot per patched attribute, holding the layers of every patch on it.

A slot puts a single wrapt proxy over the original and runs the active layers (wrapt-style wrappers
``(wrapped, instance, args, kwargs)``) around it, oldest innermost. Patches therefore stack on one
target and can be reverted in any order; when the last layer goes, the very original object is put
back, unless someone else has wrapped the attribute after us: then we leave their wrapper alone,
our proxy stays beneath it as a pass-through, and we say so.

A target that is a module (the collator's global ``torch``) gets an object proxy instead, which runs
the layers around every function read through it; nothing outside the module that holds the proxy
sees a difference.
"""

from __future__ import annotations

import functools
import inspect
import logging
from types import ModuleType
from typing import Any, Callable

import wrapt

log = logging.getLogger("higgs_patch")

Layer = Callable[[Callable[..., Any], Any, tuple, dict], Any]


class Slot:
    def __init__(self, path: str, module: ModuleType, qualname: str) -> None:
        self.path = path
        self.parent, self.name, self.original = wrapt.resolve_path(module, qualname)
        self._owned = not inspect.isclass(self.parent) or self.name in vars(self.parent)
        self.layers: tuple[Layer, ...] = ()
        self.installed: object | None = None

    def add(self, layer: Layer) -> None:
        self.layers = self.layers + (layer,)
        if self.installed is None:
            self.installed = self._proxy()
            wrapt.apply_patch(self.parent, self.name, self.installed)

    def remove(self, layer: Layer) -> bool:
        """Drop one layer; return True once this slot is gone and the original is back in place."""
        self.layers = tuple(item for item in self.layers if item is not layer)
        if self.layers or self.installed is None:
            return False
        if self._current() is not self.installed:
            log.warning(
                "%s was wrapped by someone else after higgs_patch; leaving their wrapper in place "
                "(ours beneath it now passes calls straight through)",
                self.path,
            )
            return False
        if self._owned:
            setattr(self.parent, self.name, self.original)
        else:
            delattr(self.parent, self.name)
        self.installed = None
        return True

    def _current(self) -> object:
        if inspect.isclass(self.parent):
            return vars(self.parent).get(self.name)
        return getattr(self.parent, self.name, None)

    def _proxy(self) -> object:
        if isinstance(self.original, ModuleType):
            return _ModuleProxy(self.original, self)
        return wrapt.FunctionWrapper(self.original, self.dispatch)

    def dispatch(self, wrapped: Callable[..., Any], instance: Any, args: tuple, kwargs: dict) -> Any:
        layers = self.layers
        if not layers:
            return wrapped(*args, **kwargs)
        if len(layers) == 1:
            return layers[0](wrapped, instance, args, kwargs)
        call = wrapped
        for layer in layers[:-1]:
            call = functools.partial(_invoke, layer, call, instance)
        return layers[-1](call, instance, args, kwargs)


def _invoke(layer: Layer, wrapped: Callable[..., Any], instance: Any, *args: Any, **kwargs: Any) -> Any:
    return layer(wrapped, instance, args, kwargs)


class _ModuleProxy(wrapt.ObjectProxy):
    """Stands in for a module; functions read through it run the slot's layers."""

    def __init__(self, module: ModuleType, slot: Slot) -> None:
        super().__init__(module)
        self._self_slot = slot
        self._self_functions: dict[str, object] = {}

    def __getattr__(self, name: str) -> Any:
        value = getattr(self.__wrapped__, name)
        if not (inspect.isroutine(value) and not name.startswith("_")):
            return value
        cached = self._self_functions.get(name)
        if cached is None or cached.__wrapped__ is not value:
            cached = self._self_functions[name] = wrapt.FunctionWrapper(value, self._self_slot.dispatch)
        return cached
