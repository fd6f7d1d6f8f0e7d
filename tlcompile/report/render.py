"""Render report.json: a terminal table (rich) and report.md. Nothing is computed here that is not in the report."""

from __future__ import annotations

from typing import Any

from rich.table import Table


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f}"


def _num(x: Any, fmt: str = ".3f") -> str:
    if x is None or (isinstance(x, float) and x != x):
        return "-"
    return format(x, fmt)


ROW_COLUMNS = ("artifact", "runtime", "format", "exec", "threads", "p50 ms", "p90 ms", "AUC", "sens", "spec", "acc", "MB", "MMACs", "|Δlogit|", "top-1 agree")


def artifact_cells(row: dict[str, Any]) -> list[str]:
    lat, m, par = row.get("latency_ms", {}), row.get("metrics", {}), row.get("parity", {})
    return [
        row["name"],
        row["runtime"],
        row["format"],
        str(row.get("exec_precision", "-")),
        str(row.get("threads", "-")),
        _num(lat.get("p50"), ".2f"),
        _num(lat.get("p90"), ".2f"),
        _num(m.get("auc")),
        _num(m.get("sensitivity")),
        _num(m.get("specificity")),
        _num(m.get("accuracy")),
        _mb(row.get("size_bytes")),
        _num((row.get("macs") or 0) / 1e6, ".1f"),
        _num(par.get("max_abs_diff"), ".1e") if par.get("reference") != "self" else "ref",
        _num(par.get("top1_agreement"), ".1%") if par.get("reference") != "self" else "ref",
    ]


# The terminal shows the columns a person compares first; report.md carries them all.
TERMINAL_COLUMNS = ("artifact", "runtime", "exec", "p50 ms", "p90 ms", "AUC", "sens", "spec", "MB", "|Δlogit|", "top-1 agree")


def artifact_table(report: dict[str, Any]) -> Table:
    op = report.get("operating_point", {})
    table = Table(title=f"{report.get('name', 'build')}: test split, threshold {_num(op.get('threshold'))} locked on val")
    keep = [ROW_COLUMNS.index(c) for c in TERMINAL_COLUMNS]
    for col in TERMINAL_COLUMNS:
        table.add_column(col, justify="left" if col in ("artifact", "runtime", "exec") else "right", no_wrap=True)
    for row in report.get("artifacts", []):
        cells = artifact_cells(row)
        table.add_row(*[cells[i] for i in keep])
    return table


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(report: dict[str, Any]) -> str:
    op = report.get("operating_point", {})
    env = report.get("environment", {})
    cpu = env.get("cpu", {})
    out = [f"# tlcompile build: {report.get('name')}", ""]
    out.append(f"Created {report.get('created')} with tlcompile {report.get('tlcompile_version')}; recipe sha256 `{report.get('recipe_sha256', '')[:16]}`.")
    out.append("")
    out.append(f"Task: **{report.get('task')}** ({', '.join(report.get('class_names', []))}). "
               f"Operating point: threshold {_num(op.get('threshold'))} ({op.get('method')}, locked on {op.get('locked_on')} "
               f"with the {op.get('model')} model); every artifact is judged at it on the test split.")
    out += ["", "## Artifacts", ""]
    out.append(_md_table(list(ROW_COLUMNS), [artifact_cells(r) for r in report.get("artifacts", [])]))
    counts = report.get("data", {}).get("counts", {})
    if counts:
        out += ["", "## Data", ""]
        classes = report.get("class_names", [])
        out.append(_md_table(["split", *classes], [[s, *[str(c.get(k, 0)) for k in classes]] for s, c in counts.items()]))
    training = report.get("training", {})
    if training.get("history"):
        out += ["", "## Training", "", f"Best epoch {training.get('best_epoch')} (val AUC {_num(training.get('best_val_auc'))}), {training.get('wall_s')} s.", ""]
        out.append(_md_table(["epoch", "loss", "val AUC", "lr", "s"],
                             [[str(h["epoch"]), _num(h["loss"], ".4f"), _num(h["val_auc"]), _num(h["lr"], ".2e"), _num(h["seconds"], ".1f")] for h in training["history"]]))
    if report.get("stage_seconds"):
        out += ["", "## Time per stage", ""]
        out.append(_md_table(["stage", "seconds"], [[k, _num(v, ".1f")] for k, v in report["stage_seconds"].items()]))
    if env:
        out += ["", "## Environment", ""]
        out.append(f"CPU {cpu.get('model')} ({cpu.get('usable_cores')} usable cores; ISA {', '.join(cpu.get('isa', []))}); "
                   f"Python {env.get('python')}, torch {env.get('torch')}, OpenVINO {env.get('openvino')}, ONNX Runtime {env.get('onnxruntime')}.")
    return "\n".join(out) + "\n"
