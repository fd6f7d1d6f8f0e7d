"""The report's heatmap section: what the shipped model looked at on a few test images per grade, how faithful that is
(the pointing game against the synthetic lesions, with its chance and field-centre baselines) and what it costs per
image on the build's CPU. Everything comes from ``report["explain"]``; the pictures are the PNGs the explain stage wrote
into the build folder (report.md links them, report.html embeds the contact sheet)."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from tlcompile.report.format import with_ci
from tlcompile.runtime.terminal import num

# (header, rows, caption): report.sections makes a ReportTable of each (this module does not import sections, which
# imports it).
Table = tuple[list[str], list[list[str]], str]


def _rate(p: dict[str, Any] | None) -> str:
    if not p or p.get("value") is None:
        return "-"
    return with_ci(p, percent=True) + (f", {p['k']} of {p['n']}" if "k" in p else "")


def explain_section(report: dict[str, Any]) -> tuple[str, str, list[str], list[Table]] | None:
    """(id, title, paragraphs, tables) of the heatmap section; None when the build has no explain record."""
    ex = report.get("explain")
    if not ex:
        return None
    if "skipped" in ex:
        return "explain", "Heatmaps", [f"Skipped: {ex['skipped']}."], []
    ms = ex["latency_ms"]
    paragraphs = [
        f"Where the shipped model ({ex['candidate']}, {ex['threads']} threads) looked: {ex['method_detail']}. The same "
        "method `tlcompile predict --explain` and `serve --explain` run on the clinic's box, on the deployed runtime "
        f"without torch. Time per explained image on this CPU: median {num(ms['median'], '.0f')} ms, p90 "
        f"{num(ms['p90'], '.0f')} ms ({ms['n']} images).",
    ]
    tables: list[Table] = []
    game = ex.get("pointing_game")
    if game:
        paragraphs.append(
            f"Faithfulness, the pointing game on {game['n']} referable {game['images']} images: a hit when the "
            f"heatmap's peak lies within {num(game['tolerance_px'], '.1f')} px (at {game['input_size']} px input) of "
            "a lesion the generator painted. Chance is a peak placed uniformly at random in the field of view (the "
            "share of the field that lies near a lesion); the centre baseline puts the peak at the field's centre."
        )
        rows = [
            [f"heatmap ({ex['method']})", _rate(game["hit_rate"])],
            ["uniformly at random (chance)", _rate(game["chance"])],
            ["centre of the field", _rate(game["centre"])],
        ]
        tables.append((["peak placed by", "hit rate (95% CI)"], rows, ""))
    elif ex.get("pointing_note"):
        paragraphs.append(f"Pointing game {ex['pointing_note']}.")
    if ex["examples"]:
        rows = [
            [
                e["id"],
                str(e["grade"]),
                num(e["referable_dr_probability"], ".3f"),
                "yes" if e["refer"] else "no",
                e["file"],
            ]
            for e in ex["examples"]
        ]
        caption = "Test images shown (left: the picture the model saw; right: the heat, its peak ringed)"
        tables.append((["image", "grade", "P(referable DR)", "refer", "heatmap"], rows, caption))
    if ex.get("sheet"):
        paragraphs.append(f"![heatmaps per grade]({ex['sheet']})")
    return "explain", "Heatmaps", paragraphs, tables


def explain_figures(report: dict[str, Any], build_dir: Path | None) -> list[tuple[str, str]]:
    """The contact sheet as (caption, base64 PNG) for report.html, read from the build folder when it is there."""
    ex = report.get("explain") or {}
    if build_dir is None or not ex.get("sheet"):
        return []
    path = Path(build_dir) / ex["sheet"]
    if not path.is_file():
        return []
    caption = (
        "A few test images per grade: the picture the model saw, and the same with the heat (red: where the picture "
        "raises P(referable DR) most); the ring marks the peak."
    )
    return [(caption, base64.b64encode(path.read_bytes()).decode("ascii"))]
