"""Where the installed upstream comes from, and its fingerprints in the form compat/ stores.

Editable or VCS installs and the commit are read from files only (``direct_url.json``, ``.git``),
never by running git on the user's behalf. ``doctor`` reports them; ``higgs-patch fingerprint`` prints
the fingerprints of every patch target so that supporting a new upstream release is a data change.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
from pathlib import Path
from typing import Any

from packaging.utils import canonicalize_name

from .. import __version__, engine, fingerprint, gate, upstream


def distribution_of(package: str) -> importlib.metadata.Distribution | None:
    try:
        return importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        names = importlib.metadata.packages_distributions().get(package, [])
        return importlib.metadata.distribution(names[0]) if names else None


def shadowed(distribution: importlib.metadata.Distribution | None, location: Path) -> str | None:
    """Where the distribution's own copy is, when the package was imported from somewhere else."""
    if distribution is None:
        return None
    own = Path(distribution.locate_file(f"{location.name}/__init__.py"))
    if not own.is_file() or own.resolve().parent == location:
        return None
    return str(own.resolve().parent)


def origin(distribution: importlib.metadata.Distribution | None, location: Path) -> dict[str, Any]:
    """Editable / VCS install and commit, read from files only (direct_url.json, .git), never running git."""
    found: dict[str, Any] = {"editable": False, "url": None, "commit": None, "checkout": None}
    text = distribution.read_text("direct_url.json") if distribution else None
    if text:
        try:
            data = json.loads(text)
        except ValueError:
            data = {}
        found["url"] = data.get("url")
        found["editable"] = bool(data.get("dir_info", {}).get("editable"))
        found["commit"] = data.get("vcs_info", {}).get("commit_id")
    for folder in (location, *list(location.parents)[:2]):
        head = _git_head(folder / ".git")
        if head:
            found["commit"] = head
            found["url"] = found["url"] or _git_remote(folder / ".git") or f"file://{folder}"
            found["checkout"] = str(folder)
            break
    return found


def describe(info: dict[str, Any]) -> str:
    if info.get("checkout"):
        commit = (info.get("commit") or "")[:7] or "unknown commit"
        return f"git checkout at {commit}" + (", editable install" if info["editable"] else "")
    if info["editable"]:
        return f"editable install of {info['url']}"
    if info.get("commit"):
        return f"installed from {info['url']} at {info['commit'][:7]}"
    if info.get("url"):
        return f"installed from {info['url']}"
    return "installed from a package index"


def _git_dir(dot_git: Path) -> Path | None:
    if dot_git.is_dir():
        return dot_git
    if dot_git.is_file():  # a worktree or submodule: "gitdir: <path>"
        text = dot_git.read_text(encoding="utf-8", errors="replace").strip()
        if text.startswith("gitdir:"):
            return (dot_git.parent / text.partition(":")[2].strip()).resolve()
    return None


def _git_head(dot_git: Path) -> str | None:
    folder = _git_dir(dot_git)
    if folder is None or not (folder / "HEAD").is_file():
        return None
    head = (folder / "HEAD").read_text(encoding="utf-8", errors="replace").strip()
    if not head.startswith("ref:"):
        return head or None
    ref = head.partition(":")[2].strip()
    common = folder
    if (folder / "commondir").is_file():
        common = (folder / (folder / "commondir").read_text(encoding="utf-8").strip()).resolve()
    for base in (folder, common):
        if (base / ref).is_file():
            return (base / ref).read_text(encoding="utf-8", errors="replace").strip() or None
    packed = common / "packed-refs"
    if packed.is_file():
        for line in packed.read_text(encoding="utf-8", errors="replace").splitlines():
            sha, _, name = line.partition(" ")
            if name.strip() == ref:
                return sha
    return None


def _git_remote(dot_git: Path) -> str | None:
    folder = _git_dir(dot_git)
    config = folder / "config" if folder else None
    if config is None or not config.is_file():
        return None
    in_origin = False
    for line in config.read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if line.startswith("["):
            in_origin = line.replace(" ", "") == '[remote"origin"]'
        elif in_origin and line.startswith("url"):
            return line.partition("=")[2].strip()
    return None


def installed_fingerprints() -> list[dict[str, Any]]:
    """One release entry per fingerprinted package, as compat/fingerprints.toml stores it."""
    knowledge = upstream.knowledge()
    targets: dict[str, dict[str, str]] = {}
    for declaration in engine.known().values():
        for target in declaration.targets:
            held = knowledge.package_of(target.path)
            if held is None or _absent(held):  # an upstream not installed here has nothing to fingerprint
                continue
            package = targets.setdefault(held.split(".", 1)[0], {})
            package[target.path] = _fingerprint(target)
    return [_release(package, found) for package, found in targets.items()]


def _fingerprint(target) -> str:
    """A target's fingerprint, read from source without importing it where that finds it (boson's
    modules import only with the shims of a 5.x line in place); else by importing it."""
    try:
        return fingerprint.of_file(*gate.static_definition(target))
    except (FileNotFoundError, LookupError):
        return fingerprint.of_file(*gate.definition(target))


def _absent(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except ModuleNotFoundError:  # its package is not there
        return True


def _release(package: str, targets: dict[str, str]) -> dict[str, Any]:
    distribution = distribution_of(package)
    spec = importlib.util.find_spec(package)
    location = Path(spec.origin).resolve().parent if spec and spec.origin else None
    info = origin(distribution, location) if location else {"editable": False, "url": None, "commit": None}
    name = canonicalize_name(distribution.metadata["Name"]) if distribution else package
    version = distribution.version if distribution else "unknown"
    if info.get("commit") and info.get("url") and "github.com" in info["url"]:
        repository = info["url"].split("github.com", 1)[1].strip(":/").removesuffix(".git")
        release = f"{repository}@{info['commit'][:7]}"
    elif info.get("commit"):
        release = f"{name} {version}@{info['commit'][:7]}"
    else:
        release = f"{name} {version}"
    files = {fingerprint.source_file(path.partition(":")[0]) for path in targets}
    endings = sorted({"CRLF" if b"\r\n" in Path(f).read_bytes() else "LF" for f in files})
    where = f"{describe(info)} ({' and '.join(endings)} line endings), version {version}"
    return {"name": release, "origin": where, "package": package, "location": str(location), "targets": targets}


def fingerprints_toml(releases: list[dict[str, Any]]) -> str:
    lines = [
        f"# The installed upstream's fingerprints, printed by higgs-patch {__version__} (`higgs-patch fingerprint`).",
        "# Once the test suite passes against this code, add the block to compat/fingerprints.toml.",
    ]
    for release in releases:
        lines += ["", "[[release]]", f"name = {json.dumps(release['name'])}"]
        lines += [f"origin = {json.dumps(release['origin'])}", "[release.targets]"]
        lines += [f"{json.dumps(path)} = {json.dumps(found)}" for path, found in release["targets"].items()]
    return "\n".join(lines) + "\n"
