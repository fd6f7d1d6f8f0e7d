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
import math
import re
from pathlib import Path
from typing import Any

from tlcompile.errors import missing_dependency
from tlcompile.report.explain import explain_figures
from tlcompile.report.format import GUARD_FAILED, GUARD_MET, guard_cell
from tlcompile.report.sections import (
    ReportSection,
    ReportTable,
    Verdict,
    fake_quant,
    pareto_rows,
    report_sections,
    verdict,
)

# One colour per artifact (every plot), one marker per runtime (latency plot).
ARTIFACT_COLORS = {"fp32": "#1f77b4", "pruned": "#2ca02c", "int8": "#d62728", "pruned-int8": "#9467bd"}
RUNTIME_MARKERS = {"openvino": "o", "onnxruntime": "s", "torch": "^"}
ARTIFACT_OP_MARKERS = ("o", "s", "D", "^", "v", "P", "X", "h")
OTHER_MARKERS = ("v", "P", "X", "h", "<", ">")
OTHER_COLORS = ("#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
LINE_STYLES = ("-", "--", ":", "-.")

CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#1b1f24;margin:0;\
background:#f6f7f9}
main{max-width:1240px;margin:0 auto;padding:20px 28px 60px;background:#fff;box-sizing:border-box}
h1{font-size:24px;margin:0 0 4px}h2{font-size:20px;margin:36px 0 8px;padding-top:8px;border-top:1px solid #dde1e6}
.meta{color:#57606a;font-size:13px}nav{margin:10px 0 4px;font-size:13px;line-height:1.9}
nav a{color:#0b5cad;text-decoration:none;margin-right:14px;white-space:nowrap}
.banner{margin:12px 0;padding:10px 14px;border-radius:6px;font-size:14px;border:2px solid #d4a72c;background:#fff8c5}
.banner.bad{border-color:#b42318;background:#fdecea}
.verdict{margin:10px 0 4px;padding:8px 16px 10px;border:2px solid #0b5cad;border-radius:6px;background:#f3f8ff}
.verdict h2{margin:4px 0 6px;padding:0;border:0;font-size:19px}
.verdict dl{display:grid;grid-template-columns:minmax(9em,max-content) 1fr;gap:3px 14px;margin:0;font-size:14px}
.verdict dt{font-weight:600}.verdict dd{margin:0}
.verdict .warn{color:#7d4e00}.verdict .bad{color:#b42318}.verdict dt.bad::before{content:"✖ "}\
.verdict dt.warn::before{content:"⚠ "}
table{border-collapse:collapse;margin:10px 0 6px;font-size:13px;font-variant-numeric:tabular-nums;max-width:100%}
th,td{border:1px solid #d0d7de;padding:4px 7px;text-align:right;vertical-align:top}
td{white-space:nowrap}th{white-space:normal}
th{background:#eef1f4;text-align:center}td:first-child,td:nth-child(2){text-align:left;white-space:nowrap}
td.text{text-align:left;min-width:14em;white-space:normal;overflow-wrap:break-word}
tr:nth-child(even) td{background:#fafbfc}.scroll{overflow-x:auto}
td.pass{color:#116329;font-weight:600}td.fail,td.flag{color:#b42318;font-weight:600}
caption{caption-side:top;text-align:left;font-weight:600;padding:4px 0}
figure{margin:14px 0}figure img{max-width:100%;height:auto;border:1px solid #e5e8eb}
figcaption{font-size:13px;color:#57606a}details{margin:8px 0}summary{cursor:pointer;color:#0b5cad}
code{background:#eef1f4;padding:1px 4px;border-radius:3px}
@page{size:A4 landscape;margin:10mm}
@media print{
body{background:#fff;font-size:11px}main{max-width:none;padding:0}nav{display:none}
.scroll{overflow:visible}table{font-size:8.5px;width:100%;page-break-inside:auto}th,td{padding:2px 3px}
tr,figure,.banner{break-inside:avoid}h2{break-after:avoid}details>*{display:block}
.verdict dl{display:block}.verdict dd{margin:0 0 4px 1.5em}
td,td:first-child,td:nth-child(2){white-space:normal}
}
"""


# -------------------------------------------------------------------------------------------- plots
PLOT_DPI = 110


def _figure(width: float, height: float):
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise missing_dependency("matplotlib", "train", err) from err
    return Figure(figsize=(width, height), dpi=PLOT_DPI, layout="constrained")


def _png(fig) -> str:
    """The figure as a base64 PNG, drawn once. ``savefig`` draws a figure with a layout engine twice (a pass for the
    layout, then the picture); one Agg draw runs the constrained layout itself and gives the same pixels (checked on
    every plot of the tiny and quickstart reports): a report renders 13-23% faster (2-core AVX-512 AMD EPYC)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    buf = io.BytesIO()
    Image.fromarray(np.asarray(canvas.buffer_rgba())).save(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _styles(rows: list[dict[str, Any]]) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """Stable colour per artifact, marker per runtime and line style per runtime, so every plot reads the same way."""
    names = list(dict.fromkeys(r["name"] for r in rows))
    runtimes = list(dict.fromkeys(r["runtime"] for r in rows))
    others = iter(OTHER_COLORS * 4)
    colors = {n: ARTIFACT_COLORS.get(n) or next(others) for n in names}
    other_markers = iter(OTHER_MARKERS * 4)
    markers = {rt: RUNTIME_MARKERS.get(rt) or next(other_markers) for rt in runtimes}
    lines = {rt: LINE_STYLES[i % len(LINE_STYLES)] for i, rt in enumerate(runtimes)}
    return colors, markers, lines


def _style_legend(ax, colors: dict[str, str], markers: dict[str, str], extra=(), **kwargs) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker="s", color=c, linestyle="", markersize=9, label=n) for n, c in colors.items()]
    handles += [Line2D([], [], marker=m, color="#444", linestyle="", label=rt) for rt, m in markers.items()]
    ax.legend(handles=handles + list(extra), fontsize=8, **kwargs)


def shipped_id(report: dict[str, Any]) -> str | None:
    b = report.get("bundle") or {}
    return b.get("default_candidate") or ((b.get("selection") or {}).get("chosen_id"))


def _front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both (lower x, higher y), sorted by x."""
    return sorted(
        p
        for p in points
        if not any(q != p and q[0] <= p[0] and q[1] >= p[1] and (q[0] < p[0] or q[1] > p[1]) for q in points)
    )


def plot_accuracy_latency(report: dict[str, Any]) -> str | None:
    """Two panels against p50: AUC and sensitivity at the locked threshold. Torch fake-quant rows are left out, rows
    that failed the guard are grey and never on the front, the shipped candidate is a star."""
    from matplotlib.lines import Line2D

    rows = [
        r
        for r in pareto_rows(report)
        if not fake_quant(r)
        and (r.get("metrics") or {}).get("auc") is not None
        and (r.get("latency_ms") or {}).get("p50") is not None
    ]
    if not rows:
        return None
    colors, markers, _ = _styles(rows)
    shipped = shipped_id(report)
    fig = _figure(11.5, 4.6)
    axes = fig.subplots(1, 2)
    panels = (
        ("auc", "referable-DR AUC (test, 95% CI)", False),
        ("sensitivity", "sensitivity at the locked threshold (test, 95% CI)", True),
    )
    for ax, (metric, label, percent) in zip(axes, panels, strict=True):
        ok = []
        for r in rows:
            c = r.get("clinical") or {}
            value = (c.get(metric) or {}).get("value", r["metrics"].get(metric))
            if value is None:
                continue
            ci = (c.get(metric) or {}).get("ci")
            scale = 100 if percent else 1
            y = scale * value
            # A percentile bootstrap CI need not contain the point estimate on a tiny test split: clamp the bars at 0.
            yerr = [[max(0.0, y - scale * ci[0])], [max(0.0, scale * ci[1] - y)]] if ci else None
            failed = guard_cell(r) == GUARD_FAILED
            color = "#b0b0b0" if failed else colors[r["name"]]
            lat = r["latency_ms"]["p50"]
            ax.errorbar(
                [lat],
                [y],
                yerr=yerr,
                marker=markers[r["runtime"]],
                color=color,
                markersize=7,
                capsize=3,
                linestyle="",
                alpha=0.6 if failed else 1.0,
                zorder=2,
            )
            if f"{r['name']}@{r['runtime']}" == shipped:
                ax.plot(
                    [lat],
                    [y],
                    marker="*",
                    markersize=22,
                    markerfacecolor="none",
                    markeredgecolor="black",
                    markeredgewidth=1.6,
                    linestyle="",
                    zorder=3,
                )
                ax.annotate("shipped", (lat, y), textcoords="offset points", xytext=(10, 8), fontsize=8)
            if not failed:
                ok.append((lat, y))
        front = _front(ok)
        if front:
            ax.plot(
                [p[0] for p in front],
                [p[1] for p in front],
                color="black",
                linewidth=1.0,
                linestyle="--",
                drawstyle="steps-post",
                zorder=1,
            )
        latencies = [r["latency_ms"]["p50"] for r in rows]
        if min(latencies) > 0 and max(latencies) / min(latencies) > 20:
            ax.set_xscale("log")
        ax.set_xlabel("latency p50, batch 1 (ms)")
        ax.set_ylabel(label if not percent else label.replace("sensitivity", "sensitivity %"))
        ax.grid(alpha=0.3)
    axes[0].set_title("AUC vs latency", fontsize=10)
    axes[1].set_title("sensitivity at the locked threshold vs latency", fontsize=10)
    extra = [
        Line2D([], [], color="black", linestyle="--", label="Pareto front"),
        Line2D(
            [],
            [],
            marker="*",
            markersize=12,
            markerfacecolor="none",
            markeredgecolor="black",
            linestyle="",
            label="shipped",
        ),
        Line2D([], [], marker="o", color="#b0b0b0", linestyle="", label=f"guard {GUARD_FAILED}"),
    ]
    _style_legend(axes[1], colors, markers, extra, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _png(fig)


def _by_runtime(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(r["runtime"], []).append(r)
    return out


ROC_MAX_FPR = 0.2


def plot_roc(report: dict[str, Any]) -> str | None:
    """ROC per runtime, zoomed to FPR <= 0.2 where screening operates; one colour per artifact; the operating point of
    each artifact as a large hollow marker of its own shape, so coinciding points stay visible."""
    rows = [r for r in report.get("artifacts", []) if r.get("clinical") and not fake_quant(r)]
    if not rows:
        return None
    colors, _, _ = _styles(rows)
    op_markers = {n: ARTIFACT_OP_MARKERS[i % len(ARTIFACT_OP_MARKERS)] for i, n in enumerate(colors)}
    groups = _by_runtime(rows)
    # Zoomed to where screening operates, but never so far that an operating point falls outside.
    fprs = [
        1 - r["clinical"]["specificity"]["value"] for r in rows if r["clinical"]["specificity"]["value"] is not None
    ]
    x_max = min(1.0, max([ROC_MAX_FPR, *(math.ceil((f + 0.03) * 20) / 20 for f in fprs)]))
    fig = _figure(4.3 * len(groups) + 0.6, 4.6)
    axes = fig.subplots(1, len(groups), squeeze=False, sharey=True)[0]
    ymin = 1.0
    for ax, (runtime, group) in zip(axes, groups.items(), strict=True):
        for k, r in enumerate(group):
            c = r["clinical"]
            fpr, tpr = c["roc"]["fpr"], c["roc"]["tpr"]
            ax.plot(
                fpr,
                tpr,
                color=colors[r["name"]],
                linewidth=1.5,
                drawstyle="steps-post",
                label=f"{r['name']} AUC {c['auc']['value']:.3f}" if c["auc"]["value"] is not None else r["name"],
            )
            sens, spec = c["sensitivity"]["value"], c["specificity"]["value"]
            if sens is not None and spec is not None:
                ymin = min(ymin, sens)
                ax.plot(
                    [1 - spec],
                    [sens],
                    marker=op_markers[r["name"]],
                    markersize=11 + 3 * (len(group) - 1 - k),
                    markerfacecolor="none",
                    markeredgecolor=colors[r["name"]],
                    markeredgewidth=2,
                    linestyle="",
                    zorder=3,
                    label=f"  point: sens {100 * sens:.1f}%, spec {100 * spec:.1f}%",
                )
        ax.set_title(runtime)
        ax.set_xlabel("1 - specificity (false-positive rate)")
        ax.set_xlim(-0.005, x_max)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right", markerscale=0.6)
    axes[0].set_ylim(max(0.0, min(ymin - 0.25, 0.75)), 1.005)
    axes[0].set_ylabel("sensitivity")
    fig.suptitle(
        f"ROC of referable DR, zoomed to FPR <= {x_max:g}; hollow markers: the operating point "
        f"(threshold {report.get('operating_point', {}).get('threshold', float('nan')):.3f})",
        fontsize=10,
    )
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
            share = [
                [v / t for v in line] for line, t in zip(matrix, totals, strict=True)
            ]  # row-normalised: recall of each true class
            ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
            for a, line in enumerate(matrix):
                for b, v in enumerate(line):
                    ax.text(
                        b,
                        a,
                        str(v),
                        ha="center",
                        va="center",
                        fontsize=9,
                        color="white" if share[a][b] > 0.6 else "black",
                    )
            ax.set_xticks(range(len(labels)), labels, fontsize=7, rotation=30 if grading else 0)
            ax.set_yticks(range(len(labels)), labels, fontsize=7)
            ax.set_title(f"{name} / {runtime}", fontsize=9)
            ax.set_xlabel("predicted grade" if grading else "decision", fontsize=8)
            if j == 0:
                ax.set_ylabel("truth", fontsize=8)
    return _png(fig)


def plot_calibration(report: dict[str, Any]) -> str | None:
    """Reliability, one panel per artifact (its runtimes differ by rounding only, so they share the panel in one colour
    and different line styles), above the number of test images in each bin."""
    rows = [r for r in report.get("artifacts", []) if r.get("clinical") and not fake_quant(r)]
    if not rows:
        return None
    colors, _, lines = _styles(rows)
    by_name: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_name.setdefault(r["name"], []).append(r)
    fig = _figure(3.3 * len(by_name) + 0.6, 5.6)
    axes = fig.subplots(2, len(by_name), squeeze=False, sharex=True, sharey="row", height_ratios=[3, 1.2])
    for j, (name, group) in enumerate(by_name.items()):
        ax, bars = axes[0][j], axes[1][j]
        ax.plot([0, 1], [0, 1], color="#bbb", linewidth=0.8)
        for r in group:
            cal = r["clinical"]["calibration"]
            used = [b for b in cal["bins"] if b["n"]]
            ax.plot(
                [b["mean_predicted"] for b in used],
                [b["observed"] for b in used],
                marker="o",
                markersize=4,
                color=colors[name],
                linestyle=lines[r["runtime"]],
                linewidth=1.2,
                alpha=0.85,
                label=f"{r['runtime']} ECE {cal['ece']:.3f}",
            )
        bins = group[0]["clinical"]["calibration"]["bins"]
        bars.bar(
            [(b["lo"] + b["hi"]) / 2 for b in bins], [b["n"] for b in bins], width=0.08, color=colors[name], alpha=0.8
        )
        for b in bins:
            bars.annotate(
                str(b["n"]),
                ((b["lo"] + b["hi"]) / 2, b["n"]),
                textcoords="offset points",
                xytext=(0, 1),
                ha="center",
                fontsize=7,
            )
        ax.set_title(name)
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
        bars.set_yscale("symlog", linthresh=10)
        bars.set_xlabel("mean predicted P(referable)", fontsize=8)
        bars.margins(y=0.35)
        bars.grid(axis="y", alpha=0.3)
        bars.set_title(f"test images per bin ({group[0]['runtime']})", fontsize=8)
    axes[0][0].set_ylabel("observed referable rate")
    axes[1][0].set_ylabel("images")
    fig.suptitle("Reliability of P(referable DR) on the test split", fontsize=10)
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
    (
        "summary",
        plot_accuracy_latency,
        "AUC (left) and sensitivity at the locked threshold (right) against batch-1 latency; colour: artifact, "
        "marker: runtime; the star is the shipped candidate; grey: failed the accuracy guard (never on the front); "
        "torch fake-quant rows are left out. Latency from the bench stage; the verdict quotes the bundle's "
        "interleaved re-measurement, which can differ on a busy box.",
    ),
    (
        "screening",
        plot_roc,
        "ROC curves per runtime, zoomed to a false-positive rate of 0.2 (further only to keep every operating "
        "point in view); the hollow marker is "
        "each artifact's operating point at the locked threshold.",
    ),
    ("confusion", plot_confusion, "Counts; colour is the share of each true class (row)."),
    (
        "calibration",
        plot_calibration,
        "Reliability: observed referable rate against mean predicted probability per bin; "
        "below, the number of test images in each bin (few images: a noisy point).",
    ),
    ("training", plot_training, "Training loss and validation AUC per epoch."),
    ("stages", plot_stage_seconds, "Wall-clock time per build stage."),
)


# -------------------------------------------------------------------------------------------- html
def _inline(text: str) -> str:
    """Escape, then allow the two bits of markdown the sections use: **bold** and `code`."""
    out = html.escape(text)
    out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", out)


def _cell_class(text: str, header: str = "") -> str:
    """Verdicts stand out: PASS / met (the accuracy guard) in green, FAIL / failed (also at the end of a guard cell) and
    test-split flags in red; long text cells wrap left-aligned."""
    if text.startswith("FAIL") or text == GUARD_FAILED or text.endswith(f" {GUARD_FAILED}"):
        return ' class="fail"'
    if header.startswith("flags") and text not in ("", "-"):
        return ' class="flag"'
    if text.startswith("PASS") or text == GUARD_MET:
        return ' class="pass"'
    return ' class="text"' if len(text) > 60 else ""


def _cell_html(text: str) -> str:
    """Escaped; a number cell may break only before its interval and after a comma: ``0.982<wbr> (0.967–0.994)``."""
    return html.escape(text).replace(" (", "<wbr> (").replace(", ", ",<wbr> ")


def _table(table: ReportTable) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.header)
    body = "".join(
        "<tr>"
        + "".join(f"<td{_cell_class(c, h)}>{_cell_html(c)}</td>" for c, h in zip(row, table.header, strict=False))
        + "</tr>"
        for row in table.rows
    )
    caption = f"<caption>{html.escape(table.caption)}</caption>" if table.caption else ""
    return f'<div class="scroll"><table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _section(section: ReportSection, figures: list[tuple[str, str]]) -> str:
    parts = [f'<section id="{section.id}"><h2>{html.escape(section.title)}</h2>']
    # A markdown image (report.md's link to a picture in the build folder) is embedded here as a figure instead.
    parts += [f"<p>{_inline(p)}</p>" for p in section.paragraphs if not p.startswith("![")]
    tables = [_table(t) for t in section.tables]
    # With a plot drawn from them, the per-artifact confusion tables fold away: the plot is what a reader scans.
    if figures and section.id == "confusion" and tables:
        parts.append(f"<details><summary>the same matrices as tables</summary>{''.join(tables)}</details>")
    else:
        parts += tables
    for caption, png in figures:
        parts.append(
            f'<figure><img alt="{html.escape(section.title)}" src="data:image/png;base64,{png}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )
    parts.append("</section>")
    return "\n".join(parts)


def _verdict_html(v: Verdict) -> str:
    """The intended-use banner and the verdict box, above the contents."""
    items = "".join(
        f'<dt class="{i.level}">{_inline(i.label)}</dt><dd class="{i.level}">{_inline(i.text)}</dd>' for i in v.items
    )
    return (
        f'<div class="banner {v.banner_level}" role="note" id="intended-use">{_inline(v.banner)}</div>\n'
        f'<section id="verdict" class="verdict"><h2>Verdict</h2><dl>{items}</dl></section>'
    )


def render_html(report: dict[str, Any], build_dir: Path | None = None) -> str:
    """The whole report as one HTML document with inline CSS and inline PNG plots (and, given the build folder, the
    heatmap contact sheet the explain stage wrote there)."""
    sections = report_sections(report)
    figures: dict[str, list[tuple[str, str]]] = {}
    for section_id, plot, caption in PLOTS:
        png = plot(report)
        if png is not None:
            figures.setdefault(section_id, []).append((caption, png))
    figures.setdefault("explain", []).extend(explain_figures(report, build_dir))
    name = html.escape(str(report.get("name", "build")))
    nav = "\n".join(f'<a href="#{s.id}">{html.escape(s.title)}</a>' for s in sections)  # whitespace lets the links wrap
    meta = (
        f"Created {html.escape(str(report.get('created', '-')))} with tlcompile "
        f"{html.escape(str(report.get('tlcompile_version', '-')))}; recipe sha256 "
        f"<code>{html.escape(str(report.get('recipe_sha256', ''))[:16])}</code>"
    )
    body = "\n".join(_section(s, figures.get(s.id, [])) for s in sections)
    top = _verdict_html(verdict(report))
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>tlcompile build: {name}</title><style>{CSS}</style></head>\n"
        f'<body><main><h1>tlcompile build: {name}</h1><div class="meta">{meta}</div>\n'
        f"{top}\n<nav>{nav}</nav>\n{body}\n</main></body></html>\n"
    )
