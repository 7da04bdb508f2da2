"""The options of the patches applied in this process, for the code below the engine that honours them.

The engine publishes here, whenever what is applied changes (apply, revert, an install at import, a
reload noticed), the options each applied patch runs with. The loss reads the model-loss patch's weights
here, so that every path computing a Higgs Audio loss (the model's own, a user's ``higgs_audio_loss``
call, a Trainer hook) trains one objective. A patch not applied (never, or reverted) has none in force.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping

_table: Mapping[str, Mapping[str, Any]] = MappingProxyType({})


def options(patch_id: str) -> Mapping[str, Any] | None:
    """The options ``patch_id`` is applied with in this process, or None when it is not applied."""
    return _table.get(patch_id)


def publish(table: Mapping[str, Mapping[str, Any]]) -> bool:
    """Replace what is in force (the engine's call; read without a lock, replaced whole); True if it changed."""
    global _table
    fresh = {patch_id: dict(chosen) for patch_id, chosen in table.items()}
    changed = fresh != {patch_id: dict(chosen) for patch_id, chosen in _table.items()}
    _table = MappingProxyType({patch_id: MappingProxyType(chosen) for patch_id, chosen in fresh.items()})
    return changed
