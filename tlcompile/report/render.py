"""Render report.json: the build's closing terminal table (rich) and report.md; write report.md and report.html.

Nothing is computed here that is not in the report: every number comes from report.json, so a build folder can be
re-rendered (``tlcompile report render``) on any machine. The sections both documents print are
:func:`tlcompile.report.sections.report_sections`; report.html (:mod:`tlcompile.report.html`) adds the plots.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tlcompile.errors import TlcompileError
from tlcompile.report.sections import ROW_COLUMNS, Verdict, artifact_cells, report_sections, verdict
from tlcompile.runtime.terminal import num

# The terminal shows the columns a person compares first; report.md carries them all.
# Size and parity (|Δlogit|, top-1 agreement) are in report.md/html: without them the table fits 80 columns whole.
TERMINAL_COLUMNS = ("artifact", "runtime", "exec", "p50 ms", "p90 ms", "AUC", "sens", "spec", "guard")


def artifact_table(report: dict[str, Any]):
    """The build's closing table (terminal): never truncated; a narrow terminal gets one block per row."""
    from tlcompile.runtime.terminal import FitTable

    op = report.get("operating_point", {})
    keep = [ROW_COLUMNS.index(c) for c in TERMINAL_COLUMNS]
    table = FitTable(
        list(TERMINAL_COLUMNS),
        title=f"{report.get('name', 'build')}: test split, threshold {num(op.get('threshold'))} "
        "locked on val; size and parity in report.md",
        right={c for c in TERMINAL_COLUMNS if c not in ("artifact", "runtime", "exec", "guard")},
        key=2,
    )
    for row in report.get("artifacts", []):
        cells = artifact_cells(row)
        table.add_row(*[cells[i] for i in keep])
    return table


def verdict_markdown(v: Verdict) -> list[str]:
    out = ["> " + v.banner, "", "## Verdict", ""]
    mark = {"": "", "warn": "⚠ ", "bad": "✖ "}
    out += [f"- {mark[i.level]}**{i.label}:** {i.text}" for i in v.items]
    return out


# -------------------------------------------------------------------------------------------- markdown
def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(_md_escape(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_md_escape(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(report: dict[str, Any]) -> str:
    out = [f"# tlcompile build: {report.get('name')}", ""]
    out.append(
        f"Created {report.get('created')} with tlcompile {report.get('tlcompile_version')}; recipe sha256 "
        f"`{report.get('recipe_sha256', '')[:16]}`."
    )
    out += [""] + verdict_markdown(verdict(report))
    for section in report_sections(report):
        out += ["", f"## {section.title}"]
        for paragraph in section.paragraphs:
            out += ["", paragraph]
        for table in section.tables:
            out.append("")
            if table.caption:
                out += [f"**{table.caption}**", ""]
            out.append(_md_table(table.header, table.rows))
    return "\n".join(out) + "\n"


def load_report(build_dir: Path) -> dict[str, Any]:
    """report.json of a build folder, with one-line errors for a missing folder, file or broken JSON."""
    build_dir = Path(build_dir)
    path = build_dir / "report.json"
    if not build_dir.is_dir():
        raise TlcompileError(f"'{build_dir}' is not a folder; give a build folder (the --out of `tlcompile build`)")
    if not path.is_file():
        raise TlcompileError(
            f"'{build_dir}' has no report.json; give a build folder whose build finished (the --out of `tlcompile "
            "build`)"
        )
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TlcompileError(f"{path}: not valid JSON ({err}); re-run the build to write it again") from err
    if not isinstance(report, dict) or not isinstance(report.get("artifacts"), list):
        raise TlcompileError(
            f"{path}: not a tlcompile report (no 'artifacts' list); give the report.json a build wrote"
        )
    return report


def write_reports(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write report.md and report.html beside report.json (atomically); returns their paths."""
    from tlcompile.io import atomic_write_text
    from tlcompile.report.html import render_html

    out_dir = Path(out_dir)
    paths = [out_dir / "report.md", out_dir / "report.html"]
    atomic_write_text(paths[0], render_markdown(report))
    atomic_write_text(paths[1], render_html(report, out_dir))
    return paths
