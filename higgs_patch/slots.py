"""The one patching mechanism: a slot per patched attribute, holding the layers of every patch on it.

A slot puts a single wrapt proxy over the original and runs the active layers (wrapt-style wrappers
``(wrapped, instance, args, kwargs)``) around it: a layer of higher ``order`` runs outside one of
lower order, and among equal orders the oldest is innermost. Patches therefore stack on one
target and can be reverted in any order; when the last layer goes, the very original object is put
back, unless someone else has wrapped the attribute after us: then we leave their wrapper alone,
our proxy stays beneath it as a pass-through, and we say so.

A target that is a module (the collator's global ``torch``) gets a view instead: a module object
with the same attributes in which the declared functions run the layers. Only the module holding the
view sees a difference, and reading any other attribute through it costs what it always did.
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
from types import MethodType, ModuleType
from typing import Any, Callable

import wrapt

log = logging.getLogger("higgs_patch")

Layer = Callable[[Callable[..., Any], Any, tuple, dict], Any]


class Slot:
    def __init__(self, path: str, module: ModuleType, qualname: str, names: tuple[str, ...] = ()) -> None:
        self.path = path
        self.names = names
        self.module, self.spec = module, module.__spec__
        self.parent, self.name, self.original = wrapt.resolve_path(module, qualname)
        self._owned = not inspect.isclass(self.parent) or self.name in vars(self.parent)
        self.layers: tuple[Layer, ...] = ()
        self._orders: dict[int, int] = {}  # id(layer) -> order
        self.installed: object | None = None

    def add(self, layer: Layer, order: int = 0) -> None:
        if self.installed is None:
            installed = self._proxy()
            wrapt.apply_patch(self.parent, self.name, installed)
            self.installed = installed
        self._orders[id(layer)] = order
        position = sum(1 for item in self.layers if self._orders[id(item)] <= order)
        self.layers = self.layers[:position] + (layer,) + self.layers[position:]

    def remove(self, layer: Layer) -> bool:
        """Drop one layer; return True once this slot is gone (the original back, or a replacement left)."""
        self.layers = tuple(item for item in self.layers if item is not layer)
        self._orders.pop(id(layer), None)
        if self.layers or self.installed is None:
            return False
        if self.replacement() is not None:
            log.warning("%s was replaced after higgs_patch; leaving the replacement in place", self.path)
            self.installed = None  # our proxy is out of use: a later apply starts afresh
            return True
        if self._current() is not self.installed:
            log.warning(
                "%s was wrapped by someone else after higgs_patch; leaving their wrapper in place "
                "(ours beneath it now passes calls straight through)",
                self.path,
            )
            return False
        self._restore()
        return True

    def live(self) -> bool:
        """False once the module holding this slot was reloaded (importlib gives it a new ``__spec__``)
        or imported anew (a new module object): its code is new and unpatched. Someone else's wrapper
        or replacement over ours on the same class does not count: revert() deals with that."""
        if self.installed is None:
            return False
        module = sys.modules.get(self.module.__name__)
        return module is None or (module is self.module and module.__spec__ is self.spec)

    def discard(self) -> None:
        """Forget this slot after its module was reloaded: the original goes back only where our proxy
        still is (the old class), never over the reloaded code."""
        if self.installed is not None and self._current() is self.installed:
            self._restore()
        self.layers, self.installed = (), None

    def _restore(self) -> None:
        if self._owned:
            setattr(self.parent, self.name, self.original)
        else:
            delattr(self.parent, self.name)
        self.installed = None

    def replacement(self) -> object | None:
        """What now stands where our proxy was put, if that no longer leads to it; else None."""
        current = self._current()
        return None if self._leads_here(current) else current

    def shadowed(self, instance: Any) -> object | None:
        """What ``instance`` holds in its own ``__dict__`` under our name, if that does not lead to our proxy.

        Python finds an instance's attribute before its class's method: ``model.forward = ...`` takes
        the patched forward's place for that one model, the class itself unchanged.
        """
        if self.installed is None or not inspect.isclass(self.parent) or not isinstance(instance, self.parent):
            return None
        found = getattr(instance, "__dict__", {}).get(self.name)
        return None if found is None or self._leads_here(found) else found

    def _leads_here(self, current: object) -> bool:
        """Whether ``current`` is our proxy or says it wraps it: through ``__wrapped__`` (wrapt,
        functools.wraps), as a bound method's ``__func__`` or a partial's ``func``. A function assigned
        over it does not lead to it, whatever it calls."""
        return any(self._is_ours(item) for item in _unwrapped(current))

    def innermost(self, current: object) -> object:
        """The last thing ``current`` says it wraps (itself if nothing)."""
        return list(_unwrapped(current))[-1]

    def _is_ours(self, item: object) -> bool:
        return item is self.installed or (type(item) is BoundProxy and item._self_parent is self.installed)

    def _current(self) -> object:
        if inspect.isclass(self.parent):
            return vars(self.parent).get(self.name)
        return getattr(self.parent, self.name, None)

    def _proxy(self) -> object:
        if isinstance(self.original, ModuleType):
            return _module_view(self.original, self.names, self.dispatch)
        return Proxy(self.original, self.dispatch)

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


class BoundProxy(wrapt.BoundFunctionWrapper):
    """Our proxy bound to an instance. Its ``__func__`` is, as a bound method's, the function as the class
    gives it: the proxy, not the original beneath it (wrapt's answer). accelerate's mixed precision
    rebinds ``model.forward.__func__`` on the instance; with the original, every layer would be skipped."""

    @property
    def __func__(self):
        if self._self_binding == "function" and self._self_instance is not None:
            return self._self_parent.__get__(None, self._self_owner or type(self._self_instance))
        return self.__wrapped__.__func__


class Proxy(wrapt.FunctionWrapper):
    """The proxy a slot installs on a class: wrapt's, whose bound form is a :class:`BoundProxy`."""

    __bound_function_wrapper__ = BoundProxy


def _unwrapped(current: object, depth: int = 32):
    """``current`` and what it says it wraps, in turn: a bound method's function, a partial's, ``__wrapped__``."""
    for _ in range(depth):
        yield current
        if isinstance(current, MethodType):
            current = current.__func__
        elif isinstance(current, functools.partial):
            current = current.func
        else:
            current = getattr(current, "__wrapped__", None)
        if current is None:
            return


def _invoke(layer: Layer, wrapped: Callable[..., Any], instance: Any, *args: Any, **kwargs: Any) -> Any:
    return layer(wrapped, instance, args, kwargs)


def _module_view(module: ModuleType, names: tuple[str, ...], dispatch: Layer) -> ModuleType:
    if not names:
        raise ValueError(f"a module target ({module.__name__}) needs the names of the functions to wrap")
    view = ModuleType(module.__name__, module.__doc__)
    view.__dict__.update(vars(module))
    view.__dict__["__getattr__"] = functools.partial(getattr, module)  # names the module gains later
    view.__dict__["__wrapped__"] = module
    for name in names:
        view.__dict__[name] = wrapt.FunctionWrapper(getattr(module, name), dispatch)
    return view
