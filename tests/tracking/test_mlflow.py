"""MLflow tracking: a tiny build logged to a local file store as a sweep's child run (params, per-epoch metrics,
stage times, row metrics, report + bundle artifacts); off by default and outside every fingerprint."""

from __future__ import annotations

import io
import json

import pytest

from tlcompile.recipe import validate_recipe_dict

TINY = {
    "name": "tiny-tracked",
    "data": {"source": "synthetic", "num_images": 80, "image_size": 32, "split": {"val": 0.2, "test": 0.25}},
    "model": {"arch": "cbr_small"},
    "train": {"epochs": 2, "batch_size": 32},
    "export": {"formats": ["onnx"], "parity_images": 4},
    "bench": {"runtimes": ["onnxruntime"], "warmup": 1, "iterations": 2},
    "evaluate": {"bootstrap_resamples": 100},
    "bundle": {"golden_samples": 2, "explain_images": 0},
}


def test_tracking_changes_no_fingerprint_and_is_absent_by_default():
    from tlcompile.build.loop import STAGES

    plain = validate_recipe_dict(TINY)
    tracked = validate_recipe_dict({**TINY, "tracking": {"mlflow": {"uri": "file:/tmp/x", "experiment": "e"}}})
    assert "tracking" not in plain.to_yaml_dict() and tracked.to_yaml_dict()["tracking"]["mlflow"]["experiment"] == "e"
    assert plain.fingerprint() == tracked.fingerprint()
    for stage in STAGES:
        assert "tracking" not in (stage.sections or ())
        assert plain.fingerprint(stage.sections) == tracked.fingerprint(stage.sections)
    schema = json.dumps(type(plain).model_json_schema())  # what `tlcompile recipe schema` prints
    assert "MlflowConfig" in schema


def test_build_logs_a_child_run_to_a_local_file_store(tmp_path, no_plots):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    from rich.console import Console

    from tlcompile.build import build
    from tlcompile.tracking import start_parent_run

    uri = f"file:{tmp_path / 'mlruns'}"
    recipe = validate_recipe_dict({**TINY, "tracking": {"mlflow": {"uri": uri, "experiment": "dr-team"}}})
    client, parent = start_parent_run(recipe, "sweep tiny")
    log = io.StringIO()
    build(recipe, tmp_path / "build", console=Console(file=log, width=200), tracking_parent=parent)
    client.set_terminated(parent, "FINISHED")

    exp = client.get_experiment_by_name("dr-team")
    runs = {r.info.run_name: r for r in MlflowClient(uri).search_runs([exp.experiment_id])}
    run = runs["tiny-tracked"]
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.params["train.epochs"] == "2" and run.data.params["model.arch"] == "cbr_small"
    assert not any(k.startswith("tracking.") for k in run.data.params)
    metrics = run.data.metrics
    assert {"stage_seconds/train", "stage_seconds/bench", "fp32/onnxruntime/auc"} <= set(metrics)
    loss = next(k for k in metrics if k.startswith("train/") and k.endswith("/loss"))
    assert [m.step for m in client.get_metric_history(run.info.run_id, loss)] == [1, 2]  # per epoch
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.json", "report.md", "manifest.json", "bundle"} <= artifacts
    assert "bundle/bundle.json" in {a.path for a in client.list_artifacts(run.info.run_id, "bundle")}
    assert f"MLflow run {run.info.run_id}" in log.getvalue()
