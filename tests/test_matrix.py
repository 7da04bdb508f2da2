"""compat/matrix.toml is the one list of tested lines: CI installs what it says, the docs show what it says.

Each tested stack's constraints file pins that stack, ``.ci/run`` runs the README's test command on
the first and reads the others from the list, docs/compatibility.md's table is the list rendered, and
every rule the accumulation fix knows (``trainer_lines``) is proved on at least one tested line.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from higgs_patch import upstream
from higgs_patch.fixes import trainer_lines

pytestmark = pytest.mark.core

ROOT = Path(__file__).resolve().parents[1]
COMPAT = ROOT / "compat"
PAGE = ROOT / "docs" / "compatibility.md"
BEGIN = "<!-- tested lines: rendered from compat/matrix.toml; tests/test_matrix.py keeps them equal -->"
END = "<!-- end of tested lines -->"
PINNED = ("torch", "transformers", "accelerate", "peft", "wrapt", "boson-multimodal")
SUITE_WORDS = {"full": "the whole suite", "core": "the tests marked `core`",
               "audio": "the tests marked `audio` (the whole loop, boson's audio tokenizer and serve engine)",
               "native": "the tests marked `native`, with only transformers installed (no boson-multimodal)"}
STACKS = upstream.tested()


def render() -> str:
    """The docs' table of tested lines, as compat/matrix.toml says."""
    rows = ["| transformers | peft | torch | accelerate | Python | CI runs |", "| --- | --- | --- | --- | --- | --- |"]
    for stack in STACKS:
        v = stack.versions
        runs = SUITE_WORDS[stack.suite] + (" (the README's test command)" if stack is STACKS[0] else "")
        rows.append(f"| {v['transformers']} | {v.get('peft', 'not installed')} | {v['torch']} | {v['accelerate']} "
                    f"| {v['python']} | {runs} |")
    return "\n".join([BEGIN, *rows, END])


def pins(path: Path) -> dict[str, str]:
    found = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            requirement = Requirement(line)
            found[requirement.name] = str(requirement.specifier)
    return found


def test_the_docs_table_of_tested_lines_is_compat_matrix_toml():
    text = PAGE.read_text(encoding="utf-8")
    assert BEGIN in text and END in text, f"docs/compatibility.md needs the block:\n{render()}"
    shown = text[text.index(BEGIN):text.index(END) + len(END)]
    assert shown == render(), f"docs/compatibility.md's tested lines differ from compat/matrix.toml; paste:\n{render()}"


@pytest.mark.parametrize("stack", STACKS, ids=[s.line for s in STACKS])
def test_each_tested_stack_has_a_constraints_file_that_pins_it(stack):
    path = COMPAT / stack.constraints
    assert path.is_file(), f"compat/matrix.toml: line {stack.line} names {stack.constraints}, which is missing"
    pinned = pins(path)
    for name in PINNED:
        if stack.versions[name] == "not installed":
            assert name not in pinned or stack.suite == "native", f"{stack.constraints}: {name} pinned, matrix: not installed"
            continue
        version = stack.versions[name].split(" ")[0].split("+")[0]
        assert pinned.get(name) == f"=={version}", f"{stack.constraints}: {name} {pinned.get(name)}, matrix: {version}"
    assert Version(stack.versions["transformers"]).base_version.startswith(stack.line.split("-")[0] + ".")


def test_the_first_line_is_the_readme_test_command_and_ci_runs_it_as_written():
    first = STACKS[0]
    assert (first.constraints, first.suite) == ("constraints.txt", "full")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    command = readme.split("# the tests (what CI runs: .ci/run)\n", 1)[1].splitlines()[0]
    assert "-c compat/constraints.txt" in command and command.endswith("-m pytest")
    assert command in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()


def test_ci_reads_the_other_lines_from_the_matrix():
    listed = (ROOT / ".ci" / "lines.py").read_text(encoding="utf-8")
    assert "upstream.tested()" in listed
    runner = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert ".ci/lines.py" in runner and "-m core" in runner
    said = f"# transformers {lines_said()}"
    assert said in runner.splitlines(), f".ci/run's comment on the lines today should read: {said}"


def lines_said() -> str:
    """The tested transformers in order, each run of lines with one suite followed by what it runs."""
    words = {"full": "the whole suite", "core": "the core tests", "audio": "the audio tests",
             "native": "the native tests, boson-multimodal not installed"}
    runs: list[tuple[str, list[str]]] = []
    for stack in STACKS:
        if not runs or runs[-1][0] != stack.suite:
            runs.append((stack.suite, []))
        on_torch = f" on torch {stack.versions['torch']}" if stack.suite == "audio" else ""
        runs[-1][1].append(stack.versions["transformers"] + on_torch)
    return ", ".join(f"{', '.join(versions)} ({words[suite]})" for suite, versions in runs)


@pytest.mark.parametrize("rule", trainer_lines.LINES, ids=[str(rule.versions) for rule in trainer_lines.LINES])
def test_every_rule_of_the_accumulation_fix_is_proved_on_a_tested_line(rule):
    """tests/test_trainer_lines.py checks the rule of the installed line; CI must install one line per rule."""
    covered = [s.line for s in STACKS if rule.versions.contains(s.versions["transformers"], prereleases=True)]
    assert covered, f"no tested line of compat/matrix.toml runs transformers {rule.versions}"


@pytest.mark.parametrize("stack", STACKS, ids=[s.line for s in STACKS])
def test_every_tested_line_has_exactly_one_rule(stack):
    assert trainer_lines.line_of(stack.versions["transformers"]) in trainer_lines.LINES  # raises for none or two
