"""Installing the plugin must never move the user's torch, torchaudio or transformers."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from higgs_patch import upstream

GUARDED = ("torch", "torchaudio", "transformers")


def requirements(distribution: str) -> dict[str, Requirement]:
    found = {}
    for text in importlib.metadata.requires(distribution) or []:
        requirement = Requirement(text)
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            found[requirement.name] = requirement
    return found


def test_the_plugin_allows_every_guarded_version_the_upstream_allows_and_every_newer_one():
    """pip moves a distribution only to satisfy a range: ours holds the upstream's own range (an environment that
    satisfies boson_multimodal stays as it is) and every tested line, and has no upper bound (a newer, untested
    release stays too: doctor names the patches unverified there). Before issue 19 it was the upstream's
    '>=4.45.1,<4.47', and installing the plugin moved transformers 5.23 down to 4.46.3."""
    ours, theirs = requirements("higgs-patch"), requirements("boson-multimodal")
    for name in GUARDED:
        if name not in ours:
            continue
        assert name in theirs, f"{name} is required by higgs-patch but not by the upstream"
        spec = ours[name].specifier
        assert all(s.operator in (">=", ">") for s in spec), f"higgs-patch caps {ours[name]}: pip would move newer releases"
        floors = [s.version for s in theirs[name].specifier if s.operator in (">=", ">", "==", "~=")]
        assert all(spec.contains(floor) for floor in floors), f"{ours[name]} excludes the upstream's {theirs[name]}"
    for stack in upstream.tested():
        version = stack.versions["transformers"].split()[0]
        assert ours["transformers"].specifier.contains(version), f"{ours['transformers']} excludes tested {version}"
    assert "torchaudio" not in ours  # it pins its torch exactly: requiring it could replace the user's torch


@pytest.mark.core
def test_installing_the_plugin_with_its_dependencies_moves_nothing_here(tmp_path):
    """What pip would do, offline (--no-index: any requirement this environment does not meet is an error)."""
    done, installed = dry_run("", tmp_path)
    assert done.returncode == 0, done.stderr  # e.g. "No matching distribution found for transformers<4.47,>=4.45.1"
    assert installed == {"higgs-patch"}


def dry_run(extras: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess, set[str]]:
    """What ``pip install '.<extras>'`` would install here, offline (--no-index: any requirement this environment
    does not meet is an error): pip's result, and the names its report would install."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        pytest.skip("not run from a source tree")
    report = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report), "--no-index",
         "--no-build-isolation", "--disable-pip-version-check", f"{root}{extras}"],
        capture_output=True, text=True, timeout=300,
    )
    installed = {item["metadata"]["name"] for item in json.loads(report.read_text())["install"]} if done.returncode == 0 else set()
    return done, installed


def test_the_installed_stack_satisfies_the_plugin_as_it_is():
    for name, requirement in requirements("higgs-patch").items():
        version = importlib.metadata.version(name)
        assert requirement.specifier.contains(version, prereleases=True), f"{name} {version} vs {requirement}"


def test_the_lora_extra_allows_the_peft_of_every_tested_stack_and_the_tests_run_it():
    extra = lora_extra()
    tests = [Requirement(text) for text in importlib.metadata.requires("higgs-patch")
             if Requirement(text).marker and Requirement(text).marker.evaluate({"extra": "test"})]
    assert any(r.name == "higgs-patch" and r.extras == {"lora"} for r in tests)  # the tests run the peft users get
    for stack in upstream.tested():
        peft = stack.versions["peft"]
        assert extra.specifier.contains(peft), f"the [lora] extra excludes peft {peft}, tested on {stack.line}"


def lora_extra() -> Requirement:
    return next(
        Requirement(text) for text in importlib.metadata.requires("higgs-patch")
        if Requirement(text).name == "peft" and Requirement(text).marker.evaluate({"extra": "lora"})
    )


def test_the_lora_extra_states_a_floor_only():
    """An upper bound or a hole would move a user's newer peft (before issue 26: '<=0.21.2' took 0.22.0 down to
    0.21.2 without a word); which peft breaks with which stack is compat/matrix.toml's, judged by doctor."""
    extra = lora_extra()
    assert extra.specifier and all(s.operator in (">=", ">") for s in extra.specifier), f"[lora] is {extra}"


@pytest.mark.core
def test_installing_the_lora_extra_leaves_the_peft_here(tmp_path):
    """pip install '.[lora]' into this environment, which has peft (every tested line pins one): nothing moves."""
    done, installed = dry_run("[lora]", tmp_path)
    peft = importlib.metadata.version("peft")
    assert done.returncode == 0, f"peft {peft} here: {done.stderr}"  # e.g. "No matching distribution found for peft<=0.21.2"
    assert installed == {"higgs-patch"}, f"installing '.[lora]' would install or move {sorted(installed - {'higgs-patch'})}"


@pytest.mark.core
def test_the_peft_here_is_none_compat_knows_breaks_on_this_stack():
    """compat/matrix.toml's peft rules that hold here (by torch and transformers) all allow the installed peft."""
    from packaging.specifiers import SpecifierSet

    versions = {name: importlib.metadata.version(name) for name in ("torch", "transformers", "peft")}
    rules = [r for r in upstream.known_bad() if r.distribution == "peft"]
    assert {name for r in rules for name in r.when} <= {"torch", "transformers"}
    for rule in rules:
        if all(SpecifierSet(spec).contains(versions[name], prereleases=True) for name, spec in rule.when.items()):
            assert SpecifierSet(rule.works).contains(versions["peft"]), f"peft {versions['peft']}: {rule.reason}"
