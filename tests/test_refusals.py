"""What a refusal tells the user: the install fix first, force only where it can help, and its risk.

Other stacks are real to the child interpreters that see them: a fake ``*.dist-info`` on PYTHONPATH
makes importlib.metadata report that version, a folder of links to site-packages without the
upstream makes it not installed, and an edited copy of the upstream is imported from PYTHONPATH.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

import needed
from higgs_patch import engine

CONSOLE = Path(sys.executable).with_name("higgs-patch")
DEFAULTS = needed.declarations(default_only=True)  # a bare apply() passes over shims off this line
COLLATOR_MODULE_VIEW = "boson_multimodal.data_collator.higgs_audio_collator:torch"
BOSON_FIX = 'pip install --no-deps boson-multimodal==0.1.1 && pip install "higgs-patch[upstream]"'

REPORT = """
    import json, logging, higgs_patch
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    {imports}
    try:
        higgs_patch.apply({arguments})
        outcome = "applied"
    except higgs_patch.PatchError as exc:
        outcome = str(exc)
    print(json.dumps({{"outcome": outcome, "states": {{s.id: s.state for s in higgs_patch.status()}}}}))
"""


def python(code: str, *, pythonpath: Path | None = None, env: dict | None = None, flags: tuple = ()):
    environ = {k: v for k, v in os.environ.items() if k not in ("HIGGS_PATCH_FORCE", "HIGGS_PATCH_ACTIVATE", "PYTHONPATH")}
    if pythonpath is not None:
        environ["PYTHONPATH"] = str(pythonpath)
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, *flags, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=environ, timeout=300
    )


def report(code: str, **kwargs) -> tuple[dict, str]:
    done = python(code, **kwargs)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def fake_distribution(folder: Path, name: str, version: str) -> Path:
    """A ``name-version.dist-info`` that importlib.metadata finds first on PYTHONPATH."""
    info = folder / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    return folder


@pytest.fixture(scope="module")
def without_upstream(tmp_path_factory) -> Path:
    """site-packages as links, without boson_multimodal: for ``python -S`` with this folder on PYTHONPATH."""
    folder = tmp_path_factory.mktemp("no-upstream")
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.startswith("boson_multimodal") and entry.suffix != ".pth":
            (folder / entry.name).symlink_to(entry)
    return folder


def test_a_version_conflict_gives_the_pip_command_first_and_forcing_it_says_what_it_risks(tmp_path):
    old = "4.45.2"  # below every transformers line the plugin supports
    fake = fake_distribution(tmp_path, "transformers", old)
    refused, _ = report(REPORT.format(imports="import transformers.trainer", arguments=""), pythonpath=fake)
    message = refused["outcome"]
    conflicting = [d for d in DEFAULTS if not d.requires.get("transformers", SpecifierSet()).contains(old)]
    spec = conflicting[0].requires["transformers"]
    assert f'requested: "transformers {spec}" but found: "transformers {old}"' in message
    fix, force = message.index(f'fix: pip install "transformers{spec}"'), message.index("force=True")
    assert fix < force  # the fix first
    assert "can train wrong without any error" in message
    # the others are named as still applicable, and nothing of the call is applied
    # a shim serves transformers from 4.48 (or later) on: off the line the fake 4.45.2 says is installed
    others = [d.id for d in DEFAULTS if d not in conflicting and not d.shim]
    assert "trainer-compute-loss" not in others and len(others) >= 3
    assert f"can still be applied by id: higgs_patch.apply({', '.join(map(repr, others))})" in message
    assert set(refused["states"].values()) - {"not-needed"} == {"not-applied"} | {"incompatible"}  # shims off this line
    forced, log = report(REPORT.format(imports="import transformers.trainer", arguments="force=True"), pythonpath=fake)
    assert forced["outcome"] == "applied" and forced["states"]["trainer-compute-loss"] == "applied"
    warning = log[log.index("WARNING patch 'trainer-compute-loss' forced anyway"):]
    assert "forcing is not a fix" in warning and "can train wrong without any error" in warning
    trainer_spec = engine.known()["trainer-compute-loss"].requires["transformers"]
    assert f'pip install "transformers{trainer_spec}"' in warning


def test_without_the_upstream_a_bare_apply_passes_over_its_patches_and_naming_one_is_refused(without_upstream):
    found, _ = report(REPORT.format(imports="", arguments=""), pythonpath=without_upstream, flags=("-S",))
    assert found["outcome"] == "applied"  # the upstreams installed are served; boson's patches are not needed
    for declaration in DEFAULTS:
        if any(t.path.startswith("boson_multimodal") for t in declaration.targets):
            assert found["states"][declaration.id] == "not-needed", declaration.id
    for arguments in ("'model-loss'", "'model-loss', force=True", "text_loss_weight=1.0"):
        found, _ = report(REPORT.format(imports="", arguments=arguments), pythonpath=without_upstream, flags=("-S",))
        message = found["outcome"]
        assert 'requested: "boson-multimodal >=0.1.0" but found: nothing (not installed)' in message
        assert f"fix: {BOSON_FIX}" in message
        assert "cannot help: boson-multimodal is not installed" in message
        assert "to patch it anyway" not in message and "HIGGS_PATCH_FORCE=1)," not in message
        assert "pending" not in found["states"].values() and "applied" not in found["states"].values()


@pytest.fixture(scope="module")
def edited_collator(tmp_path_factory, copy_upstream_with_edit) -> Path:
    """The collator module's helper edited, its HiggsAudioSampleCollator.__call__ not."""
    return copy_upstream_with_edit(
        tmp_path_factory.mktemp("edited"),
        b"return (n + round_to - 1) // round_to * round_to", b"return -(-n // round_to) * round_to",
    )


def test_an_edited_upstream_names_the_module_view_and_the_patches_that_still_apply(edited_collator):
    imports = "import boson_multimodal.data_collator.higgs_audio_collator, boson_multimodal.model.higgs_audio.modeling_higgs_audio"
    if needed.shims():  # boson imports on this line only with its shims applied first, as users must
        imports = f"higgs_patch.apply(*{needed.shims()!r}); {imports}"
    found, _ = report(REPORT.format(imports=imports, arguments=""), pythonpath=edited_collator)
    message = found["outcome"]
    assert "patch 'device-tensor-factory' refused" in message
    assert ("higgs_audio_collator:torch, the module boson_multimodal.data_collator.higgs_audio_collator as a whole "
            "(the patch changes its view of torch, not torch), read from") in message
    assert "fix: if you edited that code, undo the edit" in message
    # the collator's __call__ is unchanged: collator-audio-index still applies, as do the model patches
    others = ", ".join(repr(d.id) for d in DEFAULTS if COLLATOR_MODULE_VIEW not in [t.path for t in d.targets])
    assert "'collator-audio-index'" in others and "'forward-kwargs-filter'" in others
    assert f"can still be applied by id: higgs_patch.apply({others})" in message
    applied, _ = report(REPORT.format(imports=imports, arguments=others), pythonpath=edited_collator)
    assert applied["outcome"] == "applied"


def test_doctor_names_the_module_view_not_torch(edited_collator):
    done = subprocess.run([str(CONSOLE), "doctor"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(edited_collator)})
    assert done.returncode == 1
    line = next(line for line in done.stdout.splitlines() if "✗ fingerprint" in line)
    assert "the module boson_multimodal.data_collator.higgs_audio_collator as a whole (the patch changes its " \
           "view of torch, not torch) ast1:" in line
    assert "higgs_audio_collator.py was changed" in line and "✗ fingerprint       torch " not in done.stdout


def test_smoke_on_an_edited_upstream_gives_a_one_line_verdict_not_a_traceback(edited_collator):
    done = subprocess.run([str(CONSOLE), "smoke", "--steps", "2", "--device", "cpu"], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(edited_collator)})
    assert done.returncode == 1
    assert "Traceback" not in done.stdout + done.stderr
    verdict = [line for line in done.stdout.splitlines() if line.startswith("smoke: FAILED")]
    assert len(verdict) == 1 and "IncompatibleUpstreamError: patch 'device-tensor-factory' refused" in verdict[0]
    verbose = subprocess.run([str(CONSOLE), "-v", "smoke", "--steps", "2", "--device", "cpu"], capture_output=True,
                             text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(edited_collator)})
    assert "Traceback" in verbose.stderr  # the cause stays available


def test_doctor_without_the_upstream_gives_one_fix_everywhere(without_upstream):
    code = "import sys; from higgs_patch.commands.cli import main; sys.argv = ['higgs-patch', 'doctor', '--json']; main()"
    done = python(code, pythonpath=without_upstream, flags=("-S",))
    report_ = json.loads(done.stdout)
    # where transformers has its own Higgs Audio v2 (5.3 on), that is served: boson missing is a warning there
    native = importlib.util.find_spec("transformers.models.higgs_audio_v2") is not None
    assert done.returncode == (0 if native else 1)
    assert [c["level"] for c in report_["checks"] if c["name"] == "boson_multimodal"] == ["warn" if native else "fail"]
    fixes = [c["fix"] for c in report_["checks"] if c["name"] == "boson_multimodal"]
    fixes += [c["fix"] for p in report_["patches"] for c in p["checks"] if c["level"] != "ok" and c["fix"]]
    assert fixes and set(fixes) == {BOSON_FIX}
    # its patches' sections say what a bare apply() does with them
    model_loss = next(p for p in report_["patches"] if p["id"] == "model-loss")
    assert any("boson-multimodal not installed: a bare apply() passes over it" in c["detail"] for c in model_loss["checks"])



def test_doctor_under_force_says_what_forcing_a_version_gate_risks(tmp_path):
    fake = fake_distribution(tmp_path, "transformers", "4.45.2")  # below every line the plugin supports
    code = "import sys; from higgs_patch.commands.cli import main; sys.argv = ['higgs-patch', 'doctor', '--json']; main()"
    report_ = json.loads(python(code, pythonpath=fake, env={"HIGGS_PATCH_FORCE": "1"}).stdout)
    patch = next(p for p in report_["patches"] if p["id"] == "trainer-compute-loss")
    verdict = next(c for c in patch["checks"] if c["name"] == "would apply")
    assert verdict["level"] == "warn" and verdict["detail"].startswith("yes, forced by HIGGS_PATCH_FORCE=1")
    assert "forcing is not a fix: it can train wrong without any error" in verdict["detail"]
