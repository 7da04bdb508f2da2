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


def test_the_lora_extra_allows_no_peft_that_compat_knows_breaks_lora_on_this_torch():
    from packaging.specifiers import SpecifierSet

    from higgs_patch import upstream

    extra = next(
        Requirement(text) for text in importlib.metadata.requires("higgs-patch")
        if Requirement(text).name == "peft" and Requirement(text).marker.evaluate({"extra": "lora"})
    )
    tests = [Requirement(text) for text in importlib.metadata.requires("higgs-patch")
             if Requirement(text).marker and Requirement(text).marker.evaluate({"extra": "test"})]
    assert any(r.name == "higgs-patch" and r.extras == {"lora"} for r in tests)  # the tests run the peft users get
    rule = next(r for r in upstream.known_bad() if r.distribution == "peft")
    torch_version = importlib.metadata.version("torch")
    assert all(SpecifierSet(spec).contains(torch_version, prereleases=True) for spec in rule.when.values())
    for version in ("0.18.0", "0.19.1", "0.20.0", "0.21.2"):
        assert not SpecifierSet(rule.works).contains(version)
        assert not extra.specifier.contains(version), f"the [lora] extra allows peft {version}, known to break LoRA"
    assert extra.specifier.contains(importlib.metadata.version("peft"))
