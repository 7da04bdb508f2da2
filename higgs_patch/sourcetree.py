"""Importable from a clone as from the wheel: ``patches/`` and ``compat/`` as subpackages of ``higgs_patch``.

The wheel ships them as ``higgs_patch.patches`` and ``higgs_patch.compat`` through pyproject.toml's
``[tool.setuptools.package-dir]``. Run from a clone (the repository root on ``sys.path``), the same
mapping is read from pyproject.toml and applied here, so the data stays in one place.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from .schema import tomllib


def map_data_packages(package: str) -> None:
    """Import the package-dir mapping's subpackages from their folders, when nothing else finds them."""
    root = Path(__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file():  # an installed wheel: site-packages holds no pyproject.toml
        return
    mapping = tomllib.loads(pyproject.read_text(encoding="utf-8")).get("tool", {}).get("setuptools", {})
    for name, folder in mapping.get("package-dir", {}).items():
        if not name.startswith(package + ".") or name in sys.modules or importlib.util.find_spec(name):
            continue
        init = root / folder / "__init__.py"
        spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(init.parent)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
