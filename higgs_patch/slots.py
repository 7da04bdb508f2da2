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

A slot can also hold a name its module or class lacks (``adds``): its one layer is the object put
there, a module added to a package is importable under its dotted name too, and when the layer goes
the name goes, unless someone replaced our object meanwhile (then theirs stays, and we say so).
A name that is already there is never replaced: :class:`AlreadyThere` says what stands there.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import inspect
import logging
import pkgutil
import sys
from types import MethodType, ModuleType
from typing import Any, Callable

import wrapt

log = logging.getLogger("higgs_patch")

Layer = Callable[[Callable[..., Any], Any, tuple, dict], Any]


class AlreadyThere(LookupError):
    """The name a slot would add is already there (the upstream defines it, or something else added it)."""


class Slot:
    def __init__(self, path: str, module: ModuleType, qualname: str, names: tuple[str, ...] = (),
                 adds: bool = False) -> None:
        self.path = path
        self.names = names
        self.adds = adds
        self.module, self.spec = module, module.__spec__
        if adds:
            holder, _, self.name = qualname.rpartition(".")
            self.parent = wrapt.resolve_path(module, holder)[2] if holder else module
            self.original = None
            _refuse_present(self.parent, self.name, path)
        else:
            self.parent, self.name, self.original = wrapt.resolve_path(module, qualname)
        self._owned = not inspect.isclass(self.parent) or self.name in vars(self.parent)
        self.layers: tuple[Layer, ...] = ()
        self._orders: dict[int, int] = {}  # id(layer) -> order
        self.installed: object | None = None

    def add(self, layer: Layer, order: int = 0) -> None:
        if self.adds:
            if self.installed is not None:
                raise AlreadyThere(f"{self.path} already holds an object added by higgs_patch")
            setattr(self.parent, self.name, layer)
            if self._submodule(layer):
                sys.modules[layer.__name__] = layer
            self.installed, self.layers = layer, (layer,)
            return
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
        if self._submodule(self.installed):  # its own entry, whatever becomes of its package (transformers remakes itself)
            return sys.modules.get(self.installed.__name__) is self.installed
        module = sys.modules.get(self.module.__name__)
        return module is None or (module is self.module and module.__spec__ is self.spec)

    def _submodule(self, value: object) -> bool:
        """Whether ``value`` is a module this slot adds to a package: importable by its dotted name."""
        return self.adds and isinstance(value, ModuleType) and isinstance(self.parent, ModuleType)

    def discard(self) -> None:
        """Forget this slot after its module was reloaded: the original goes back only where our proxy
        still is (the old class), never over the reloaded code."""
        if self.installed is not None and self._current() is self.installed:
            self._restore()
        self.layers, self.installed = (), None

    def _restore(self) -> None:
        if self._submodule(self.installed):
            if sys.modules.get(self.installed.__name__) is self.installed:
                del sys.modules[self.installed.__name__]
            if vars(self.parent).get(self.name) is self.installed:
                delattr(self.parent, self.name)
        elif self._owned and not self.adds:
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
        if self._submodule(self.installed):
            return sys.modules.get(self.installed.__name__)
        if inspect.isclass(self.parent):
            return vars(self.parent).get(self.name)
        return vars(self.parent).get(self.name) if self.adds else getattr(self.parent, self.name, None)

    def _proxy(self) -> object:
        if isinstance(self.original, ModuleType):
            return _module_view(self.original, self.names, self.dispatch)
        return Proxy(self.original, self.dispatch, self.parent, self.name)

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


def object_at(module: ModuleType, qualname: str, adds: bool = False) -> object | None:
    """What stands at a target now, as a slot sees it (a raw class attribute); for a name a patch adds,
    what stands there, or None where it is absent (a module added to a package: its sys.modules entry)."""
    if not adds:
        return wrapt.resolve_path(module, qualname)[2]
    holder, _, name = qualname.rpartition(".")
    parent = wrapt.resolve_path(module, holder)[2] if holder else module
    found = vars(parent).get(name) if inspect.isclass(parent) or isinstance(parent, ModuleType) else getattr(parent, name, None)
    if found is None and isinstance(parent, ModuleType):
        found = sys.modules.get(f"{parent.__name__}.{name}")
    return found


def _refuse_present(parent: object, name: str, path: str) -> None:
    """Raise :class:`AlreadyThere` when ``parent`` has ``name`` (inherited, or a submodule on disk, counts)."""
    present = name in vars(parent) if not inspect.isclass(parent) else hasattr(parent, name)
    if isinstance(parent, ModuleType) and not present:
        try:
            present = importlib.util.find_spec(f"{parent.__name__}.{name}") is not None
        except (ImportError, ValueError):  # not a package, or a broken spec: no submodule of that name
            present = False
    if present:
        found = getattr(parent, name, None)
        if found is None:  # a submodule not imported yet: where it lies
            spec = importlib.util.find_spec(f"{parent.__name__}.{name}")
            where = f"a submodule on disk: {spec.origin}" if spec is not None and spec.origin else "a submodule on disk"
        else:
            origin = getattr(found, "__module__", None) or getattr(found, "__name__", None)
            where = f"{type(found).__name__} from {origin}" if origin else type(found).__name__
        raise AlreadyThere(f"{path} is already there ({where}), not added by higgs_patch")


class BoundProxy(wrapt.BoundFunctionWrapper):
    """Our proxy bound to an instance. Its ``__func__`` is, as a bound method's, the function as the class
    gives it: the proxy, not the original beneath it (wrapt's answer). accelerate's mixed precision
    rebinds ``model.forward.__func__`` on the instance; with the original, every layer would be skipped.

    It copies and pickles as a bound method does (accelerate keeps it on the instance as
    ``_original_forward``, so a deep copy or ``torch.save`` of the model meets it): a deep copy is bound
    to the copied instance, a pickle is ``getattr(instance, name)``, which a process without the plugin
    resolves to upstream's own method."""

    @property
    def __func__(self):
        if self._self_binding == "function" and self._self_instance is not None:
            return self._self_parent.__get__(None, self._self_owner or type(self._self_instance))
        return self.__wrapped__.__func__

    def __reduce_ex__(self, protocol):
        holder = self._self_instance if self._self_instance is not None else self._self_owner
        if holder is None:
            return self._self_parent.__reduce_ex__(protocol)
        return getattr, (holder, self._self_parent._self_name)

    def __reduce__(self):
        return self.__reduce_ex__(2)

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        if self._self_binding != "function" or self._self_instance is None:
            return self  # bound to a class, or to none: copied as the class is, not at all
        return self._self_parent.__get__(copy.deepcopy(self._self_instance, memo), self._self_owner)


class Proxy(wrapt.FunctionWrapper):
    """The proxy a slot installs on a class (or a module): wrapt's, whose bound form is a :class:`BoundProxy`.

    Copied, it is itself, as a function is; pickled, it is the name it stands at (``getattr(holder, name)``,
    or ``module:name`` for a module's), which a process without the plugin resolves to the original."""

    __bound_function_wrapper__ = BoundProxy

    def __init__(self, wrapped: Any, wrapper: Layer, holder: object, name: str) -> None:
        super().__init__(wrapped, wrapper)
        self._self_holder, self._self_name = holder, name

    def __reduce_ex__(self, protocol):
        if isinstance(self._self_holder, ModuleType):
            return pkgutil.resolve_name, (f"{self._self_holder.__name__}:{self._self_name}",)
        return getattr, (self._self_holder, self._self_name)

    def __reduce__(self):
        return self.__reduce_ex__(2)

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self


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
        view.__dict__[name] = Proxy(getattr(module, name), dispatch, module, name)
    return view
