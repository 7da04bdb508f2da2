"""apply / revert / status: the lifecycle of declared patches, symmetric and idempotent.

Everything is decided when apply() is called: the options, the stack and the code of every target,
whether its module is imported or not (one not yet imported is read from its source file, not
imported). A call raises, leaving nothing of it applied or pending, or every patch it names is
applied or pending. A pending patch is installed by a wrapt post-import hook when the last of its
modules is imported. That hook checks the code really loaded once more: code other than what apply()
checked is refused in that import and in every later import of the module until the patch is
reverted, so no import runs the unpatched code silently. wrapt cannot deregister hooks: a hook that
fires for a patch no longer wanted does nothing.

Threads: the engine lock is never held while waiting for an import. A target module that another
thread is still importing is waited for before the lock is taken, then decided; a post-import hook
loads what it installs before it takes the lock. A module is never fingerprinted half-imported.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import threading
import weakref
from dataclasses import dataclass, field
from types import MethodType, ModuleType
from typing import Any, Literal, Mapping

import wrapt

from . import declarations, environment, events, gate, in_force, upstream
from .declarations import Declaration
from .errors import IncompatibleUpstreamError, OptionError, PatchError
from .slots import AlreadyThere, Layer, Slot

log = logging.getLogger("higgs_patch")

State = Literal["applied", "bypassed", "pending", "not-applied", "not-needed", "incompatible"]
#: The states of a patch this process has applied or is waiting to install (bypassed: applied, its target
#: replaced since): what revert() would take back.
ACTIVE: frozenset[State] = frozenset({"applied", "bypassed", "pending"})


@dataclass(frozen=True)
class PatchStatus:
    id: str
    version: str
    state: State
    reason: str
    default: bool
    summary: str
    targets: tuple[str, ...]
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class _Record:
    state: State = "not-applied"
    reason: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    force: bool = False
    warnings: list[str] = field(default_factory=list)  # what a forced pass of the gate said, logged once
    missing: set[str] = field(default_factory=set)  # modules a pending patch still waits for
    layers: list[tuple[Slot, Layer]] = field(default_factory=list)
    refusal: PatchError | None = None  # raised again in every import of ``blocking`` until revert()
    blocking: set[str] = field(default_factory=set)
    preceded: set[str] | None = None  # the before_import modules not yet imported when it was first installed


_lock = threading.RLock()  # records, slots, waiting lists; never held while waiting for an import
_records: dict[str, _Record] = {}
_slots: dict[str, Slot] = {}
_waiting: dict[str, list[str]] = {}  # module name -> ids of the patches its import must install or refuse
_declarations: dict[str, Declaration] | None = None
_bypasses_told: set[tuple[str, str, int]] = set()  # (patch id, target path, id of what replaced our proxy)
_watched: "weakref.WeakSet[Any]" = weakref.WeakSet()  # models whose instances status() checks (see watch())
_load_lock = threading.Lock()
_hook_lock = threading.Lock()
_hooked: set[str] = set()  # modules whose post-import hook is registered and has not fired yet
_executed: dict[str, ModuleType] = {}  # modules whose hook fired: executed, though importlib still marks them importing
_local = threading.local()


def known() -> dict[str, Declaration]:
    global _declarations
    if _declarations is None:
        with _load_lock:
            if _declarations is None:
                _declarations = declarations.load_all()
    return _declarations


def shims_needed() -> list[str]:
    """The compatibility shims this stack needs (on a line they serve): without them boson_multimodal does not
    import, or run, here. Whatever imports the upstream on a user's behalf applies them before it does."""
    with gate.one_reading():
        return [d.id for d in known().values() if d.shim and d.default and not gate.off_line(d)]


def apply(*ids: str, force: bool = False, **options: Any) -> tuple[PatchStatus, ...]:
    """Apply the named patches (all default ones when none are named); atomic across the call."""
    if not isinstance(force, bool):
        raise OptionError(f"force must be True or False, not {force!r}")
    selected = _select(ids, default_only=True)
    per_patch = _split_options(selected, options)
    upstream.knowledge()  # malformed compat/ data fails here, before anything is touched
    with gate.one_reading():
        return _apply_selected(selected, per_patch, force, named=bool(ids))


def _apply_selected(selected: list[Declaration], per_patch: dict[str, dict[str, Any]], force: bool,
                    named: bool) -> tuple[PatchStatus, ...]:
    while True:
        modules = _settle(selected)
        with _lock:
            if _moved(modules):
                continue  # an import started meanwhile: wait for it outside the lock, then decide
            _forget_reloaded()
            done: list[str] = []
            try:
                for declaration in selected:
                    # an option given names its patch too: apply(text_loss_weight=...) without boson is refused
                    if _request(declaration, per_patch[declaration.id], force, modules,
                                named or bool(per_patch[declaration.id])):
                        done.append(declaration.id)
            except Exception as exc:
                for patch_id in reversed(done):
                    _revert_one(patch_id)
                if isinstance(exc, IncompatibleUpstreamError):
                    _name_the_others(exc, [d for d in selected if d.id != declaration.id])
                if isinstance(exc, PatchError):
                    raise
                raise PatchError(
                    f"patch {declaration.id!r} failed while applying, nothing of this call is applied: {exc}"
                ) from exc
            finally:
                _publish()
            return tuple(_status(d) for d in selected)


def revert(*ids: str) -> tuple[PatchStatus, ...]:
    """Revert the named patches (everything this process applied when none are named).

    Reverting a patch that was refused at an import also stops that refusal: the module imports
    again, unpatched, because you asked for it.
    """
    selected = _select(ids, default_only=False)
    with _lock:
        _forget_reloaded()
        for declaration in selected:
            _revert_one(declaration.id)
        if not any(record.state in ("applied", "pending") for record in _records.values()):
            _watched.clear()  # models seen while patched: a later apply() makes new proxies they do not lead to
        _publish()
        return tuple(_status(d) for d in selected)


def status() -> tuple[PatchStatus, ...]:
    table = known()
    with _lock:
        if _forget_reloaded():
            _publish()
        return tuple(_status(d) for d in table.values())


def _select(ids: tuple[str, ...], default_only: bool) -> list[Declaration]:
    table = known()
    unknown = [patch_id for patch_id in ids if patch_id not in table]
    if unknown:
        raise PatchError(f"unknown patch id(s) {unknown}; known: {sorted(table)}")
    if ids:
        return [table[patch_id] for patch_id in dict.fromkeys(ids)]
    return [d for d in table.values() if d.default or not default_only]


def _split_options(selected: list[Declaration], options: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each option to the patch that declares it, every value checked against its declaration."""
    owner = {name: d for d in selected for name in d.options}
    unknown = sorted(set(options) - set(owner))
    if unknown:
        raise OptionError(
            f"unknown option(s) {unknown} for patches {[d.id for d in selected]}; known options: {sorted(owner)}"
        )
    for name, value in options.items():
        owner[name].options[name].check(value, owner[name].id)
    return {d.id: {k: v for k, v in options.items() if owner[k] is d} for d in selected}


# --- modules: imported, not imported, or being imported -----------------------------------------------


def _settle(selected: list[Declaration]) -> dict[str, ModuleType | None]:
    """Every target module of ``selected``: fully imported, or None (not imported; our hook waits for it).

    Runs outside the engine lock: it waits for an import another thread has under way, and loads
    the fix modules of the patches that can be installed at once.
    """
    modules = {name: _imported(name) for d in selected for name in d.modules}
    _load_factories(d for d in selected if all(modules[name] is not None for name in d.modules))
    return modules


def _imported(name: str) -> ModuleType | None:
    while True:
        module = sys.modules.get(name)
        if module is None:
            if _register_hook(name):
                return None
            continue  # it appeared while we registered: someone is importing it
        if _complete(name, module):
            return module
        # Blocks until the thread importing it is done (were that import to fail, this one would try
        # again, as any importer waiting for it would); in this thread it returns the half module.
        importlib.import_module(name)
        if not _complete(name, sys.modules.get(name)):
            raise PatchError(
                f"{name} is being imported by this very thread (apply() was called from inside that import); "
                "call apply() before or after that import"
            )


def _complete(name: str, module: ModuleType | None) -> bool:
    # importlib marks a module "_initializing" until its import returns; our hook runs just before that.
    return module is not None and (
        _executed.get(name) is module or not getattr(getattr(module, "__spec__", None), "_initializing", False)
    )


def _moved(modules: Mapping[str, ModuleType | None]) -> bool:
    """True if a module's import started, or it was imported anew, since :func:`_settle` looked."""
    return any(sys.modules.get(name) is not module for name, module in modules.items())


def _register_hook(name: str) -> bool:
    """Make our post-import hook fire when ``name`` is imported; False if it appeared meanwhile."""
    with _hook_lock:
        if name in _hooked:
            return True
        _local.registering, _local.appeared = name, False
        try:
            wrapt.register_post_import_hook(_on_import, name)  # calls the hook at once if the module is there
        finally:
            _local.registering = None
        if _local.appeared:
            return False
        _hooked.add(name)
        return True


def _load_factories(selected) -> None:
    """Import the fix modules now, outside the engine lock; installing under it then imports nothing."""
    for declaration in selected:
        for target in declaration.targets:
            try:
                _factory(target.wrapper)
            except (ImportError, AttributeError):
                pass  # installing reports it, naming the patch


# --- one patch ------------------------------------------------------------------------------------------


def _request(declaration: Declaration, chosen: dict[str, Any], force: bool, modules: Mapping[str, ModuleType | None],
             named: bool = True) -> bool:
    """Apply one patch now or when its modules are imported; False if it already was.

    Options not ``chosen`` take the declared defaults, or keep the values an applied patch runs with:
    ``apply()`` in a child that inherited ``higgs-patch run --option ...`` keeps that choice.
    """
    record = _records.setdefault(declaration.id, _Record())
    if record.state in ("applied", "pending"):
        changed = {name: value for name, value in chosen.items() if record.options.get(name) != value}
        if changed:
            raise PatchError(
                f"patch {declaration.id!r} is already {record.state} with options {record.options}; "
                f"revert it before applying it with {changed}"
            )
        log.debug("patch %s is already %s; nothing to do", declaration.id, record.state)
        return False
    _unblock(declaration.id, record)
    own = {name: modules[name] for name in declaration.modules}
    options = {**declaration.defaults, **chosen}
    verdict = gate.judge(declaration, force, own, named=named)
    if verdict.not_needed:
        _not_needed(declaration, record, verdict.not_needed)
        return False
    if verdict.refusal is not None:
        _refuse(declaration, record, verdict.refusal)
    warnings = verdict.accept()
    record.options, record.force, record.warnings = options, force, []
    record.missing = {name for name, module in own.items() if module is None}
    if not record.missing:
        return _install(declaration, record, own, warnings)
    _warn(record, warnings)  # forced now, whether or not the import ever comes
    missing = sorted(record.missing)
    record.state, record.reason = "pending", f"waiting for {', '.join(missing)} to be imported"
    for name in missing:
        _wait(name, declaration.id)
    log.info("patch %s %s pending until %s imported", declaration.id, declaration.version, " and ".join(missing))
    return True


def _wait(name: str, patch_id: str) -> None:
    waiting = _waiting.setdefault(name, [])
    if patch_id not in waiting:
        waiting.append(patch_id)


def _on_import(module: ModuleType) -> None:
    """The post-import hook of one module: install what waited for it, then raise what refused."""
    name = module.__name__
    if getattr(_local, "registering", None) == name:
        _local.appeared = True  # wrapt calling us from register_post_import_hook: apply() decides this one
        return
    # A module may put another object in its place while it runs (transformers puts a lazy module there):
    # what importers get is what gets patched.
    module = sys.modules.get(name) or module
    _executed[name] = module
    with _hook_lock:
        _hooked.discard(name)
    with _lock:
        ready = [known()[pid] for pid in _waiting.get(name, ()) if _records[pid].missing == {name}]
    _load_factories(ready)
    with _lock:
        refused = [failure for patch_id in _waiting.pop(name, []) if (failure := _arrived(patch_id, name, module))]
        _publish()
    if not refused:
        return
    # The import fails. importlib would drop the module from sys.modules; we do it first, so that
    # our hook is registered again and every later import of it is refused too, until revert().
    sys.modules.pop(name, None)
    _register_hook(name)
    if len(refused) == 1:
        raise refused[0]
    kind = IncompatibleUpstreamError if all(isinstance(e, IncompatibleUpstreamError) for e in refused) else PatchError
    raise kind("\n".join(str(exc) for exc in refused))


def _arrived(patch_id: str, name: str, module: ModuleType) -> PatchError | None:
    """One patch's part of an import: install it if this was the last module it waited for."""
    declaration, record = known()[patch_id], _records[patch_id]
    if name in record.blocking:
        _wait(name, patch_id)
        return record.refusal
    if record.state != "pending" or name not in record.missing:
        return None  # reverted since it asked
    record.missing.discard(name)
    if record.missing:
        return None
    modules = {m: module if m == name else sys.modules.get(m) for m in declaration.modules}
    try:
        _install(declaration, record, modules, gate.judge(declaration, record.force, modules, stack=False).accept())
        return None
    except PatchError as exc:
        failure = exc
        if not isinstance(exc, IncompatibleUpstreamError):
            record.reason = f"failed while installing on import: {exc}"
    except Exception as exc:  # named, with its cause, and raised in the import like a refusal
        failure = PatchError(f"patch {patch_id!r} failed while installing on import: {exc}")
        failure.__cause__ = exc
        record.reason = str(failure)
    if isinstance(failure, IncompatibleUpstreamError):
        _refuse(declaration, record, failure)
    record.refusal, record.blocking = failure, {name}
    _wait(name, patch_id)
    return failure


def _install(declaration: Declaration, record: _Record, modules: Mapping[str, ModuleType | None],
             warnings: list[str]) -> bool:
    """Put every layer of the patch in place; False (not needed) when a name it adds is already there."""
    _warn(record, warnings)
    try:
        for target in declaration.targets:
            slot = _slots.get(target.path) or Slot(target.path, modules[target.module], target.qualname, target.names,
                                                   target.adds)
            # what a factory is made from: the name's holder for an added name, the original for a wrapped one
            layer = _factory(target.wrapper)(slot.parent if target.adds else slot.original, record.options)
            slot.add(layer, target.order)
            _slots[target.path] = slot
            record.layers.append((slot, layer))
    except AlreadyThere as exc:
        _remove_layers(record)
        _not_needed(declaration, record, f"{exc}: nothing to add, and what is there is left alone")
        log.warning("(already-there) patch %s: %s", declaration.id, record.reason)
        return False
    except Exception:
        _remove_layers(record)
        record.state, record.reason = "not-applied", "failed while installing"
        raise
    record.state = "applied"
    record.reason = "forced over unrecognised upstream" if record.warnings else ""
    log.info("patch %s %s applied to %s", declaration.id, declaration.version, ", ".join(t.path for t in declaration.targets))
    _after_import(declaration, record)
    return True


def _not_needed(declaration: Declaration, record: _Record, reason: str) -> None:
    record.state, record.reason, record.missing = "not-needed", reason, set()
    log.info("patch %s %s %s", declaration.id, declaration.version, reason)


def _after_import(declaration: Declaration, record: _Record) -> None:
    """Say so when a module this patch must precede was imported before it was first in place (what that
    import built, it built unpatched)."""
    imported = {name for name in declaration.before_import if _complete(name, sys.modules.get(name))}
    if record.preceded is None:
        record.preceded = set(declaration.before_import) - imported
    early = sorted(imported - record.preceded)
    if early:
        log.warning(
            "(applied-after-import) patch %s must be in place before %s is imported, and it was imported "
            "before higgs_patch.apply(): call apply() first (or start the program with higgs-patch run)",
            declaration.id, " and ".join(early),
        )


def _warn(record: _Record, warnings: list[str]) -> None:
    for message in warnings:
        if message not in record.warnings:
            record.warnings.append(message)
            log.warning("%s", message)


def _refuse(declaration: Declaration, record: _Record, exc: Exception) -> None:
    record.state, record.reason = "incompatible", str(exc)
    log.info("patch %s %s refused: %s", declaration.id, declaration.version, exc)


def _unblock(patch_id: str, record: _Record) -> None:
    if record.blocking:
        log.info("patch %s no longer refuses imports of %s", patch_id, ", ".join(sorted(record.blocking)))
    record.blocking.clear()
    record.refusal = None


def _factory(dotted: str):
    module_name, _, name = dotted.partition(":")
    return getattr(importlib.import_module(module_name), name)


def _revert_one(patch_id: str) -> None:
    record = _records.get(patch_id)
    if record is None:
        return
    _unblock(patch_id, record)
    if record.state == "not-needed":
        record.state, record.reason = "not-applied", ""
    if record.state not in ("applied", "pending"):
        return
    record.missing.clear()
    _remove_layers(record)
    record.state, record.reason = "not-applied", ""
    log.info("patch %s reverted", patch_id)


def _remove_layers(record: _Record) -> None:
    for slot, layer in reversed(record.layers):
        if slot.remove(layer) and _slots.get(slot.path) is slot:
            del _slots[slot.path]
    record.layers.clear()


def watch(model: Any) -> None:
    """Check the objects of ``model``'s module tree in :func:`status` too, for as long as they live.

    An attribute set on an instance (``model.forward = ...``) hides the patched method of its class
    for that instance alone; only the instances the plugin is shown can be checked for it (the
    Trainer hook shows its model when a training run starts).
    """
    with _lock:
        _watched.add(model)


def _bypass(patch_id: str, record: _Record) -> str:
    """Why calls may no longer reach an applied patch (a target replaced after apply(), on its class or
    on an instance :func:`watch` was shown); '' if none."""
    for slot, _ in record.layers:
        replacement = slot.replacement()
        if replacement is not None:
            reason = (
                f"{slot.path} was replaced after apply() by {_named(replacement)}; calls reach this patch only if "
                "the replacement calls the function it replaced, with the same arguments. Remove the replacement "
                "(or revert before making it)"
            )
            return _tell_bypass(patch_id, slot, replacement, reason)
        for instance, found in _shadowing(slot):
            kind, name, inner = type(instance).__name__, slot.name, slot.innermost(found)
            what = "upstream's own, unpatched, function" if inner is slot.original else "a function"
            under = "" if inner is _function_of(found) else f", under {_named(found)}"
            reason = (
                f"{name} is replaced on the {kind} instance (model.{name} = ..., as accelerate's "
                f"unwrap_model(..., keep_fp32_wrapper=False) also does) by {what}, {_named(inner)}{under}: calls "
                f"to that model reach this patch only if the replacement calls {kind}.{name}. `del model.{name}` "
                f"gives it the class's patched {name} again"
            )
            return _tell_bypass(patch_id, slot, found, reason)
    return ""


def _shadowing(slot: Slot):
    for model in list(_watched):
        for instance in model.modules() if hasattr(model, "modules") else (model,):
            found = slot.shadowed(instance)
            if found is not None:
                yield instance, found


def _tell_bypass(patch_id: str, slot: Slot, replacement: object, reason: str) -> str:
    if (patch_id, slot.path, id(replacement)) not in _bypasses_told:
        _bypasses_told.add((patch_id, slot.path, id(replacement)))
        log.warning("(patch-bypassed) patch %s: %s", patch_id, reason)
    return reason


def _function_of(value: object) -> object:
    return value.__func__ if isinstance(value, MethodType) else value


def _named(value: object) -> str:
    value = _function_of(value)
    name = getattr(value, "__qualname__", type(value).__qualname__)
    return f"{getattr(value, '__module__', '?')}.{name}"


def _name_the_others(exc: IncompatibleUpstreamError, others: list[Declaration]) -> None:
    """Add to a refusal the patches of the same call that the gate would still apply, by id."""
    applicable = gate.still_applicable(others)
    if applicable:
        ids = ", ".join(repr(patch_id) for patch_id in applicable)
        exc.args = (f"{exc}\nthe other patches of this call can still be applied by id: higgs_patch.apply({ids})",)
    first = [d for d in others if d.id in applicable and d.before_import]
    if first:
        modules = sorted({name for d in first for name in d.before_import})
        ids = ", ".join(repr(d.id) for d in first)
        exc.args = (f"{exc}\nnothing of this call is applied, so {' and '.join(modules)} cannot be imported here "
                    f"without {ids} (this stack needs them before that import): apply them first, before "
                    f"importing it: higgs_patch.apply({ids})",)


def _forget_reloaded() -> bool:
    """Applied patches whose module was reloaded (or imported anew) are no longer applied: say so."""
    changed = False
    for patch_id, record in _records.items():
        dead = [slot for slot, _ in record.layers if not slot.live()]
        if record.state != "applied" or not dead:
            continue
        for slot in dead:
            slot.discard()
            if _slots.get(slot.path) is slot:
                del _slots[slot.path]
        _remove_layers(record)
        modules = ", ".join(sorted({slot.path.partition(":")[0] for slot in dead}))
        record.state = "not-applied"
        record.reason = (f"{modules} was reloaded or imported anew: its new code is not patched; "
                         "apply() patches it (after the gate checks it again)")
        log.warning("(module-reloaded) patch %s: %s", patch_id, record.reason)
        changed = True
    return changed


def _publish() -> None:
    """Tell child processes what this one has applied (see startup.py); nothing left, nothing told.
    Tell the code below the engine the options in force (see in_force.py).

    A patch refused at an import is still told: its children refuse that code too, until revert().
    """
    if in_force.publish({pid: r.options for pid, r in _records.items() if r.state == "applied"}):
        events.announce(events.APPLIED_CHANGED)
    active = {pid: r.options for pid, r in _records.items() if r.state in ("applied", "pending") or r.blocking}
    if active:
        force = any(_records[pid].force for pid in active)
        os.environ[environment.ACTIVATE] = environment.encode(active, force)
    else:
        os.environ.pop(environment.ACTIVATE, None)


def _status(declaration: Declaration) -> PatchStatus:
    record = _records.get(declaration.id, _Record())
    state, reason = record.state, record.reason
    if state == "applied":
        bypass = _bypass(declaration.id, record)
        if bypass:
            state, reason = "bypassed", bypass
    return PatchStatus(
        id=declaration.id,
        version=str(declaration.version),
        state=state,
        reason=reason,
        default=declaration.default,
        summary=declaration.summary,
        targets=tuple(t.path for t in declaration.targets),
        options=dict(record.options if record.state in ("applied", "pending") else declaration.defaults),
    )


def _training_starts(model: Any) -> None:
    """A Trainer starts training ``model``: check it from now on, and say (once) what bypasses a patch."""
    watch(model)
    status()


events.listen(events.TRAINING_STARTS, _training_starts)
