"""Moments the fixes and the engine announce to each other, so that no fix imports the engine.

The fixes sit below the engine (pyproject.toml's import contracts); when one of them reaches a moment
the engine cares about (a training run starts: say now if a patched function was replaced since
``apply()``), it announces it here and the engine, which registered a listener at import, acts. The
other way round, the engine announces that what is applied changed, and a fix that listens can tell
the user what a revert leaves behind.
"""

from __future__ import annotations

import threading
from typing import Callable

#: A Trainer starts a training run with a Higgs Audio model; the listeners get the model it trains.
TRAINING_STARTS = "training-starts"
#: What is applied in this process changed (apply, revert, an install at import, a reload noticed):
#: ``in_force`` already holds the new options. Announced by the engine, heard by fixes that must tell
#: the user what a revert leaves behind.
APPLIED_CHANGED = "applied-changed"

_listeners: dict[str, list[Callable[..., object]]] = {}
_lock = threading.Lock()


def listen(event: str, callback: Callable[..., object]) -> None:
    """Call ``callback`` whenever ``event`` is announced (once per callback, however often registered)."""
    with _lock:
        callbacks = _listeners.setdefault(event, [])
        if callback not in callbacks:
            callbacks.append(callback)


def announce(event: str, *args: object) -> None:
    """Call every listener of ``event`` with ``args``."""
    with _lock:
        callbacks = list(_listeners.get(event, ()))
    for callback in callbacks:
        callback(*args)
