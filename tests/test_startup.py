"""The start-up hook and ``higgs-patch run`` as a user meets them: bad values, isolated mode, installs
without the hook, the README's own commands, and a clone's source tree."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONSOLE = Path(sys.executable).with_name("higgs-patch")
ACTIVATE = "HIGGS_PATCH_ACTIVATE"
STATES = "import higgs_patch, json; print(json.dumps({s.id: [s.state, s.options] for s in higgs_patch.status()}))"
VALID = json.dumps({"patches": {"forward-kwargs-filter": {}}, "force": False})


def run(args: list[str], *, env: dict | None = None, cwd: Path | None = None, drop: tuple = ()):
    environ = {k: v for k, v in os.environ.items() if k not in (ACTIVATE, "HIGGS_PATCH_FORCE", "PYTHONPATH", *drop)}
    environ.update(env or {})
    return subprocess.run(args, capture_output=True, text=True, env=environ, cwd=cwd, timeout=300)


def last_json(done: subprocess.CompletedProcess) -> dict:
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("value, says", [
    ("garbage", "is not JSON"),
    ("null", "is not of the form"),
    ('{"patches": {"no-such-patch": {}}}', "unknown patch id(s) ['no-such-patch']"),
    ('{"patches": {"forward-kwargs-filter": {}}, "force": "false"}', '"force" must be JSON true or false, got "false"'),
    ('{"patches": {"forward-kwargs-filter": {}}, "force": "no"}', '"force" must be JSON true or false, got "no"'),
    ('{"patches": {"forward-kwargs-filter": null}}', "the options of patch 'forward-kwargs-filter' must be a JSON object"),
])
def test_a_malformed_activate_value_gives_one_line_and_the_program_runs_unpatched(value, says):
    done = run([sys.executable, "-c", STATES], env={ACTIVATE: value})
    assert done.returncode == 0, done.stderr
    assert {state for state, _ in last_json(done).values()} == {"not-applied"}
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith(f"higgs-patch: {ACTIVATE}") and says in lines[0]


DEEP = 30_000  # levels of nesting (json's recursion limit is about 1,000); a value stays under Linux's 128 KiB
ODD_VALUES = {
    "a deeply nested array": "[" * DEEP + "]" * DEEP,
    "deeply nested options": '{"patches": {"forward-kwargs-filter": ' + '{"a":' * 20_000 + "1" + "}" * 20_000 + "}}",
    "a number of 100,000 digits": "1" * 100_000,
    "a string of 100,000 characters": '"' + "x" * 100_000 + '"',
    "10,000 unknown patch ids": '{"patches": {' + ", ".join(f'"p{i}": {{}}' for i in range(10_000)) + "}}",
    "bytes that are not UTF-8": b'{"patches": {"\xff\xfe": {}}}',
    "a byte-order mark": "\ufeff" + VALID,
    "NaN for force": '{"patches": {"forward-kwargs-filter": {}}, "force": NaN}',
    "a nested value for force": '{"patches": {}, "force": ' + "[" * 500 + "]" * 500 + "}",
    "an option value nested deeply": '{"patches": {"collator-audio-index": {"audio_index_policy": '
                                     + "[" * 900 + "]" * 900 + "}}}",
}


@pytest.mark.parametrize("value", ODD_VALUES.values(), ids=list(ODD_VALUES))
def test_any_value_of_activate_gives_at_most_one_line_and_the_program_runs_unpatched(value):
    environ = {k: v for k, v in os.environb.items() if k not in (ACTIVATE.encode(), b"HIGGS_PATCH_FORCE", b"PYTHONPATH")}
    environ[ACTIVATE.encode()] = value if isinstance(value, bytes) else value.encode("utf-8")
    done = subprocess.run([sys.executable, "-c", STATES], capture_output=True, env=environ, timeout=300)
    stderr = done.stderr.decode("utf-8", "replace")
    assert done.returncode == 0, stderr[-2000:]
    assert {state for state, _ in json.loads(done.stdout.splitlines()[-1]).values()} == {"not-applied"}
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"higgs-patch: {ACTIVATE}"), stderr[:3000]
    assert len(lines[0]) <= 1_000


@pytest.mark.parametrize("flag", ["-I", "-E"])
def test_isolated_mode_ignores_activate_as_python_ignores_its_own_variables(flag):
    assert last_json(run([sys.executable, "-c", STATES], env={ACTIVATE: VALID}))["forward-kwargs-filter"][0] == "pending"
    done = run([sys.executable, flag, "-c", STATES], env={ACTIVATE: VALID})
    assert {state for state, _ in last_json(done).values()} == {"not-applied"}
    assert done.stderr == ""


def test_an_editable_install_carries_the_start_up_hook(tmp_path):
    """The PEP 660 wheel pip installs for ``pip install -e .``, built from a copy of this source tree."""
    source = tmp_path / "source"
    for name in ("higgs_patch", "patches", "compat"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, source / name)
    build = "import setuptools.build_meta as b, sys; print(b.build_editable(sys.argv[1]))"
    done = subprocess.run([sys.executable, "-c", build, str(tmp_path)], capture_output=True, text=True, cwd=source,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    wheel = zipfile.ZipFile(tmp_path / done.stdout.strip().splitlines()[-1])
    names = wheel.namelist()
    assert "higgs_patch.pth" in names, names
    assert wheel.read("higgs_patch.pth").decode() == (ROOT / "higgs_patch" / "higgs_patch.pth").read_text()
    finder = [n for n in names if n.startswith("__editable__") and n.endswith(".pth")]
    assert finder and all(n < "higgs_patch.pth" for n in finder)  # site runs the finder first: the hook can import


@pytest.fixture(scope="module")
def hookless_python(tmp_path_factory) -> Path:
    """A venv that sees this environment's packages through a path line, as an install without the hook does."""
    folder = tmp_path_factory.mktemp("hookless")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True, timeout=120)
    purelib = subprocess.run([str(folder / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "this-environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return folder / "bin" / "python"


def test_run_refuses_when_its_children_cannot_be_patched_and_doctor_says_so(hookless_python):
    refused = run([str(hookless_python), "-m", "higgs_patch", "run", "--", str(hookless_python), "-c", "pass"])
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "cannot patch the processes it starts: no higgs_patch.pth in" in refused.stderr
    assert "pip install -e ." in refused.stderr
    done = run([str(hookless_python), "-m", "higgs_patch", "doctor", "--json"])
    report = json.loads(done.stdout)
    hook = next(c for c in report["checks"] if c["name"] == "start-up hook")
    assert hook["level"] == "warn" and "child processes start unpatched" in hook["detail"]
    assert report["environment"]["startup_hook"] == {"path": None, "active": False}
    here = json.loads(run([str(CONSOLE), "doctor", "--json"]).stdout)
    assert here["environment"]["startup_hook"]["active"] is True


def test_run_without_a_command_is_a_clear_error():
    done = run([str(CONSOLE), "run", "--", ""])
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "no command to run" in done.stderr


def readme_run_examples() -> list[str]:
    """The ``higgs-patch run ... python train.py`` examples of the README and docs/ (Every process)."""
    lines = [line for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
             for line in page.read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line.startswith("higgs-patch run ") and line.endswith("python train.py")]


TRAIN = """
import json, higgs_patch
higgs_patch.apply()  # the README's line, in a script run under higgs-patch run
print(json.dumps({s.id: [s.state, s.options] for s in higgs_patch.status()}))
"""


@pytest.mark.parametrize("example", readme_run_examples() or ["(none found)"])
def test_the_readmes_run_examples_work_as_written_with_a_script_that_calls_apply(example, tmp_path):
    assert example.startswith("higgs-patch run"), "docs/processes.md lost its `higgs-patch run ... python train.py` examples"
    (tmp_path / "train.py").write_text(TRAIN)
    words = shlex.split(example)
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # `python` is this environment's
    states = last_json(run([str(CONSOLE), *words[1:]], cwd=tmp_path, env={"PATH": path}))
    options = dict(words[i + 1].split("=", 1) for i, word in enumerate(words) if word == "--option")
    for name, value in options.items():
        holder = next(state for state in states.values() if name in state[1])
        assert holder[0] == "pending" and holder[1][name] == value  # the run's choice survives apply()


def test_apply_with_other_options_under_run_is_refused_naming_both():
    code = "import higgs_patch; higgs_patch.apply(audio_index_policy='clamp-always')"
    done = run([str(CONSOLE), "run", "--option", "audio_index_policy=strict", "--", sys.executable, "-c", code])
    assert done.returncode == 1
    assert "already pending with options {'audio_index_policy': 'strict'}" in done.stderr
    assert "{'audio_index_policy': 'clamp-always'}" in done.stderr


def test_the_source_tree_of_a_clone_is_importable_from_its_root():
    code = "import higgs_patch, json; higgs_patch.apply(); print(json.dumps([higgs_patch.__file__, " \
           "{s.id: s.state for s in higgs_patch.status()}]))"
    where, states = last_json(run([sys.executable, "-c", code], cwd=ROOT, drop=("PYTHONSAFEPATH",)))
    assert Path(where).resolve() == ROOT / "higgs_patch" / "__init__.py"
    assert states["forward-kwargs-filter"] == "pending" and states["sparse-text-logits"] == "not-applied"


def test_doctor_fails_on_a_malformed_activate_value_naming_it():
    done = run([str(CONSOLE), "doctor", "--json"], env={ACTIVATE: '{"patches": {}, "force": "no"}'})
    hook = next(c for c in json.loads(done.stdout)["checks"] if c["name"] == "start-up hook")
    assert done.returncode == 1 and hook["level"] == "fail"
    assert hook["detail"].startswith(f"{ACTIVATE} is malformed: \"force\" must be JSON true or false") and ACTIVATE in hook["fix"]
