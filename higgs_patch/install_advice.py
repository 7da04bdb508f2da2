"""The pip command that installs what a patch requires, as refusals and ``higgs-patch doctor`` give it.

Plain ``pip install "<name><range>"`` unless ``compat/install.toml`` knows better for that distribution
(boson-multimodal must be installed without its dependencies).
"""

from __future__ import annotations

import functools
from typing import Iterable

from packaging.utils import canonicalize_name

from . import schema
from .errors import DataError

SOURCE = "compat/install.toml"


@functools.lru_cache(maxsize=1)
def install_commands() -> dict[str, str]:
    """compat/install.toml, by canonical distribution name; a malformed file is an error naming it."""
    data = schema.read("higgs_patch.compat", "install.toml", SOURCE)
    for name, command in data.items():
        if not isinstance(command, str) or not command.startswith("pip install"):
            raise DataError(f"{SOURCE}: {name}: expected a string starting with 'pip install', got {command!r}")
    return {canonicalize_name(name): command for name, command in data.items()}


def install_fix(requirements: Iterable[tuple[str, str]]) -> str:
    """The pip command(s) that install ``(distribution, specifier)`` pairs."""
    recipes = install_commands()
    plain, special = [], []
    for name, spec in requirements:
        recipe = recipes.get(canonicalize_name(name))
        if recipe:
            special.append(recipe)
        else:
            plain.append(f'"{name}{spec}"')
    return " && ".join(([f"pip install {' '.join(plain)}"] if plain else []) + list(dict.fromkeys(special)))
