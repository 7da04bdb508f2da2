"""doctor's report as text: one line per check, its fix under it, and the verdict last."""

from __future__ import annotations

from ... import __version__
from .report import FAIL, OK, WARN, Check, Report


def render(report: Report, strict: bool = False, symbols: dict[str, str] | None = None) -> str:
    marks = symbols or {OK: "✓", WARN: "!", FAIL: "✗"}
    rows: list[tuple[str | None, Check | str]] = [(None, "Stack")]
    rows += [("  ", check) for check in report.stack]
    for patch in report.patches:
        d = patch.declaration
        rows.append((None, ""))
        rows.append((None, f"Patch {d.id} {d.version} (default {'on' if d.default else 'off'})"))
        rows += [("  ", check) for check in patch.checks]
    width = max(len(c.name) for _, c in rows if isinstance(c, Check))
    lines = [f"higgs-patch {__version__} doctor: checks this install, changes nothing", ""]
    for indent, row in rows:
        if isinstance(row, str):
            lines.append(row)
            continue
        lines.append(f"{indent}{marks[row.level]} {row.name.ljust(width)}  {row.detail}")
        if row.fix:
            lines.append(f"{indent}  {' ' * width}  {'fix' if row.level != OK else 'advice'}: {row.fix}")
    counts = report.counts()
    problems = counts[FAIL] + (counts[WARN] if strict else 0)
    verdict = "all good" if not problems else f"{problems} problem{'s' * (problems != 1)} found"
    lines += [
        "",
        f"doctor: {verdict} ({counts[OK]} ok, {counts[WARN]} warning{'s' * (counts[WARN] != 1)}, "
        f"{counts[FAIL]} failed{', warnings count' if strict else ''}); "
        f"checks took {report.check_seconds:.2f} s after {report.import_seconds:.2f} s importing the stack",
    ]
    return "\n".join(lines)
