"""What we know of upstream releases, read from the data in ``compat/``."""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from importlib import resources

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class Release:
    name: str
    origin: str
    fingerprints: dict[str, str]  # target path -> fingerprint


@dataclass(frozen=True)
class KnownBad:
    """A combination known not to work: the versions of ``distribution`` that do, why, and the fix."""

    distribution: str
    works: str
    reason: str
    fix: str
    when: dict[str, str]  # other distributions' ranges under which the rule holds


@dataclass(frozen=True)
class Knowledge:
    fingerprinted: tuple[str, ...]  # top-level packages whose targets must match a known fingerprint
    releases: tuple[Release, ...]

    def must_match(self, target_path: str) -> bool:
        return target_path.split(".", 1)[0].split(":", 1)[0] in self.fingerprinted

    def known(self, target_path: str) -> dict[str, list[str]]:
        """Known fingerprints of one target, each with the releases that carry it."""
        found: dict[str, list[str]] = {}
        for release in self.releases:
            if target_path in release.fingerprints:
                found.setdefault(release.fingerprints[target_path], []).append(release.name)
        return found


def _read(name: str) -> dict:
    return tomllib.loads(resources.files("higgs_patch.compat").joinpath(name).read_text(encoding="utf-8"))


@functools.lru_cache(maxsize=1)
def known_bad() -> tuple[KnownBad, ...]:
    """The combinations compat/matrix.toml knows not to work."""
    return tuple(
        KnownBad(e["distribution"], e["works"], e["reason"], e["fix"], dict(e.get("when", {})))
        for e in _read("matrix.toml").get("known-bad", [])
    )


@functools.lru_cache(maxsize=1)
def knowledge() -> Knowledge:
    data = _read("fingerprints.toml")
    releases = tuple(
        Release(name=entry["name"], origin=entry.get("origin", ""), fingerprints=dict(entry["targets"]))
        for entry in data.get("release", [])
    )
    return Knowledge(fingerprinted=tuple(data.get("fingerprinted", ())), releases=releases)
