"""One tiny `tlcompile build` end to end, through the CLI entry point (fast: part of the default run)."""

from __future__ import annotations

import json
import sys

import pytest

from tlcompile.report.schema import validate_report


def test_tiny_build_end_to_end(tiny_recipe_dict, write_recipe, tmp_path, monkeypatch, capsys):
    from tlcompile.cli import main
    from tlcompile.io import sha256_file
    from tlcompile.runtime.manifest import check_manifest

    out = tmp_path / "build"
    monkeypatch.setattr(sys, "argv", ["tlcompile", "build", str(write_recipe(tiny_recipe_dict)), "--out", str(out)])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 0
    printed = capsys.readouterr().out
    assert "fp32" in printed and "report.json" in printed

    report = json.loads((out / "report.json").read_text())
    validate_report(report)  # the typed contract, bundle included
    rows = {(a["name"], a["runtime"]): a for a in report["artifacts"]}
    assert set(rows) == {("fp32", "openvino"), ("fp32", "onnxruntime"), ("fp32", "torch")}
    for row in rows.values():
        for key in (
            "format",
            "precision",
            "path",
            "size_bytes",
            "params",
            "macs",
            "threads",
            "exec_precision",
            "latency_ms",
            "metrics",
            "parity",
        ):
            assert key in row, key
        assert (out / row["path"]).is_file()
        assert row["latency_ms"]["p50"] > 0 and row["latency_ms"]["p90"] >= row["latency_ms"]["p50"]
        assert 0.0 <= row["metrics"]["auc"] <= 1.0
    # Exports agree with torch (checked in f32).
    for runtime in ("openvino", "onnxruntime"):
        assert rows[("fp32", runtime)]["parity"]["max_abs_diff"] <= 1e-3
        assert rows[("fp32", runtime)]["parity"]["top1_agreement"] >= 0.99
    # The same test images through three runtimes give the same AUC to rounding.
    aucs = [r["metrics"]["auc"] for r in rows.values()]
    assert max(aucs) - min(aucs) < 0.02
    for name in (
        "recipe.resolved.yaml",
        "report.md",
        "01_data/splits.csv",
        "02_train/fp32.pt",
        "05_export/fp32.onnx",
        "05_export/fp32.xml",
    ):
        assert (out / name).is_file(), name
    assert "| fp32 | openvino |" in (out / "report.md").read_text()

    # A second build into the same folder is refused without --resume, and nothing is lost.
    before = (out / "report.json").read_bytes()
    monkeypatch.setattr(sys, "argv", ["tlcompile", "build", str(write_recipe(tiny_recipe_dict)), "--out", str(out)])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 2 and "already holds a build" in capsys.readouterr().err
    assert (out / "report.json").read_bytes() == before

    # The build's manifest lists every file it wrote, with its sha256, in the format the bundle's verify checks.
    manifest = json.loads((out / "manifest.json").read_text())
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk
    assert manifest["files"]["02_train/fp32.pt"]["sha256"] == sha256_file(out / "02_train" / "fp32.pt")
    assert manifest["inputs"]["images"] == 120 and len(manifest["inputs"]["list_sha256"]) == 64
    assert check_manifest(out).ok
    (out / "02_train" / "fp32.pt").write_bytes(b"tampered")
    assert not check_manifest(out).ok


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_both_onnx_exporters_agree_with_torch(exporter, tmp_path):
    import numpy as np
    import torch

    from tlcompile.export.exporters import check_parity, export_onnx
    from tlcompile.models import get_model

    torch.manual_seed(0)
    model = get_model("cbr_small", num_classes=2).eval()
    path = export_onnx(model, tmp_path / "m.onnx", image_size=32, exporter=exporter)
    x = (
        np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    )  # batch 3: the batch axis is dynamic
    with torch.no_grad():
        reference = model(torch.from_numpy(x)).numpy()
    parity = check_parity(reference, path, "onnxruntime", x)
    assert parity["max_abs_diff"] < 1e-4 and parity["top1_agreement"] == 1.0
