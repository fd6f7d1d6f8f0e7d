"""The build's explain stage (build/stages/explain.py) and the report's heatmap section, on the shared tiny build."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

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
    _check_pointing_game_and_examples(tiny_build, ex)
    assert "explain" in report["stage_seconds"]
    md = (out / "report.md").read_text()
    assert "## Heatmaps" in md and "uniformly at random (chance)" in md and f"]({ex['sheet']})" in md
    html = (out / "report.html").read_text()
    assert '<section id="explain">' in html and html.count("data:image/png;base64,") >= 2
    assert "![heatmaps" not in html  # the markdown image is a figure in the HTML


def _check_pointing_game_and_examples(tiny_build, ex):
    """The report's explain record against the build's own data, re-read: the pointing game's counts and rates agree
    with each other, and its n and chance are those of the lesion maps the generator paints for the first referable
    test images; two examples per grade, each an overlay PNG that decodes at the size of its input; times positive."""
    from tlcompile.data import synthetic
    from tlcompile.data.datamodule import load_data
    from tlcompile.runtime.bundle import load_bundle
    from tlcompile.runtime.preprocess import to_input

    out, recipe = tiny_build.out_dir, tiny_build.recipe
    game = ex["pointing_game"]  # synthetic data: played on the referable test images
    hit, centre = game["hit_rate"], game["centre"]
    assert game["n"] == hit["n"] == centre["n"] > 0 and 0 <= hit["k"] <= hit["n"] and 0 <= centre["k"] <= centre["n"]
    for rate in (hit, centre):
        assert rate["value"] == pytest.approx(rate["k"] / rate["n"])
        assert 0.0 <= rate["ci"][0] <= rate["value"] <= rate["ci"][1] <= 1.0
    chance = game["chance"]
    assert 0.0 <= chance["ci"][0] <= chance["value"] <= chance["ci"][1] <= 1.0

    dm = load_data(recipe.data, seed=recipe.seed)
    spec, size = dm.spec, dm.spec.size
    assert game["input_size"] == size and game["tolerance_px"] == pytest.approx(explain.tolerance_px(size), abs=1e-3)
    test = [i for i in np.flatnonzero(dm.split == "test") if dm.fov_found.size == 0 or dm.fov_found[i]]
    referable = [i for i in test if dm.grades[i] >= 2][: recipe.bundle.explain_images]
    chances = []
    for i in referable:
        raw, grade, opacity = synthetic.draw_with_lesions(
            int(dm.ids[i].rsplit("_", 1)[1]),
            seed=recipe.seed,
            size=int(round(recipe.data.image_size * 1.25)),
            difficulty=synthetic.DEFAULT_DIFFICULTY if recipe.data.difficulty is None else recipe.data.difficulty,
            style=recipe.data.style,
        )
        assert grade == dm.grades[i]
        lesions = explain.to_network_frame(opacity, raw, spec)
        field = explain.field_mask(explain.to_crop(to_input(dm.image(i), spec), spec), spec)
        case = explain.pointing_case(np.zeros((size, size), np.float32), lesions, field, explain.tolerance_px(size))
        if case is not None:
            chances.append(case.chance)
    assert len(chances) == game["n"] and chance["value"] == pytest.approx(float(np.mean(chances)), rel=1e-9)

    bundle = load_bundle(tiny_build.bundle)
    threshold = bundle.candidate(bundle.default_candidate).threshold
    by_grade = {g: [ex_["id"] for ex_ in ex["examples"] if ex_["grade"] == g] for g in range(5)}
    for g, ids in by_grade.items():
        assert len(ids) == min(2, sum(dm.grades[i] == g for i in test)), (g, ids)
    for e in ex["examples"]:
        with Image.open(out / e["file"]) as img:
            img.load()
            assert img.format == "PNG" and img.width == 2 * 2 * size + 4
        assert e["refer"] == (e["referable_dr_probability"] >= threshold)
    shown = {e["id"] for e in ex["examples"]}
    latency = ex["latency_ms"]
    assert latency["n"] == len(shown | {dm.ids[i] for i in referable})
    assert 0 < latency["median"] <= latency["p90"]


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
