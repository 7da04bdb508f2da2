"""Installing the plugin must never move the user's torch, torchaudio or transformers."""

from __future__ import annotations

import importlib.metadata

from packaging.requirements import Requirement

GUARDED = ("torch", "torchaudio", "transformers")


def requirements(distribution: str) -> dict[str, Requirement]:
    found = {}
    for text in importlib.metadata.requires(distribution) or []:
        requirement = Requirement(text)
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            found[requirement.name] = requirement
    return found


def test_the_plugin_pins_the_guarded_stack_no_tighter_than_the_upstream_does():
    ours, theirs = requirements("higgs-patch"), requirements("boson-multimodal")
    for name in GUARDED:
        if name not in ours:
            continue
        assert name in theirs, f"{name} is required by higgs-patch but not by the upstream"
        assert not ours[name].specifier or ours[name].specifier == theirs[name].specifier, (
            f"higgs-patch requires {ours[name]}, the upstream {theirs[name]}: a different range could make pip move it"
        )
    assert "torchaudio" not in ours  # it pins its torch exactly: requiring it could replace the user's torch


def test_the_installed_stack_satisfies_the_plugin_as_it_is():
    for name, requirement in requirements("higgs-patch").items():
        version = importlib.metadata.version(name)
        assert requirement.specifier.contains(version, prereleases=True), f"{name} {version} vs {requirement}"
