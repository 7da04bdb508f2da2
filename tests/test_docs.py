"""The README and docs/ keep their promises: links resolve, the layout names what exists, examples run.

Every ```python block of the README and of docs/*.md runs as it is written, in a fresh interpreter
against the installed plugin; every `higgs-patch ...` line of a ```bash block is a command line the
CLI accepts (``higgs-patch run`` examples also run, in test_startup.py).
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
DOCUMENTS = [README, ROOT / "CONTRIBUTING.md", *PAGES]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"(?<!!)\[[^\]]+\]\(([^)\s]+)\)")


def blocks(language: str) -> list[tuple[str, str]]:
    """(document:line, code) of every fenced block of ``language`` in the README and docs/."""
    found = []
    for document in DOCUMENTS:
        text = document.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            if match.group(1) == language:
                line = text.count("\n", 0, match.start()) + 1
                found.append((f"{document.relative_to(ROOT)}:{line}", match.group(2)))
    return found


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(document: Path) -> set[str]:
    text = FENCE.sub("", document.read_text(encoding="utf-8"))
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_resolves(document):
    assert document.is_file(), f"{document.relative_to(ROOT)} is missing"
    for target in LINK.findall(FENCE.sub("", document.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (document.parent / path).resolve() if path else document
        assert linked.exists(), f"{document.relative_to(ROOT)} links to {target}: no such file"
        if anchor:
            assert anchor in anchors(linked), f"{document.relative_to(ROOT)} links to {target}: no such heading"


def test_the_readme_links_every_page_of_docs():
    linked = {(README.parent / target.partition("#")[0]).resolve() for target in LINK.findall(README.read_text())}
    assert {page.resolve() for page in PAGES} <= linked


def test_the_readme_stays_short():
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 220, "the rest belongs on a page in docs/"


def test_the_readme_layout_names_the_folders_that_exist():
    text = README.read_text(encoding="utf-8")
    layout = FENCE.search(text, text.index("## Layout")).group(2)
    named = {line.split()[0].rstrip("/") for line in layout.splitlines() if line and not line.startswith(" ")}
    for folder in named:
        assert (ROOT / folder).is_dir(), f"the README's layout names {folder}/, which does not exist"
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    top = {name.split("/")[0] for name in tracked if "/" in name and not name.startswith(".")}
    package = {f"higgs_patch/{p.name}" for p in (ROOT / "higgs_patch").iterdir() if p.is_dir() and p.name != "__pycache__"}
    missing = (top | package) - named
    assert not missing, f"the README's layout does not name {sorted(missing)}"


@pytest.mark.parametrize("where, code", blocks("python") or [("(none)", "")], ids=lambda v: v if ":" in v else "")
def test_every_python_example_runs_as_written(where, code, tmp_path):
    assert code, "the README and docs/ have no python example"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{where}:\n{done.stderr[-3000:]}"


def command_lines() -> list[tuple[str, list[str]]]:
    found = []
    for where, code in blocks("bash"):
        for line in code.splitlines():
            for command in line.split("&&"):
                words = shlex.split(command, comments=True)
                if words and Path(words[0]).name == "higgs-patch":
                    found.append((where, words[1:]))
    return found


@pytest.mark.parametrize("where, args", command_lines(), ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_every_documented_command_line_is_accepted(where, args):
    from higgs_patch.commands.cli import main

    try:
        context = main.make_context("higgs-patch", list(args))
        rest = [*getattr(context, "_protected_args", getattr(context, "protected_args", [])), *context.args]
        name, command, rest = main.resolve_command(context, rest)
        command.make_context(name, rest, parent=context)
    except click.exceptions.Exit:  # --version, --help: accepted, and done
        pass
    except click.UsageError as exc:
        pytest.fail(f"{where}: higgs-patch {' '.join(args)}: {exc}")


def table_ids(document: Path) -> set[str]:
    """The patch ids that open a row of a Markdown table in ``document`` (`id` or `id` (opt-in))."""
    return set(re.findall(r"^\| `([a-z0-9-]+)`", document.read_text(encoding="utf-8"), re.M))


def test_every_patch_has_its_row_the_fixes_in_the_readme_the_shims_on_the_compatibility_page():
    import needed
    from higgs_patch import engine

    shims = set(needed.every_shim())
    fixes = set(engine.known()) - shims
    assert table_ids(README) == fixes, "README's symptom table: one row per fix"
    assert shims <= table_ids(ROOT / "docs" / "compatibility.md"), "docs/compatibility.md: one row per shim"
