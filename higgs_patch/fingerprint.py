"""AST fingerprints: what identifies the code we patch when neither version nor bytes can.

The registry wheels ship CRLF files, a git checkout has LF and reports an older version. A
fingerprint is a hash of the syntax tree, so line endings, formatting, comments and docstrings do
not change it, and any change to the code does. It is serialised field by field, leaving out empty
fields, so Python versions that add new (empty) AST fields give the same fingerprint.

A target is fingerprinted where it is defined (a method in its class, a function imported into the
patched module in the module that defines it); a target that is itself a module (the collator's
``torch``) by the whole module that holds it, since what the patch changes is how that module uses it.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.machinery
import importlib.util
import os
import sys
from types import ModuleType

PREFIX = "ast1:"


def of_source(source: str | bytes, qualname: str | None) -> str:
    """Fingerprint of the function or class ``qualname`` in a module's source; None: the whole module."""
    if isinstance(source, bytes):
        source = importlib.util.decode_source(source)
    return _digest(ast.parse(source), qualname)


def _digest(tree: ast.Module, qualname: str | None) -> str:
    node = tree if qualname is None else _find(tree, qualname.split("."))
    if node is None:
        raise LookupError(f"{qualname} is not defined in this source")
    digest = hashlib.sha256(repr(_canonical(node)).encode("utf-8")).hexdigest()
    return PREFIX + digest[:24]


def of_file(path: str, qualname: str | None) -> str:
    stat = os.stat(path)
    return _of_file_cached(path, qualname, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=64)
def _of_file_cached(path: str, qualname: str | None, mtime: int, size: int) -> str:
    return _digest(_parse_cached(path, mtime, size), qualname)


def source_file(module: ModuleType | str) -> str:
    """The file a module is (or would be) loaded from, without importing it (nor its packages)."""
    if isinstance(module, str):
        spec = _spec(module)
        origin = spec.origin if spec else None
    else:
        origin = getattr(module.__spec__, "origin", None) or getattr(module, "__file__", None)
    if not origin or not os.path.isfile(origin):
        raise FileNotFoundError(f"no source file for module {module!r}")
    return origin


def _spec(name: str) -> importlib.machinery.ModuleSpec | None:
    """``importlib.util.find_spec`` without importing the parent packages: searched along their paths."""
    parent, _, _ = name.rpartition(".")
    if not parent:
        return importlib.util.find_spec(name)
    loaded = sys.modules.get(parent)
    outer = getattr(loaded, "__spec__", None) if loaded is not None else _spec(parent)
    locations = getattr(loaded, "__path__", None) or (outer.submodule_search_locations if outer else None)
    return importlib.machinery.PathFinder.find_spec(name, locations) if locations else None


def defining(module_name: str, qualname: str) -> tuple[str, str]:
    """The file and qualified name that define ``module_name:qualname``, read without importing anything.

    Follows a top-level ``from .x import name`` to the module that defines the name, as the import would.
    """
    path = source_file(module_name)
    head, _, rest = qualname.partition(".")
    tree = _parse_file(path)
    if _find(tree, [head]) is not None:
        return path, qualname
    package = module_name if os.path.basename(path) == "__init__.py" else module_name.rpartition(".")[0]
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if (alias.asname or alias.name) == head:
                    source = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
                    return defining(source, ".".join(filter(None, [alias.name, rest])))
    raise LookupError(f"{qualname} is not defined in {path}")


def _parse_file(path: str) -> ast.Module:
    stat = os.stat(path)
    return _parse_cached(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=16)
def _parse_cached(path: str, _mtime: int, _size: int) -> ast.Module:
    with open(path, "rb") as handle:
        return ast.parse(importlib.util.decode_source(handle.read()))


def _find(tree: ast.AST, path: list[str]) -> ast.AST | None:
    node = tree
    for name in path:
        for child in getattr(node, "body", []):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and child.name == name:
                node = child
                break
        else:
            return None
    return node


def _canonical(node: object) -> object:
    if isinstance(node, ast.AST):
        fields = []
        for name, value in ast.iter_fields(node):
            if name == "body" and _has_docstring(node):
                value = value[1:]
            if value is None or value == [] or name in ("type_comment", "kind"):
                continue
            fields.append((name, _canonical(value)))
        return (type(node).__name__, tuple(fields))
    if isinstance(node, list):
        return tuple(_canonical(item) for item in node)
    return repr(node)


def _has_docstring(node: ast.AST) -> bool:
    if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        return False
    body = node.body
    return bool(body) and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
        and isinstance(body[0].value.value, str)
