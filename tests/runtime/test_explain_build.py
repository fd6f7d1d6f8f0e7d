"""The build's explain stage (build/stages/explain.py) and the report's heatmap section, on the shared tiny build."""

from __future__ import annotations

import json

from tlcompile.report.schema import validate_report
from tlcompile.runtime import explain


def test_build_reports_heatmaps_and_the_pointing_game(tiny_build):
    out = tiny_build.out_dir
    report = json.loads((out / "report.json").read_text())
    validate_report(report)
    ex = report["explain"]
    assert ex["method"] == explain.DEFAULT_METHOD and ex["runtime"] in ("openvino", "onnxruntime")
    assert ex["latency_ms"]["n"] >= len(ex["examples"]) > 0 and ex["latency_ms"]["median"] > 0
    grades = [e["grade"] for e in ex["examples"]]
    assert grades == sorted(grades) and max(grades.count(g) for g in set(grades)) <= 2  # a few per grade
    for e in ex["examples"]:
        assert explain.is_ours(out / e["file"])
    assert explain.is_ours(out / ex["sheet"])
    game = ex["pointing_game"]  # synthetic data: played on the referable test images
    assert game["n"] > 0 and 0.0 <= game["hit_rate"]["value"] <= 1.0 and 0.0 < game["chance"]["value"] < 1.0
    assert "explain" in report["stage_seconds"]
    md = (out / "report.md").read_text()
    assert "## Heatmaps" in md and "uniformly at random (chance)" in md and f"]({ex['sheet']})" in md
    html = (out / "report.html").read_text()
    assert '<section id="explain">' in html and html.count("data:image/png;base64,") >= 2
    assert "![heatmaps" not in html  # the markdown image is a figure in the HTML


def test_heatmap_section_without_lesion_positions_or_bundle():
    from tlcompile.report.sections import report_sections

    no_lesions = {
        "method": "rise",
        "method_detail": "RISE",
        "candidate": "fp32@openvino",
        "runtime": "openvino",
        "threads": 2,
        "latency_ms": {"median": 300.0, "p90": 320.0, "n": 4},
        "examples": [],
        "sheet": None,
        "pointing_game": None,
        "pointing_note": "not played: no lesion positions for these images",
    }
    for record, words in (
        (no_lesions, "Pointing game not played"),
        ({"skipped": "no bundle was made: nothing deployed to explain"}, "Skipped: no bundle"),
    ):
        sections = {s.id: s for s in report_sections({"explain": record})}
        assert any(words in p for p in sections["explain"].paragraphs)
