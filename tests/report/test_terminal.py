"""Terminal tables never truncate a name or a number: at 80 columns they drop empty columns or go vertical."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys

import pytest
from rich.console import Console

from tlcompile.report.render import artifact_table
from tlcompile.runtime.bench import bench_table, mark_pareto
from tlcompile.runtime.terminal import fit_table


def _render(renderable, width: int) -> str:
    console = Console(width=width, file=io.StringIO(), record=True, color_system=None)
    console.print(renderable)
    return console.export_text()


def _bench_rows() -> list[dict]:
    rows = []
    for name, runtime, p50, auc in (
        ("pruned-int8", "onnxruntime", 0.6781, 0.97123),
        ("mobilenet_v3_small-int8", "openvino", 12.3456, 0.98299),
        ("fp32", "openvino", 2.8391, 0.98123),
    ):
        rows.append(
            {
                "name": name,
                "runtime": runtime,
                "exec_precision": "u8" if "int8" in name else "bf16",
                "threads": 2,
                "batch": 1,
                "latency_ms": {"p50": p50, "p90": p50 * 1.31, "p99": p50 * 2},
                "throughput_fps": 1000 / p50,
                "gmacs_per_s": 100 / p50,
                "peak_rss_mb": None,
                "metrics": {"auc": auc},
            }
        )
    mark_pareto(rows)
    return rows


def _cells(rows: list[dict]) -> list[str]:
    return [
        c
        for r in rows
        for c in (
            r["name"],
            r["runtime"],
            f"{r['latency_ms']['p50']:.2f}",
            f"{r['latency_ms']['p90']:.2f}",
            f"{r['throughput_fps']:.1f}",
            f"{r['metrics']['auc']:.3f}",
        )
    ]


@pytest.mark.parametrize("width", [200, 80, 50, 30])
def test_bench_table_shows_every_name_and_number_whole(width):
    rows = _bench_rows()
    text = _render(bench_table(rows, title="tlcompile bench on Test CPU (ISA: AVX2)"), width)
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= width
    words = set(re.split(r"[\s│┃(),]+", text))
    for cell in _cells(rows):
        assert cell in words, (cell, text)
    # Every row measured no peak RSS: the column is dropped rather than shown empty.
    assert "RSS MB" not in text
    # The report's words: artifact (not model), Pareto "front".
    assert "front" in text and "model " not in text
    assert "artifact" in text or "┃" not in text  # the vertical layout heads each block with the artifact itself


def test_narrow_terminals_get_a_compact_table_then_one_block_per_row():
    rows = _bench_rows()
    wide, compact, narrow = (_render(bench_table(rows, title="t"), w) for w in (200, 80, 40))
    assert "┃" in wide and "p50 ms" in wide.splitlines()[1] and "threads" in wide.splitlines()[1]
    # 80 columns: no vertical rules, and what every row shares (2 threads, batch 1) is said once, in the title.
    assert "┃" not in compact and "(threads 2, batch 1" in compact and "mobilenet_v3_small-int8" in compact
    assert any(
        re.search(r"mobilenet_v3_small-int8\s+openvino\s+u8\s+12\.35\s+16\.17", line) for line in compact.splitlines()
    )
    assert "┃" not in narrow and not any(re.search(r"openvino\s+u8\s+12\.35", line) for line in narrow.splitlines())
    block = narrow.split("mobilenet_v3_small-int8", 1)[1].split("fp32", 1)[0]
    assert re.search(r"p50 ms\s+12\.35", block) and re.search(r"runtime\s+openvino", block)


def test_report_terminal_table_at_80_columns(synthetic_report):
    report = synthetic_report()
    text = _render(artifact_table(report), 80)
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80
    for row in report["artifacts"]:
        assert f"{row['latency_ms']['p50']:.2f}" in text and f"{row['metrics']['auc']:.3f}" in text
    assert "reference" in text and "met" in text  # the glossary's guard words


def test_wrap_columns_wrap_and_fixed_columns_never_shrink():
    t = fit_table(
        ["model", "params", "description"],
        [["mobilenet_v3_small", "2,542,856", "a long description " * 6]],
        right=["params"],
        wrap=["description"],
    )
    text = _render(t, 60)
    assert "┃" in text and "mobilenet_v3_small" in text and "2,542,856" in text and "…" not in text


def test_bench_cli_honours_columns(monkeypatch, tmp_path):
    """`COLUMNS=80 tlcompile report merge` (which prints the bench table) fits 80 columns in a pipe, not 160."""
    results = tmp_path / "r.json"
    results.write_text(json.dumps({"runs": [{"rows": _bench_rows()}]}))
    env = {"COLUMNS": "80", "PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(p for p in sys.path if p)}
    out = subprocess.run(
        [sys.executable, "-m", "tlcompile.cli", "report", "merge", str(results)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert max(len(line) for line in out.stdout.splitlines()) <= 80 and "…" not in out.stdout
    assert "mobilenet_v3_small-int8" in out.stdout and "12.35" in out.stdout


def test_no_terminal_width_cuts_a_cell(synthetic_report):
    """Every width from 20 to 160 columns: each cell of the build table is shown whole (rich's own minimum width counts
    words even in no-wrap columns, so a table it says fits can still cut 'reference' to 'referenc')."""
    from tlcompile.report.render import TERMINAL_COLUMNS
    from tlcompile.report.sections import ROW_COLUMNS, artifact_cells

    report = synthetic_report()
    keep = [ROW_COLUMNS.index(c) for c in TERMINAL_COLUMNS]
    cells = {artifact_cells(r)[i] for r in report["artifacts"] for i in keep} - {"", "-"}
    for width in range(20, 161, 3):
        text = _render(artifact_table(report), width)
        assert max(len(line) for line in text.splitlines()) <= width, width
        words = set(re.split(r"[\s│┃(),]+", text))
        missing = [c for c in cells if c not in words]
        assert not missing, (width, missing, text)
