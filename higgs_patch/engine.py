"""apply / revert / status: the lifecycle of declared patches, symmetric and idempotent.

A patch whose modules are already imported is gated and installed at once; otherwise a wrapt
post-import hook does it when the last of them is imported, and the patch is ``pending`` until then.
There is one hook per module, which installs every patch waiting for it and only then raises what
refused, so one refusal never strands another patch in ``pending``. wrapt cannot deregister hooks:
a hook that fires after its patches were reverted finds nothing waiting and does nothing.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import threading
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Literal, Mapping

import wrapt

from . import declarations, environment, gate, startup
from .declarations import Declaration
from .errors import IncompatibleUpstreamError, PatchError
from .slots import Layer, Slot

log = logging.getLogger("higgs_patch")

State = Literal["applied", "bypassed", "pending", "not-applied", "incompatible"]


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
    warnings: list[str] = field(default_factory=list)  # from the stack check, logged at install
    missing: set[str] = field(default_factory=set)  # modules a pending patch still waits for
    layers: list[tuple[Slot, Layer]] = field(default_factory=list)


_lock = threading.RLock()
_records: dict[str, _Record] = {}
_slots: dict[str, Slot] = {}
_waiting: dict[str, list[str]] = {}  # module name -> ids of the pending patches that wait for it
_declarations: dict[str, Declaration] | None = None
_bypasses_told: set[tuple[str, str, int]] = set()  # (patch id, target path, id of what replaced our proxy)


def known() -> dict[str, Declaration]:
    global _declarations
    if _declarations is None:
        _declarations = declarations.load_all()
    return _declarations


def apply(*ids: str, force: bool = False, **options: Any) -> tuple[PatchStatus, ...]:
    """Apply the named patches (all default ones when none are named); atomic across the call."""
    with _lock:
        selected = _select(ids, default_only=True)
        per_patch = _split_options(selected, options)
        done: list[str] = []
        try:
            for declaration in selected:
                if _request(declaration, per_patch[declaration.id], force):
                    done.append(declaration.id)
        except Exception as exc:
            for patch_id in reversed(done):
                _revert_one(patch_id)
            failed = declaration.id
            if isinstance(exc, IncompatibleUpstreamError):
                others = gate.still_applicable(d for d in selected if d.id != failed)
                if others:
                    ids = ", ".join(repr(patch_id) for patch_id in others)
                    exc.args = (f"{exc}\nthe other patches of this call can still be applied by id: "
                                f"higgs_patch.apply({ids})",)
            if isinstance(exc, PatchError):
                raise
            raise PatchError(f"patch {failed!r} failed while applying, nothing of this call is applied: {exc}") from exc
        finally:
            _publish()
        return tuple(_status(d) for d in selected)


def revert(*ids: str) -> tuple[PatchStatus, ...]:
    """Revert the named patches (everything this process applied when none are named)."""
    with _lock:
        selected = _select(ids, default_only=False)
        for declaration in selected:
            _revert_one(declaration.id)
        _publish()
        return tuple(_status(d) for d in selected)


def status() -> tuple[PatchStatus, ...]:
    with _lock:
        return tuple(_status(d) for d in known().values())


def _select(ids: tuple[str, ...], default_only: bool) -> list[Declaration]:
    table = known()
    unknown = [patch_id for patch_id in ids if patch_id not in table]
    if unknown:
        raise PatchError(f"unknown patch id(s) {unknown}; known: {sorted(table)}")
    if ids:
        return [table[patch_id] for patch_id in dict.fromkeys(ids)]
    return [d for d in table.values() if d.default or not default_only]


def _split_options(selected: list[Declaration], options: dict[str, Any]) -> dict[str, dict[str, Any]]:
    accepted = {name: d.id for d in selected for name in d.options}
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise PatchError(
            f"unknown option(s) {unknown} for patches {[d.id for d in selected]}; known options: {sorted(accepted)}"
        )
    return {d.id: {k: v for k, v in options.items() if accepted[k] == d.id} for d in selected}


def _request(declaration: Declaration, chosen: dict[str, Any], force: bool) -> bool:
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
    options = {**declaration.options, **chosen}
    try:
        warnings = gate.require_stack(declaration, force)
    except PatchError as exc:
        _refuse(declaration, record, exc)
        raise
    record.options, record.force, record.warnings = options, force, warnings
    record.missing = {name for name in declaration.modules if name not in sys.modules}
    if not record.missing:
        _install(declaration, record)
        return True
    missing = sorted(record.missing)
    record.state, record.reason = "pending", f"waiting for {', '.join(missing)} to be imported"
    for name in missing:
        if name not in _waiting:
            _waiting[name] = []
            wrapt.register_post_import_hook(_on_import, name)
        _waiting[name].append(declaration.id)
    log.info("patch %s %s pending until %s imported", declaration.id, declaration.version, " and ".join(missing))
    return True


def _on_import(module: ModuleType) -> None:
    """The post-import hook of one module: install what waited for it, then raise what refused."""
    with _lock:
        refused: list[PatchError] = []
        for patch_id in _waiting.pop(module.__name__, []):
            record = _records[patch_id]
            if record.state != "pending" or module.__name__ not in record.missing:
                continue  # reverted since it asked
            record.missing.discard(module.__name__)
            if not record.missing:
                try:
                    _install(known()[patch_id], record)
                except PatchError as exc:
                    refused.append(exc)
                except Exception as exc:  # raised after the others are installed, named, with its cause
                    failed = PatchError(f"patch {patch_id!r} failed while installing on import: {exc}")
                    failed.__cause__ = exc
                    refused.append(failed)
        _publish()
    if len(refused) == 1:
        raise refused[0]
    if refused:
        raise PatchError("\n".join(str(exc) for exc in refused))


def _install(declaration: Declaration, record: _Record) -> None:
    try:
        warnings = record.warnings + gate.require_known_code(declaration, record.force)
    except PatchError as exc:
        _refuse(declaration, record, exc)
        raise
    for message in warnings:
        log.warning("%s", message)
    try:
        for target in declaration.targets:
            module = sys.modules[target.module]
            slot = _slots.get(target.path) or Slot(target.path, module, target.qualname, target.names)
            layer = _factory(target.wrapper)(slot.original, record.options)
            slot.add(layer, target.order)
            _slots[target.path] = slot
            record.layers.append((slot, layer))
    except Exception:
        _remove_layers(record)
        record.state, record.reason = "not-applied", "failed while installing"
        raise
    record.state = "applied"
    record.reason = "forced over unrecognised upstream" if warnings else ""
    log.info("patch %s %s applied to %s", declaration.id, declaration.version, ", ".join(t.path for t in declaration.targets))


def _refuse(declaration: Declaration, record: _Record, exc: Exception) -> None:
    record.state, record.reason = "incompatible", str(exc)
    log.info("patch %s %s refused: %s", declaration.id, declaration.version, exc)


def _factory(dotted: str):
    module_name, _, name = dotted.partition(":")
    return getattr(importlib.import_module(module_name), name)


def _revert_one(patch_id: str) -> None:
    record = _records.get(patch_id)
    if record is None or record.state not in ("applied", "pending"):
        return
    record.missing.clear()
    _remove_layers(record)
    record.state, record.reason = "not-applied", ""
    log.info("patch %s reverted", patch_id)


def _remove_layers(record: _Record) -> None:
    for slot, layer in reversed(record.layers):
        if slot.remove(layer):
            del _slots[slot.path]
    record.layers.clear()


def _bypass(patch_id: str, record: _Record) -> str:
    """Why calls may no longer reach an applied patch (a target replaced after apply()); '' if none."""
    for slot, _ in record.layers:
        replacement = slot.replacement()
        if replacement is None:
            continue
        name = getattr(replacement, "__qualname__", type(replacement).__qualname__)
        reason = (
            f"{slot.path} was replaced after apply() by {getattr(replacement, '__module__', '?')}.{name}; "
            "calls reach this patch only if the replacement calls the function it replaced, with the same "
            "arguments. Remove the replacement (or revert before making it)"
        )
        if (patch_id, slot.path, id(replacement)) not in _bypasses_told:
            _bypasses_told.add((patch_id, slot.path, id(replacement)))
            log.warning("(patch-bypassed) patch %s: %s", patch_id, reason)
        return reason
    return ""


def _publish() -> None:
    """Tell child processes what this one has applied (see startup.py); nothing left, nothing told."""
    active = {pid: r.options for pid, r in _records.items() if r.state in ("applied", "pending")}
    if active:
        force = any(_records[pid].force for pid in active)
        os.environ[environment.ACTIVATE] = startup.encode(active, force)
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
        options=dict(record.options or declaration.options),
    )
