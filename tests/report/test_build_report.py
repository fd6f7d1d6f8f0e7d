"""A tiny build: clinical metrics land in report.json, are reproducible from the saved logits, and the reports
render."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from tlcompile.evaluate.clinical import clinical_evaluation


def test_operating_point_and_evaluation_settings_are_recorded(tiny_build):
    out, report = tiny_build
    op = report["operating_point"]
    assert op["method"] == "sensitivity" and op["target_sensitivity"] == 0.8
    assert op["locked_on"] == "val" and op["model"] == "fp32"
    assert op["val"]["sensitivity"] >= 0.8  # the threshold reaches the target on val by construction
    assert 0.05 <= op["temperature"] <= 20 and op["val"]["nll_after"] <= op["val"]["nll_before"] + 1e-12
    ev = report["evaluation"]
    assert ev["bootstrap_resamples"] == 200 and ev["bootstrap_seed"] == 3 and ev["ci_level"] == 0.95
    assert ev["endpoints"] == {
        "min_sensitivity": None,
        "min_specificity": 0.01,
        "min_auc": None,
        "rule": "point_estimate",
    }
    assert json.loads((out / "report.json").read_text())["operating_point"] == op


def test_every_row_has_clinical_metrics_reproducible_from_saved_logits(tiny_build):
    out, report = tiny_build
    op, ev = report["operating_point"], report["evaluation"]
    targets = np.load(out / ev["test_targets_path"])
    assert [(r["name"], r["runtime"]) for r in report["artifacts"]] == [("fp32", "onnxruntime"), ("fp32", "torch")]
    for row in report["artifacts"]:
        clinical = row["clinical"]
        logits = np.load(out / row["logits_path"])
        assert logits.shape == (targets.size, 2) and clinical["n"] == targets.size
        again = clinical_evaluation(
            logits,
            targets,
            threshold=op["threshold"],
            temperature=op["temperature"],
            resamples=ev["bootstrap_resamples"],
            seed=ev["bootstrap_seed"],
            calibration_bins=ev["calibration_bins"],
        )
        for key in (
            "auc",
            "sensitivity",
            "specificity",
            "ppv",
            "npv",
            "referral_confusion",
            "calibration",
            "calibration_unscaled",
        ):
            assert clinical[key] == json.loads(json.dumps(again[key])), key
        # The contract's metrics and the clinical block judge the same threshold and temperature.
        assert row["metrics"]["sensitivity"] == pytest.approx(clinical["sensitivity"]["value"])
        assert row["metrics"]["threshold"] == op["threshold"]
        assert clinical["endpoints"]["checks"]["min_specificity"]["target"] == 0.01
        assert "vs_reference" not in clinical  # both rows are the fp32 model
    # The same model through onnxruntime and torch eager: same referral decisions.
    a, b = (r["clinical"]["referral_confusion"] for r in report["artifacts"])
    assert a == b


def test_build_writes_reports_that_rerender_identically(tiny_build, monkeypatch, tmp_path):
    from tlcompile.cli import main

    out = Path(shutil.copytree(tiny_build[0], tmp_path / "build"))  # the build is shared: this test deletes files
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert "## Summary" in md and "| fp32 | onnxruntime |" in md
    assert '<section id="summary">' in page and "http://" not in page and "https://" not in page
    (out / "report.md").unlink()
    (out / "report.html").unlink()
    monkeypatch.setattr(sys, "argv", ["tlcompile", "report", "render", str(out)])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 0
    # From report.json alone, the same documents (matplotlib's Agg PNGs are deterministic).
    assert (out / "report.md").read_text() == md
    assert (out / "report.html").read_text() == page
