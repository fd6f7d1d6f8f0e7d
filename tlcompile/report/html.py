"""report.html: the sections of report.md plus plots, in one self-contained file.

Self-contained means it opens offline from a USB stick on a clinic PC: CSS is inline, every plot is a PNG in a
``data:`` URI, and nothing is fetched (no CDN, no fonts, no scripts). Plots are drawn with matplotlib's object API
(``Figure`` + Agg), never pyplot, so rendering touches no global state and needs no display.
Everything shown comes from report.json; nothing is re-measured.
"""

from __future__ import annotations

import base64
import html
import io
import re
from typing import Any

from tlcompile.errors import missing_dependency
from tlcompile.report.render import ReportSection, ReportTable, pareto_rows, report_sections

RUNTIME_COLORS = {"openvino": "#1f77b4", "onnxruntime": "#ff7f0e", "torch": "#2ca02c"}
ARTIFACT_MARKERS = {"fp32": "o", "pruned": "s", "int8": "^", "pruned-int8": "D"}
OTHER_MARKERS = ("v", "P", "X", "*", "h", "<", ">")
OTHER_COLORS = ("#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
LINE_STYLES = ("-", "--", ":", "-.")

CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#1b1f24;margin:0;background:#f6f7f9}
main{max-width:1240px;margin:0 auto;padding:24px 28px 60px;background:#fff}
h1{font-size:26px;margin:0 0 4px}h2{font-size:20px;margin:36px 0 8px;padding-top:8px;border-top:1px solid #dde1e6}
.meta{color:#57606a;font-size:13px}nav{margin:14px 0 4px;font-size:13px;line-height:1.9}
nav a{color:#0b5cad;text-decoration:none;margin-right:14px;white-space:nowrap}
table{border-collapse:collapse;margin:10px 0 6px;font-size:13px;font-variant-numeric:tabular-nums}
th,td{border:1px solid #d0d7de;padding:4px 8px;text-align:right;white-space:nowrap}
th{background:#eef1f4;text-align:center}td:first-child,td:nth-child(2){text-align:left}
tr:nth-child(even) td{background:#fafbfc}.scroll{overflow-x:auto}
td.pass{color:#116329;font-weight:600}td.fail{color:#b42318;font-weight:600}
caption{caption-side:top;text-align:left;font-weight:600;padding:4px 0}
figure{margin:14px 0}figure img{max-width:100%;height:auto;border:1px solid #e5e8eb}
figcaption{font-size:13px;color:#57606a}details{margin:8px 0}summary{cursor:pointer;color:#0b5cad}
code{background:#eef1f4;padding:1px 4px;border-radius:3px}
"""


# -------------------------------------------------------------------------------------------- plots
def _figure(width: float, height: float):
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise missing_dependency("matplotlib", "train", err) from err
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _styles(rows: list[dict[str, Any]]) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """Stable marker and line style per artifact name and colour per runtime, so every plot reads the same way."""
    names = list(dict.fromkeys(r["name"] for r in rows))
    runtimes = list(dict.fromkeys(r["runtime"] for r in rows))
    others = iter(OTHER_MARKERS * 4)
    markers = {n: ARTIFACT_MARKERS.get(n) or next(others) for n in names}
    lines = {n: LINE_STYLES[i % len(LINE_STYLES)] for i, n in enumerate(names)}
    other_colors = iter(OTHER_COLORS * 4)
    colors = {rt: RUNTIME_COLORS.get(rt) or next(other_colors) for rt in runtimes}
    return markers, lines, colors


def _style_legend(ax, markers: dict[str, str], colors: dict[str, str], **kwargs) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker=m, color="#444", linestyle="", label=n) for n, m in markers.items()]
    handles += [Line2D([], [], marker="s", color=c, linestyle="", markersize=9, label=rt) for rt, c in colors.items()]
    ax.legend(handles=handles, fontsize=8, **kwargs)


def plot_accuracy_latency(report: dict[str, Any]) -> str | None:
    rows = [r for r in pareto_rows(report) if r.get("pareto") is not None]
    if not rows:
        return None
    markers, _, colors = _styles(rows)
    fig = _figure(8.5, 4.8)
    ax = fig.add_subplot()
    for r in rows:
        lat, auc = r["latency_ms"]["p50"], r["metrics"]["auc"]
        ci = (r.get("clinical") or {}).get("auc", {}).get("ci")
        yerr = [[auc - ci[0]], [ci[1] - auc]] if ci else None
        ax.errorbar([lat], [auc], yerr=yerr, marker=markers[r["name"]], color=colors[r["runtime"]], markersize=8,
                    capsize=3, linestyle="", markeredgecolor="black" if r["pareto"] else colors[r["runtime"]])
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["latency_ms"]["p50"])
    if front:
        ax.plot([r["latency_ms"]["p50"] for r in front], [r["metrics"]["auc"] for r in front], color="black", linewidth=1.2,
                linestyle="--", drawstyle="steps-post", label="Pareto front", zorder=0)
    latencies = [r["latency_ms"]["p50"] for r in rows]
    if min(latencies) > 0 and max(latencies) / min(latencies) > 20:
        ax.set_xscale("log")
    ax.set_xlabel("latency p50, batch 1 (ms)")
    ax.set_ylabel("referable-DR AUC (test, 95% CI)")
    ax.set_title("Accuracy vs latency: black-edged points are on the Pareto front")
    ax.grid(alpha=0.3)
    _style_legend(ax, markers, colors, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _png(fig)


def _by_runtime(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(r["runtime"], []).append(r)
    return out


def plot_roc(report: dict[str, Any]) -> str | None:
    rows = [r for r in report.get("artifacts", []) if r.get("clinical")]
    if not rows:
        return None
    markers, lines, colors = _styles(rows)
    groups = _by_runtime(rows)
    fig = _figure(4.0 * len(groups) + 0.6, 4.3)
    axes = fig.subplots(1, len(groups), squeeze=False, sharey=True)[0]
    for ax, (runtime, group) in zip(axes, groups.items(), strict=True):
        ax.plot([0, 1], [0, 1], color="#bbb", linewidth=0.8)
        for r in group:
            c = r["clinical"]
            ax.plot(c["roc"]["fpr"], c["roc"]["tpr"], color=colors[runtime], linestyle=lines[r["name"]], linewidth=1.4,
                    label=f"{r['name']} AUC {c['auc']['value']:.3f}" if c["auc"]["value"] is not None else r["name"])
            sens, spec = c["sensitivity"]["value"], c["specificity"]["value"]
            if sens is not None and spec is not None:
                ax.plot([1 - spec], [sens], marker=markers[r["name"]], color=colors[runtime], markeredgecolor="black", markersize=8, linestyle="")
        ax.set_title(runtime)
        ax.set_xlabel("1 - specificity")
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    axes[0].set_ylabel("sensitivity")
    fig.suptitle(f"ROC of referable DR; markers: the operating point (threshold {report.get('operating_point', {}).get('threshold', float('nan')):.3f})")
    return _png(fig)


def plot_confusion(report: dict[str, Any]) -> str | None:
    rows = [r for r in report.get("artifacts", []) if r.get("clinical")]
    if not rows:
        return None
    groups = _by_runtime(rows)
    names = list(dict.fromkeys(r["name"] for r in rows))
    grading = bool(rows[0]["clinical"].get("grading"))
    labels = report.get("class_names", []) if grading else ["non-ref.", "referable"]
    side = 3.2 if grading else 2.5
    fig = _figure(side * len(groups) + 0.4, side * len(names) + 0.5)
    axes = fig.subplots(len(names), len(groups), squeeze=False)
    for j, (runtime, group) in enumerate(groups.items()):
        for i, name in enumerate(names):
            ax = axes[i][j]
            row = next((r for r in group if r["name"] == name), None)
            if row is None:
                ax.axis("off")
                continue
            c = row["clinical"]
            matrix = c["grading"]["confusion"] if grading else c["referral_confusion"]
            totals = [max(sum(line), 1) for line in matrix]
            share = [[v / t for v in line] for line, t in zip(matrix, totals, strict=True)]  # row-normalised: recall of each true class
            ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
            for a, line in enumerate(matrix):
                for b, v in enumerate(line):
                    ax.text(b, a, str(v), ha="center", va="center", fontsize=9, color="white" if share[a][b] > 0.6 else "black")
            ax.set_xticks(range(len(labels)), labels, fontsize=7, rotation=30 if grading else 0)
            ax.set_yticks(range(len(labels)), labels, fontsize=7)
            ax.set_title(f"{name} / {runtime}", fontsize=9)
            ax.set_xlabel("predicted grade" if grading else "decision", fontsize=8)
            if j == 0:
                ax.set_ylabel("truth", fontsize=8)
    return _png(fig)


def plot_calibration(report: dict[str, Any]) -> str | None:
    rows = [r for r in report.get("artifacts", []) if r.get("clinical")]
    if not rows:
        return None
    markers, lines, colors = _styles(rows)
    groups = _by_runtime(rows)
    fig = _figure(4.0 * len(groups) + 0.6, 4.3)
    axes = fig.subplots(1, len(groups), squeeze=False, sharey=True)[0]
    for ax, (runtime, group) in zip(axes, groups.items(), strict=True):
        ax.plot([0, 1], [0, 1], color="#bbb", linewidth=0.8, label="perfect")
        for r in group:
            cal = r["clinical"]["calibration"]
            used = [b for b in cal["bins"] if b["n"]]
            ax.plot([b["mean_predicted"] for b in used], [b["observed"] for b in used], marker=markers[r["name"]], color=colors[runtime],
                    linestyle=lines[r["name"]], markeredgecolor="black", linewidth=1.2, label=f"{r['name']} ECE {cal['ece']:.3f}")
        ax.set_title(runtime)
        ax.set_xlabel("mean predicted P(referable)")
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    axes[0].set_ylabel("observed referable rate")
    fig.suptitle("Reliability of P(referable DR) on the test split (bins with images)")
    return _png(fig)


def plot_stage_seconds(report: dict[str, Any]) -> str | None:
    seconds = report.get("stage_seconds", {})
    if not seconds:
        return None
    fig = _figure(7.5, 0.45 * len(seconds) + 1.0)
    ax = fig.add_subplot()
    names = list(seconds)[::-1]
    ax.barh(names, [seconds[n] for n in names], color="#1f77b4")
    for i, n in enumerate(names):
        ax.text(seconds[n], i, f" {seconds[n]:.1f} s", va="center", fontsize=8)
    ax.set_xlabel("seconds")
    ax.margins(x=0.15)
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def plot_training(report: dict[str, Any]) -> str | None:
    history = report.get("training", {}).get("history") or []
    if len(history) < 2:
        return None
    from matplotlib.ticker import MaxNLocator

    fig = _figure(7.5, 3.2)
    ax = fig.add_subplot()
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["loss"] for h in history], marker="o", color="#d62728", label="train loss")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("train loss")
    twin = ax.twinx()
    twin.plot(epochs, [h["val_auc"] for h in history], marker="s", color="#1f77b4", label="val AUC")
    twin.set_ylabel("val AUC")
    ax.grid(alpha=0.3)
    fig.legend(fontsize=8, loc="outside right upper")
    return _png(fig)


# (section id, plotting function, caption): where each plot goes.
PLOTS = (
    ("summary", plot_accuracy_latency, "Referable-DR AUC against batch-1 latency for every artifact and runtime."),
    ("screening", plot_roc, "ROC curves per runtime; the marker is each artifact's operating point at the locked threshold."),
    ("confusion", plot_confusion, "Counts; colour is the share of each true class (row)."),
    ("calibration", plot_calibration, "Reliability: observed referable rate against mean predicted probability per bin."),
    ("training", plot_training, "Training loss and validation AUC per epoch."),
    ("stages", plot_stage_seconds, "Wall-clock time per build stage."),
)


# -------------------------------------------------------------------------------------------- html
def _inline(text: str) -> str:
    """Escape, then allow the two bits of markdown the sections use: **bold** and `code`."""
    out = html.escape(text)
    out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", out)


def _cell_class(text: str) -> str:
    """Verdicts stand out: PASS / met (the accuracy guard) in green, FAIL / FAILED (also at the end of a guard cell) in red."""
    if text.startswith("FAIL") or text.endswith(" FAILED"):
        return ' class="fail"'
    return ' class="pass"' if text.startswith("PASS") or text == "met" else ""


def _table(table: ReportTable) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.header)
    body = "".join("<tr>" + "".join(f"<td{_cell_class(c)}>{html.escape(c)}</td>" for c in row) + "</tr>" for row in table.rows)
    caption = f"<caption>{html.escape(table.caption)}</caption>" if table.caption else ""
    return f'<div class="scroll"><table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _section(section: ReportSection, figures: list[tuple[str, str]]) -> str:
    parts = [f'<section id="{section.id}"><h2>{html.escape(section.title)}</h2>']
    parts += [f"<p>{_inline(p)}</p>" for p in section.paragraphs]
    tables = [_table(t) for t in section.tables]
    # With a plot drawn from them, the per-artifact confusion tables fold away: the plot is what a reader scans.
    if figures and section.id == "confusion" and tables:
        parts.append(f"<details><summary>the same matrices as tables</summary>{''.join(tables)}</details>")
    else:
        parts += tables
    for caption, png in figures:
        parts.append(f'<figure><img alt="{html.escape(section.title)}" src="data:image/png;base64,{png}">'
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    parts.append("</section>")
    return "\n".join(parts)


def render_html(report: dict[str, Any]) -> str:
    """The whole report as one HTML document with inline CSS and inline PNG plots."""
    sections = report_sections(report)
    figures: dict[str, list[tuple[str, str]]] = {}
    for section_id, plot, caption in PLOTS:
        png = plot(report)
        if png is not None:
            figures.setdefault(section_id, []).append((caption, png))
    name = html.escape(str(report.get("name", "build")))
    nav = "\n".join(f'<a href="#{s.id}">{html.escape(s.title)}</a>' for s in sections)  # whitespace lets the links wrap
    meta = (f"Created {html.escape(str(report.get('created', '-')))} with tlcompile {html.escape(str(report.get('tlcompile_version', '-')))}; "
            f"recipe sha256 <code>{html.escape(str(report.get('recipe_sha256', ''))[:16])}</code>")
    body = "\n".join(_section(s, figures.get(s.id, [])) for s in sections)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>tlcompile build: {name}</title><style>{CSS}</style></head>\n"
        f"<body><main><h1>tlcompile build: {name}</h1><div class=\"meta\">{meta}</div><nav>{nav}</nav>\n{body}\n</main></body></html>\n"
    )
