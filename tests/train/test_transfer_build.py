"""A build that transfers from an earlier build and compares variants: the report's transfer table and resume."""

from __future__ import annotations

import json

import torch
from rich.console import Console

from tests.train.conftest import fake_build
from tlcompile.build import build
from tlcompile.recipe import load_recipe
from tlcompile.report.schema import validate_report


def test_build_from_a_source_build_with_a_comparison(tmp_path, write_recipe, no_plots) -> None:
    source_state = fake_build(tmp_path / "source", "cbr_small", "grade", with_report=True)
    raw = {
        "name": "target",
        "seed": 0,
        "data": {
            "source": "synthetic",
            "num_images": 48,
            "image_size": 32,
            "style": "camera_b",
            "split": {"val": 0.25, "test": 0.25},
        },
        "model": {"arch": "cbr_small", "pretrained": "build:source"},  # relative to the recipe file
        "train": {"epochs": 2, "batch_size": 12},
        "transfer": {
            "init": "pretrained",
            "strategy": "two_phase",
            "head_epochs": 1,
            "compare": [{"init": "random", "strategy": "scratch"}],
        },
        "export": {"formats": ["onnx"], "parity_images": 8},
        "bench": {"runtimes": ["onnxruntime"], "warmup": 1, "iterations": 2},
    }
    recipe_path = write_recipe(raw)
    recipe = load_recipe(recipe_path, ["bundle.enabled=false"])
    out = tmp_path / "out"
    report = build(recipe, out, console=Console(quiet=True)).report

    validate_report(json.loads((out / "report.json").read_text()))  # the transfer table and its source included
    transfer = report["transfer"]
    assert [r["variant"] for r in transfer["rows"]] == ["pretrained/two_phase", "random/scratch"]
    assert transfer["source"]["kind"] == "build" and transfer["source"]["build"] == str(tmp_path / "source")
    selected = transfer["selected"]
    assert report["training"]["variant"] == selected and sum(r["selected"] for r in transfer["rows"]) == 1
    # What trained the model is on record (a GPU build says cuda (<device name>) and its autocast).
    assert (report["training"]["device"], report["training"]["amp"], report["training"]["channels_last"]) == (
        "cpu",
        "none",
        False,
    )
    assert "on cpu, autocast none, channels_last off." in (out / "report.md").read_text()
    best = max(transfer["rows"], key=lambda r: r["val_auc"])
    assert selected == best["variant"]
    for row in transfer["rows"]:
        assert {"variant", "init", "strategy", "val_auc", "test_auc", "epochs_to_target", "wall_s"} <= set(row)
        assert 0.0 <= row["val_auc"] <= 1.0 and 0.0 <= row["test_auc"] <= 1.0 and row["wall_s"] > 0
    assert json.loads((out / "02_train" / "transfer.json").read_text()) == transfer
    assert not list(
        (out / "02_train").glob("epoch-checkpoint*")
    )  # the per-run epoch checkpoints go once the stage is done
    phases = report["training"]["phases"]
    if selected == "pretrained/two_phase":
        assert [p["name"] for p in phases] == ["head", "finetune"] and phases[1]["optimizer"] == "sgd"
    else:
        assert [p["name"] for p in phases] == ["full"]
    # The checkpoint that goes on is the selected variant's; only the pretrained variant carries the source's layer1.
    fp32 = torch.load(out / "02_train" / "fp32.pt", weights_only=True)
    assert torch.equal(fp32["features.layer1.conv.weight"], source_state["features.layer1.conv.weight"]) == (
        selected == "pretrained/two_phase"
    )

    # Resume reuses the train stage, the table included, and no longer needs the source.
    (tmp_path / "source" / "02_train" / "fp32.pt").unlink()
    again = build(recipe, out, resume=True, console=Console(quiet=True)).report
    assert again["transfer"] == transfer and again["training"]["variant"] == selected
