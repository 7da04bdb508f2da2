"""The ``higgs-patch`` command, in process (click's CliRunner) and as a real subprocess.

Everything runs against the installed boson_multimodal and transformers; the broken and the modified
upstream are real copies on PYTHONPATH, seen only by a subprocess.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tomllib
from importlib import resources
from pathlib import Path

import pytest
import transformers
import wrapt
from click.testing import CliRunner

import higgs_patch
import needed
from higgs_patch.slots import object_at
from higgs_patch import engine
from higgs_patch.commands import doctor, provenance
from higgs_patch.commands.cli import main

PATCH_IDS = list(engine.known())
STACK = ["python", "platform", "torch", "torchaudio", "transformers", "accelerate", "peft", "wrapt", "boson_multimodal"]
COLLATOR = "boson_multimodal/data_collator/higgs_audio_collator.py"


def command() -> list[str]:
    """The console script next to this interpreter, else the module."""
    script = Path(sys.executable).with_name("higgs-patch")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "higgs_patch"]


def run(*args: str, pythonpath: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("HIGGS_PATCH_FORCE", "PYTHONPATH")}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([*command(), *args], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(autouse=True)
def _restore_logging():
    """The command configures logging for its process; give the test process its settings back."""
    logger = logging.getLogger("higgs_patch")
    level, handlers, verbosity = logger.level, list(logger.handlers), transformers.logging.get_verbosity()
    yield
    logger.setLevel(level)
    logger.handlers[:] = handlers
    transformers.logging.set_verbosity(verbosity)


@pytest.fixture
def cli():
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(main, list(args), catch_exceptions=False)

    return invoke


@pytest.fixture(scope="module")
def upstream_copy(tmp_path_factory) -> Path:
    """A copy of the installed boson_multimodal package in a folder of its own."""
    source = Path(importlib.metadata.distribution("boson_multimodal").locate_file("boson_multimodal"))
    folder = tmp_path_factory.mktemp("upstream")
    shutil.copytree(source, folder / "boson_multimodal", ignore=shutil.ignore_patterns("__pycache__"))
    return folder


def installed_release_name() -> str:
    return f"boson-multimodal {importlib.metadata.version('boson_multimodal')}"


def compat_targets(name: str) -> dict[str, str]:
    text = resources.files("higgs_patch.compat").joinpath("fingerprints.toml").read_text(encoding="utf-8")
    releases = {release["name"]: release["targets"] for release in tomllib.loads(text)["release"]}
    return releases[name]


NATIVE = importlib.util.find_spec("transformers.models.higgs_audio_v2") is not None


def assert_known(printed: dict[str, str], name: str) -> None:
    """The printed fingerprints are compat's for that release; a method boson's class inherits from transformers
    has the code of the transformers installed: one of compat's releases of those methods."""
    text = resources.files("higgs_patch.compat").joinpath("fingerprints.toml").read_text(encoding="utf-8")
    inherited = {}
    for release in tomllib.loads(text)["release"]:
        if release["name"].endswith("(PreTrainedModel methods HiggsAudioModel inherits)"):
            for path, value in release["targets"].items():
                inherited.setdefault(path, set()).add(value)
    expected = compat_targets(name)
    assert printed.keys() == expected.keys()
    for path, value in printed.items():
        assert value == expected[path] or value in inherited.get(path, ()), path


def marked(output: str, mark: str) -> list[str]:
    return [line.strip() for line in output.splitlines() if line.strip().startswith(mark)]


# --- version, list, usage ------------------------------------------------------------------------


def test_version(cli):
    assert cli("--version").output.strip() == f"higgs-patch, version {higgs_patch.__version__}"
    done = run("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"higgs-patch, version {higgs_patch.__version__}"


def test_list_names_every_patch(cli):
    result = cli("list")
    assert result.exit_code == 0
    for declaration in engine.known().values():
        line = next(line for line in result.output.splitlines() if line.startswith(declaration.id + " "))
        assert str(declaration.version) in line and declaration.summary in line
        assert (" on " if declaration.default else " off ") in line
        for target in declaration.targets:
            assert f"→ {target.path}" in result.output
    listed = json.loads(cli("list", "--json").output)
    assert [p["id"] for p in listed["patches"]] == PATCH_IDS


def test_list_imports_no_torch():
    code = (
        "import sys; from higgs_patch.commands.cli import main\n"
        "try:\n    main(['list'])\nexcept SystemExit as exit:\n    assert not exit.code, exit.code\n"
        "heavy = [m for m in ('torch', 'transformers', 'boson_multimodal') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "forward-kwargs-filter" in done.stdout


def test_usage_errors_exit_2(cli):
    assert cli("doctor", "--no-such-option").exit_code == 2
    assert cli("smoke", "--device", "tpu").exit_code == 2
    assert cli("smoke", "--steps", "0").exit_code == 2
    assert run("no-such-command").returncode == 2


# --- doctor --------------------------------------------------------------------------------------


def test_doctor_passes_and_changes_nothing(cli):
    originals = {t.path: object_at(importlib.import_module(t.module), t.qualname, t.adds) for d in needed.declarations() for t in d.targets}
    result = cli("doctor", "--strict")
    assert result.exit_code == 0, result.output
    for name in STACK:
        assert re.search(rf"^  ✓ {re.escape(name)} ", result.output, re.M), name
    for patch_id in PATCH_IDS:
        assert f"Patch {patch_id} " in result.output
    assert result.output.count("dry run") == len(PATCH_IDS)
    assert not marked(result.output, "✗") and not marked(result.output, "!")
    assert "doctor: all good" in result.output
    assert {s.state for s in needed.beyond_shims()} == {"not-applied"}  # the shims conftest keeps: kept
    now = {t.path: object_at(importlib.import_module(t.module), t.qualname, t.adds) for d in needed.declarations() for t in d.targets}
    assert all(now[path] is original for path, original in originals.items())


def test_doctor_leaves_an_applied_patch_alone(cli):
    with higgs_patch.applied("forward-kwargs-filter"):
        report = json.loads(cli("doctor", "--json").stdout)
        states = {s.id: s.state for s in higgs_patch.status()}
    patch = next(p for p in report["patches"] if p["id"] == "forward-kwargs-filter")
    assert patch["state"] == "applied" and patch["dry_run"] == "skipped"
    assert states["forward-kwargs-filter"] == "applied"
    assert report["ok"] is True


def test_doctor_json_follows_the_schema(cli):
    result = cli("doctor", "--json")
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert report["schema"] == doctor.SCHEMA == 1
    assert report["ok"] is True and report["strict"] is False
    assert set(report) >= {"schema", "ok", "strict", "higgs_patch", "counts", "seconds", "environment", "checks", "patches"}
    environment = report["environment"]
    assert set(environment) == {*STACK, "startup_hook", "peft_lora"}
    assert environment["peft_lora"] == {"works": True, "outcome": "ok"}
    assert environment["startup_hook"]["active"] is True and environment["startup_hook"]["path"].endswith("higgs_patch.pth")
    for name in STACK[2:]:
        assert {"installed", "version"} <= set(environment[name]), name
    assert environment["torch"]["cuda"]["available"] in (True, False)
    assert environment["wrapt"]["c_extension"] in (True, False)
    assert environment["boson_multimodal"]["importable"] is True
    assert environment["boson_multimodal"]["version"] == importlib.metadata.version("boson_multimodal")
    assert environment["transformers"]["version"] == transformers.__version__
    peft = STACK.index("peft") + 1
    assert [c["name"] for c in report["checks"]] == [*STACK[:peft], "peft LoRA", *STACK[peft:], "import order",
                                                     "start-up hook", "tested line"]
    for check in report["checks"] + [c for p in report["patches"] for c in p["checks"]]:
        assert set(check) == {"name", "level", "detail", "fix"} and check["level"] in ("ok", "warn", "fail")
    assert [p["id"] for p in report["patches"]] == PATCH_IDS
    for patch in report["patches"]:
        assert set(patch) >= {"id", "version", "state", "compatible", "reason", "default", "targets", "code", "dry_run"}
        kept = patch["id"] in needed.shims()  # applied by conftest, as this line needs (none on 4.46)
        assert patch["state"] == ("applied" if kept else "not-applied")
        assert patch["compatible"] is True and patch["reason"] == ""
        # a shim off this line: not needed; an applied patch: left alone
        assert patch["dry_run"] == ("ok" if patch["needed"] and not kept else "skipped")
        assert patch["needed"] is (patch["id"] not in needed.not_needed())
        for code in patch["code"]:
            assert code["known"] is True and code["releases"] and code["fingerprint"].startswith("ast1:")
    assert sum(report["counts"].values()) == len(report["checks"]) + sum(len(p["checks"]) for p in report["patches"])


def test_doctor_subprocess_passes():
    done = run("doctor")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "doctor: all good" in done.stdout
    for patch_id in PATCH_IDS:
        assert f"Patch {patch_id} " in done.stdout
    # It says how long it took (a figure, not a goal: benchmarks measure time, tests measure behaviour).
    assert re.search(r"checks took [\d.]+ s after [\d.]+ s importing the stack", done.stdout), done.stdout[-500:]


def test_doctor_fails_when_upstream_cannot_be_imported(tmp_path):
    package = tmp_path / "boson_multimodal"
    package.mkdir()
    (package / "__init__.py").write_text('raise RuntimeError("boson_multimodal is broken on purpose")\n')
    done = run("doctor", pythonpath=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    line = next(line for line in marked(done.stdout, "✗") if line.startswith("✗ boson_multimodal"))
    assert "cannot be imported: RuntimeError: boson_multimodal is broken on purpose" in line
    assert str(package / "__init__.py") in line
    assert "problems found" in done.stdout


def test_doctor_fails_and_names_the_patch_when_target_code_changed(upstream_copy):
    collator = upstream_copy / COLLATOR
    source = collator.read_bytes()
    edit = b"if all([ele.label_ids is None for ele in batch]):"
    assert source.count(edit) == 1
    collator.write_bytes(source.replace(edit, edit.replace(b"all(", b"any(")))  # one token
    try:
        done = run("doctor", pythonpath=upstream_copy)
        as_json = run("doctor", "--json", pythonpath=upstream_copy)
    finally:
        collator.write_bytes(source)
    assert done.returncode == 1, done.stdout + done.stderr
    sections = {block.split()[0]: block for block in done.stdout.split("\nPatch ")[1:]}
    changed = {"collator-audio-index", "device-tensor-factory"}  # both patch the collator's __call__
    for patch_id in changed:
        assert "✗ fingerprint       HiggsAudioSampleCollator.__call__" in sections[patch_id]
        assert "matches no known release" in sections[patch_id]
        assert "✗ would apply" in sections[patch_id]
    for patch_id in set(PATCH_IDS) - changed:
        assert "✗" not in sections[patch_id]
    assert "! boson_multimodal" in done.stdout and str(upstream_copy) in done.stdout  # the copy shadows the install
    report = json.loads(as_json.stdout)
    assert as_json.returncode == 1 and report["ok"] is False
    assert {p["id"] for p in report["patches"] if not p["compatible"]} == changed
    for patch in report["patches"]:
        if patch["id"] in changed:
            assert "fingerprint" in patch["reason"] and patch["dry_run"] == "skipped"


TORCHCODEC_FAILURE = (
    "Could not load libtorchcodec. Likely causes:\\n"
    "  1. FFmpeg is not properly installed in your environment. We support versions 4, 5, 6, 7 and 8.\\n"
    "  2. The PyTorch version is not compatible with this version of TorchCodec.\\n"
    "The following exceptions were raised as we tried to load libtorchcodec:\\n"
    "[start of libtorchcodec loading traceback]\\n"
    "FFmpeg version 8: libavutil.so.60: cannot open shared object file: No such file or directory\\n"
    "FFmpeg version 7: libavutil.so.59: cannot open shared object file: No such file or directory\\n"
    "[end of libtorchcodec loading traceback]."
)


@pytest.mark.parametrize("raised, cause", [
    ("RuntimeError('TorchCodec is required for save_with_torchcodec.')", "TorchCodec is required"),
    (f"RuntimeError('{TORCHCODEC_FAILURE}')", "shared libraries not found: libavutil.so.60, libavutil.so.59"),
])
def test_doctor_informs_about_a_torchaudio_that_cannot_do_audio_io(tmp_path, raised, cause):
    """torchaudio 2.9 without a working torchcodec: nothing here uses it, so it informs, even under --strict."""
    (tmp_path / "torchaudio").mkdir()
    (tmp_path / "torchaudio" / "__init__.py").write_text(f"def save(*args, **kwargs):\n    raise {raised}\nload = save\n")
    (tmp_path / "torchaudio-2.9.1.dist-info").mkdir()
    (tmp_path / "torchaudio-2.9.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: torchaudio\nVersion: 2.9.1\n"
        f"Requires-Dist: torch=={importlib.metadata.version('torch')}\n"
    )
    done = run("doctor", "--json", "--strict", pythonpath=tmp_path)
    report = json.loads(done.stdout)
    assert done.returncode == 0 and report["ok"] is True and report["counts"]["warn"] == 0, done.stdout[-3000:]
    check = next(c for c in report["checks"] if c["name"] == "torchaudio")
    assert check["level"] == "ok" and "cannot save and load a WAV file" in check["detail"] and cause in check["detail"]
    assert "nothing in higgs-patch" in check["detail"] and "torchaudio 2.9.1 does file I/O through torchcodec, and torchcodec is not installed" in check["detail"]
    assert "FFmpeg" in check["fix"] and f"torch {importlib.metadata.version('torch')}" in check["fix"]
    assert report["environment"]["torchaudio"] == {"installed": True, "version": "2.9.1", "wav_roundtrip": False}
    text = run("doctor", pythonpath=tmp_path).stdout
    assert "advice: only if your own code reads audio with torchaudio" in text


@pytest.mark.core
def test_doctor_names_a_torchaudio_that_cannot_load_as_the_cause(tmp_path):
    """PyPI's torchaudio 2.11.1 is a CUDA build: on a CPU torch its extension fails to load (OSError from torch's
    load_library), and transformers 5 imports torchaudio whenever it is installed, so boson's model, collator and
    peft fail with it. Before issue 26 doctor ticked torchaudio and advised reinstalling boson and another peft.
    Stand-in: a real package on PYTHONPATH whose import raises that OSError, naming its library as torch does
    (building a venv with the real wheel needs a download at test time)."""
    package = tmp_path / "torchaudio"
    (package / "lib").mkdir(parents=True)
    (package / "__init__.py").write_text(
        "import os\nraise OSError('Could not load this library: ' + os.path.join(os.path.dirname(__file__), "
        "'lib', '_torchaudio.so'))\n")
    (tmp_path / "torchaudio-2.11.1.dist-info").mkdir()
    (tmp_path / "torchaudio-2.11.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: torchaudio\nVersion: 2.11.1\nRequires-Dist: torch>=2.11\n")
    done = run("doctor", "--json", pythonpath=tmp_path)
    report = json.loads(done.stdout)
    check = next(c for c in report["checks"] if c["name"] == "torchaudio")
    assert "cannot be loaded" in check["detail"] and "_torchaudio.so" in check["detail"], check
    assert "pip uninstall -y torchaudio" in check["fix"]
    others = [c for c in report["checks"] if c["name"] != "torchaudio" and c["level"] == "fail"]
    others += [c for p in report["patches"] for c in p["checks"] if c["level"] == "fail" and c["name"] == "import"]
    if others:  # something of the stack imports it here (transformers 5): torchaudio is the failure and the cause
        assert check["level"] == "fail" and done.returncode == 1
    else:
        assert check["level"] == "warn"
    for other in others:
        assert other["fix"] == "fix torchaudio (its check above)", other
    advice = " ".join(c["fix"] for c in report["checks"] + [c for p in report["patches"] for c in p["checks"]])
    assert "reinstall" not in advice and "pip install 'peft" not in advice


@pytest.mark.parametrize("version", ["0.21.2", "0.18.0"])
def test_doctor_fails_on_a_peft_known_to_break_lora(tmp_path, version):
    """compat/matrix.toml: peft 0.18 to 0.21 with torch 2.13 crash in get_peft_model: a failure, with the fix."""
    if not _a_known_bad_rule_holds_here("peft", version):
        pytest.skip(f"no known-bad rule for peft {version} holds with transformers {transformers.__version__} "
                    "(each is for transformers < 4.47 or < 4.52, compat/matrix.toml `when`): nothing to fail on")
    (tmp_path / f"peft-{version}.dist-info").mkdir()
    (tmp_path / f"peft-{version}.dist-info" / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: peft\nVersion: {version}\n"
    )
    done = run("doctor", "--json", pythonpath=tmp_path)
    report = json.loads(done.stdout)
    check = next(c for c in report["checks"] if c["name"] == "peft")
    assert check["level"] == "fail" and "torch.distributed" in check["detail"] and "peft==0.17.1" in check["fix"]
    assert done.returncode == 1 and report["ok"] is False


def _a_known_bad_rule_holds_here(distribution: str, version: str) -> bool:
    import tomllib

    from packaging.specifiers import SpecifierSet

    matrix = tomllib.loads((importlib.resources.files("higgs_patch.compat") / "matrix.toml").read_text())
    return any(
        rule["distribution"] == distribution and version not in SpecifierSet(rule["works"])
        and all(importlib.metadata.version(name) in SpecifierSet(spec) for name, spec in rule.get("when", {}).items())
        for rule in matrix["known-bad"]
    )


def test_provenance_reads_git_files(tmp_path):
    checkout = tmp_path / "higgs-audio"
    package = checkout / "boson_multimodal"
    package.mkdir(parents=True)
    git = checkout / ".git"
    (git / "refs" / "heads").mkdir(parents=True)
    (git / "HEAD").write_text("ref: refs/heads/main\n")
    (git / "config").write_text(
        '[core]\n\tbare = false\n[remote "origin"]\n\turl = https://github.com/boson-ai/higgs-audio.git\n'
    )
    (git / "packed-refs").write_text("# pack-refs with: peeled\n" + "f04f5df" + "0" * 33 + " refs/heads/main\n")
    found = provenance.origin(None, package)
    assert found["commit"] == "f04f5df" + "0" * 33 and found["url"].endswith("boson-ai/higgs-audio.git")
    assert provenance.describe(found) == "git checkout at f04f5df"
    (git / "refs" / "heads" / "main").write_text("a" * 40 + "\n")
    assert provenance.origin(None, package)["commit"] == "a" * 40
    assert provenance.origin(None, tmp_path / "elsewhere" / "pkg")["commit"] is None


# --- fingerprint ---------------------------------------------------------------------------------


def test_fingerprint_matches_compat(cli):
    result = cli("fingerprint")
    assert result.exit_code == 0
    printed = tomllib.loads(result.output)["release"]
    native = [f"transformers {transformers.__version__}"] if NATIVE else []  # transformers' own Higgs Audio v2
    assert [r["name"] for r in printed] == [installed_release_name(), *native]
    assert_known(printed[0]["targets"], installed_release_name())
    for release in printed[1:]:
        assert release["targets"] == compat_targets(release["name"])
    as_json = json.loads(cli("fingerprint", "--json").output)
    assert as_json["schema"] == 1 and as_json["releases"][0]["targets"] == printed[0]["targets"]


def test_fingerprint_subprocess_of_a_git_checkout(tmp_path, upstream_copy):
    checkout = tmp_path / "higgs-audio"
    shutil.copytree(upstream_copy / "boson_multimodal", checkout / "boson_multimodal")
    (checkout / ".git").mkdir()
    (checkout / ".git" / "HEAD").write_text("f04f5df" + "1" * 33 + "\n")  # detached
    (checkout / ".git" / "config").write_text('[remote "origin"]\n\turl = git@github.com:boson-ai/higgs-audio.git\n')
    done = run("fingerprint", pythonpath=checkout)
    assert done.returncode == 0, done.stderr
    release = tomllib.loads(done.stdout)["release"][0]
    assert release["name"] == "boson-ai/higgs-audio@f04f5df"
    assert release["origin"].startswith("git checkout at f04f5df")
    assert_known(release["targets"], installed_release_name())  # same code, other bytes


# --- smoke ---------------------------------------------------------------------------------------


def losses(output: str) -> dict[str, tuple[float, float]]:
    line = next(line for line in output.splitlines() if "first → last step:" in line)
    return {
        name: (float(first), float(last))
        for name, first, last in re.findall(r"(text loss|audio loss|grad norm) ([\d.]+) → ([\d.]+)", line)
    }


def test_smoke_trains_with_falling_losses(cli):
    result = cli("smoke", "--steps", "30", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "smoke: passed: losses finite and falling (30 steps" in result.output
    found = losses(result.stdout)
    assert found["text loss"][1] < found["text loss"][0]
    assert found["audio loss"][1] < found["audio loss"][0]
    assert {s.state for s in higgs_patch.status() if s.id not in needed.shims()} == {"not-applied"}  # it reverts what it applied


def test_smoke_compare_subprocess_shows_what_the_patches_fix():
    done = run("smoke", "--steps", "30", "--device", "cpu", "--compare")
    assert done.returncode == 0, done.stdout + done.stderr
    before, after = done.stdout.split("With the patches:")
    failures = marked(before, "✗")
    expected = {
        "forward-kwargs-filter": "TypeError: HiggsAudioModel.forward() got an unexpected keyword argument 'labels'",
        "model-loss": "ValueError: The model did not return a loss",
        "device-tensor-factory": "RuntimeError:",
    }
    for patch_id, message in expected.items():
        assert any(message in line and f"[fixed by {patch_id}]" in line for line in failures), patch_id
    assert any("IndexError" in line and "[fixed by collator-audio-index]" in line for line in failures)
    assert any("audio labels lost" in line and "the second" in line for line in failures)
    assert len(failures) == 5
    fixed = marked(after.split("Training")[0], "✓")
    assert len(fixed) == 5 and all(" works " in line for line in fixed)
    assert "smoke: passed" in done.stdout
    assert losses(done.stdout)["audio loss"][1] < losses(done.stdout)["audio loss"][0]
    assert "(audio-index-clamp)" in done.stderr  # the short sample, logged, not hidden


def test_smoke_cuda_without_a_gpu_is_an_error(cli):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is usable here")
    result = cli("smoke", "--device", "cuda")
    assert result.exit_code == 1 and "no usable CUDA device" in result.output


# --- doctor and list on broken data and broken stacks ---------------------------------------------


@pytest.fixture
def plugin_copy(tmp_path) -> Path:
    """A copy of the installed plugin, imported first from PYTHONPATH: its data files can be broken."""
    copy = tmp_path / "higgs_patch"
    shutil.copytree(Path(higgs_patch.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    for data in ("patches", "compat"):  # inside the package in a wheel; beside it in an editable install
        if not (copy / data).is_dir():
            shutil.copytree(str(resources.files(f"higgs_patch.{data}")), copy / data,
                            ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


@pytest.mark.parametrize("broken, content", [
    ("patches/forward-kwargs-filter.toml", "id = [unclosed\n"),
    ("compat/matrix.toml", "[[known-bad]]\ndistribution = 'peft'\n"),  # valid TOML, fields missing
    ("compat/install.toml", "boson-multimodal = 3\n"),
    ("compat/fingerprints.toml", "release = 3\n"),
])
def test_doctor_json_and_list_stay_valid_when_the_plugins_own_data_is_malformed(plugin_copy, broken, content):
    (plugin_copy / "higgs_patch" / broken).write_text(content)
    done = run("doctor", "--json", pythonpath=plugin_copy)
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert done.returncode == 1 and report["ok"] is False and report["patches"] == []
    failed = [c for c in report["checks"] if c["level"] == "fail"]
    assert len(failed) == 1 and failed[0]["name"] == "plugin data" and broken.split("/")[1] in failed[0]["detail"]
    assert "✗ plugin data" in run("doctor", pythonpath=plugin_copy).stdout
    if broken.startswith("patches/"):
        listed = run("list", "--json", pythonpath=plugin_copy)
        assert listed.returncode == 1 and "Traceback" not in listed.stderr
        assert "forward-kwargs-filter.toml" in json.loads(listed.stdout)["error"]
        plain = run("list", pythonpath=plugin_copy)
        assert plain.returncode == 1 and "forward-kwargs-filter.toml" in plain.stderr and "Traceback" not in plain.stderr


def test_doctor_blames_transformers_when_the_upstream_cannot_import_from_it(tmp_path):
    """A transformers below every supported line (4.45.2; boson_multimodal builds from 4.46) that lacks a name
    boson_multimodal imports: the cause is transformers, and the fix is the version that works, not
    reinstalling boson_multimodal."""
    (tmp_path / "transformers-4.45.2.dist-info").mkdir()
    (tmp_path / "transformers-4.45.2.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: transformers\nVersion: 4.45.2\n"
    )
    (tmp_path / "boson_multimodal").mkdir()
    (tmp_path / "boson_multimodal" / "__init__.py").write_text(
        "from transformers.models.llama.modeling_llama import NAME_THIS_TRANSFORMERS_LACKS\n"
    )
    report = json.loads(run("doctor", "--json", pythonpath=tmp_path).stdout)
    check = next(c for c in report["checks"] if c["name"] == "boson_multimodal")
    assert check["level"] == "fail" and "NAME_THIS_TRANSFORMERS_LACKS" in check["detail"]
    assert "the cause is transformers 4.45.2: boson_multimodal works with transformers>=4.46" in check["detail"]
    assert check["fix"] == "pip install 'transformers>=4.46'"
    transformers_check = next(c for c in report["checks"] if c["name"] == "transformers")
    assert transformers_check["level"] == "fail" and transformers_check["fix"] == check["fix"]
