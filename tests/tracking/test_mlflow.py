"""MLflow tracking: a tiny build logged to a local file store as a sweep's child run (params, per-epoch metrics,
stage times, row metrics, report + bundle artifacts); off by default and outside every fingerprint."""

from __future__ import annotations

import io
import json
import re

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


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("htp://mlflow.team:5000", "'htp' is not a scheme MLflow tracks to; valid: file:PATH"),
        ("ftp://host/x", "'ftp' is not a scheme MLflow tracks to"),
        ("   ", "is blank or has a space or control character in it"),
        ("http://mlflow team:5000", "has a space or control character"),
        ("http://h:99999", "Port out of range"),
        ("https://", "has no host"),
    ],
)
def test_a_tracking_uri_mlflow_cannot_use_is_refused_by_validate(uri, message):
    """They passed validate, and MLflow's client refused them mid-build with a traceback."""
    from tlcompile.errors import RecipeError

    with pytest.raises(RecipeError, match=re.escape(message)):
        validate_recipe_dict({**TINY, "tracking": {"mlflow": {"uri": uri}}})


@pytest.mark.parametrize(
    "uri", ["file:./mlruns", "mlruns", "databricks", "sqlite:///m.db", "postgresql+psycopg2://h/db"]
)
def test_tracking_uris_mlflow_takes_are_valid(uri):
    assert validate_recipe_dict({**TINY, "tracking": {"mlflow": {"uri": uri}}}).tracking.mlflow.uri == uri


def test_a_store_mlflow_refuses_or_a_server_that_does_not_answer_leaves_the_build_untracked(tmp_path):
    """The README's promise: a tracking failure is printed once and the build goes on untracked. A store MLflow's
    client refused at construction escaped as a traceback; a server that was down held the build silent ~4 min."""
    pytest.importorskip("mlflow")
    import socket

    from tlcompile.tracking import MlflowTracker

    (tmp_path / "afile").write_text("x")
    lines: list[str] = []
    tracker = MlflowTracker(f"file://{tmp_path / 'afile' / 'mlruns'}", "e", log=lines.append)
    tracker.start(validate_recipe_dict(TINY), tmp_path)  # a no-op now
    assert tracker.client is None and tracker.run_id is None
    assert lines[0].startswith("tracking: MLflow cannot use file://") and "NotADirectoryError" in lines[0]
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    down = MlflowTracker(f"http://127.0.0.1:{port}", "e", log=lines.append)
    assert down.client is None
    for untracked in (tracker, down):  # every call the build makes is then a no-op (one left _step unset: a crash)
        untracked.start(validate_recipe_dict(TINY), tmp_path)
        untracked.epoch("fp32", {"epoch": 1, "loss": 0.5})
        untracked.stage("train", 1.0)
        untracked.finish({"artifacts": []}, tmp_path)
        untracked.fail(RuntimeError("x"))
    said = [line for line in lines if "does not answer" in line]
    assert said == [
        f"tracking: the MLflow server at http://127.0.0.1:{port}: 127.0.0.1:{port} does not answer (Connection "
        "refused); the build goes on untracked"
    ]
