"""A report.json built from synthetic logits through the real clinical evaluation: report tests need no build."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest

from tests.once import made_once
from tlcompile.evaluate.clinical import CI_LEVEL, CI_METHODS, add_clinical_to_rows, lock_operating_point
from tlcompile.evaluate.metrics import classification_metrics

GRADE_NAMES = ["no DR", "mild", "moderate", "severe", "proliferative"]
LATENCY = {
    ("fp32", "openvino"): 4.0,
    ("int8", "openvino"): 1.5,
    ("fp32", "onnxruntime"): 6.0,
    ("int8", "onnxruntime"): 7.0,
}


def _logits(grades: np.ndarray, task: str, rng: np.random.Generator, noise: float) -> np.ndarray:
    """Logits of a decent but imperfect model: a noisy latent severity scored against each class."""
    latent = grades + rng.normal(scale=noise, size=grades.size)
    if task == "referable":
        return np.c_[np.zeros(grades.size), 2.0 * (latent - 1.5)]
    return -0.8 * (latent[:, None] - np.arange(5)[None, :]) ** 2


def make_guard(met: bool) -> dict:
    """The guard record of the int8 rows, from the real guard check (val metrics made up; specificity fails when not
    met)."""
    from tlcompile.compress import guard

    reference = {"auc": 0.95, "sensitivity": 0.90, "specificity": 0.90, "accuracy": 0.90}
    candidate = {"auc": 0.948, "sensitivity": 0.91, "specificity": 0.88 if met else 0.80, "accuracy": 0.89}
    limits = {"auc": 0.01, "sensitivity": 0.02, "specificity": 0.05, "accuracy": None}
    check = guard.check(candidate, reference, against="fp32", limits=limits)
    actions = (
        []
        if met
        else [
            "guard failed: 2 more QAT epochs -> still failing",
            "still failing: artifact kept and marked as not meeting the guard",
        ]
    )
    return guard.summarize([check], actions)


def make_report(
    task: str = "referable",
    *,
    seed: int = 0,
    n_test: int = 150,
    transfer=None,
    temperature_scaling: bool = False,
    endpoints: dict | None = None,
    resamples: int = 300,
    guard_met: bool = True,
) -> dict:
    rng = np.random.default_rng(seed)
    val_grades, test_grades = rng.integers(0, 5, 120), rng.integers(0, 5, n_test)
    targets = (lambda g: (g >= 2).astype(np.int64)) if task == "referable" else (lambda g: g)
    val_logits = _logits(val_grades, task, rng, 1.0)
    fp32 = _logits(test_grades, task, rng, 1.0)
    # The int8 model: the same predictions plus quantisation-like noise, so its deltas are small and paired.
    int8 = fp32 + rng.normal(scale=0.4, size=fp32.shape)
    op = {
        **lock_operating_point(
            val_logits,
            targets(val_grades),
            method="sensitivity",
            target_sensitivity=0.87,
            temperature_scaling=temperature_scaling,
        ),
        "locked_on": "val",
        "model": "fp32",
    }
    rows, row_logits = [], []
    for name, logits in (("fp32", fp32), ("int8", int8)):
        for runtime, fmt in (("openvino", "openvino"), ("onnxruntime", "onnx")):
            # Runtimes differ by float rounding only.
            logits_here = logits + rng.normal(scale=1e-6, size=logits.shape)
            m = classification_metrics(logits_here / op["temperature"], targets(test_grades), op["threshold"])
            rows.append(
                {
                    "name": name,
                    "format": fmt,
                    "precision": name,
                    "path": f"05_export/{name}.{'xml' if fmt == 'openvino' else 'onnx'}",
                    "size_bytes": 4_000_000 if name == "fp32" else 1_100_000,
                    "params": 1_000_000,
                    "macs": 50_000_000,
                    "runtime": runtime,
                    "threads": 2,
                    "exec_precision": "f32" if name == "fp32" else "i8",
                    "latency_ms": {"p50": LATENCY[(name, runtime)], "p90": LATENCY[(name, runtime)] * 1.2},
                    "metrics": {
                        k: m[k]
                        for k in ("auc", "accuracy", "sensitivity", "specificity", "ppv", "npv", "threshold", "n")
                    },
                    "parity": {"max_abs_diff": 1e-6, "top1_agreement": 1.0},
                    "lineage": name,
                    **({"guard": make_guard(guard_met)} if name == "int8" else {}),
                }
            )
            row_logits.append(logits_here)
    endpoints = (
        endpoints if endpoints is not None else {"min_sensitivity": 0.85, "min_specificity": 0.5, "min_auc": None}
    )
    add_clinical_to_rows(
        rows,
        row_logits,
        targets(test_grades),
        threshold=op["threshold"],
        temperature=op["temperature"],
        endpoints=endpoints,
        endpoint_rule="point_estimate",
        resamples=resamples,
        seed=seed,
    )
    class_names = ["non-referable", "referable"] if task == "referable" else GRADE_NAMES
    report = {
        "tlcompile_version": "0.1.0",
        "created": "2026-01-01T00:00:00+00:00",
        "name": f"synthetic-{task}",
        "recipe": {},
        "recipe_sha256": "ab" * 32,
        "task": task,
        "class_names": class_names,
        "data": {"counts": {s: {c: 10 for c in class_names} for s in ("train", "val", "test")}, "images": 400},
        "operating_point": op,
        "evaluation": {
            "ci_level": CI_LEVEL,
            "ci_methods": CI_METHODS,
            "bootstrap_resamples": resamples,
            "bootstrap_seed": seed,
            "calibration_bins": 10,
            "endpoints": {**endpoints, "rule": "point_estimate"},
        },
        "training": {
            "history": [
                {"epoch": e, "loss": 1.0 / e, "val_auc": 0.6 + 0.05 * e, "lr": 1e-3, "seconds": 2.0} for e in (1, 2, 3)
            ],
            "best_epoch": 3,
            "best_val_auc": 0.75,
            "wall_s": 6.0,
        },
        "artifacts": rows,
        "stage_seconds": {"data": 1.5, "train": 30.0, "export": 4.0, "bench": 9.0},
        "environment": {
            "tlcompile": "0.1.0",
            "python": "3.12",
            "torch": "2.x",
            "openvino": "2026",
            "onnxruntime": "1.x",
            "platform": "Linux",
            "cpu": {"model": "Test CPU", "usable_cores": 2, "logical_cores": 2, "isa": ["AVX2", "AVX512-VNNI"]},
        },
    }
    if transfer is not None:
        report["transfer"] = transfer
    return report


TRANSFER_ROWS = [
    {
        "variant": "scratch",
        "init": "none",
        "strategy": "full",
        "val_auc": 0.71,
        "test_auc": 0.69,
        "epochs_to_target": None,
        "wall_s": 30.2,
    },
    {
        "variant": "partial:2",
        "init": "build:src",
        "strategy": "partial:2",
        "val_auc": 0.83,
        "test_auc": 0.81,
        "epochs_to_target": 3,
        "wall_s": 21.7,
    },
]
# The shape the transfer stage writes (tlcompile.train.transfer.transfer_table): columns, rows with *_sd, the selection.
TRANSFER_TABLE = {
    "columns": ["variant", "init", "strategy", "val_auc", "test_auc", "epochs_to_target", "wall_s"],
    "rows": [
        {
            **row,
            **{
                f"{k}_sd": 0.01 if k == "val_auc" else None
                for k in ("val_auc", "test_auc", "epochs_to_target", "wall_s")
            },
            "selected": row["variant"] == "partial:2",
            "repeats": 2,
            "errors": [],
            "runs": [{"seed": 0}, {"seed": 1}],
        }
        for row in TRANSFER_ROWS
    ],
    "selected": "partial:2",
    "selected_by": "mean val AUC over seeds (test AUC is reported, never used to choose)",
    "repeats": 2,
    "source": None,
}


@pytest.fixture
def synthetic_report():
    return make_report


@pytest.fixture
def transfer_table():
    return copy.deepcopy(TRANSFER_TABLE)


@pytest.fixture
def transfer_rows():
    return copy.deepcopy(TRANSFER_ROWS)


@pytest.fixture(scope="session")
def tiny_build(tmp_path_factory):
    """A tiny real build (onnxruntime and torch rows, temperature scaling, an endpoint, no bundle): (folder, report),
    made once per test run (tests copy the folder before they change it)."""
    from rich.console import Console

    from tlcompile.build import build
    from tlcompile.recipe import validate_recipe_dict

    recipe = {
        "name": "tiny-clinical",
        "seed": 3,
        "data": {"source": "synthetic", "num_images": 100, "image_size": 40, "split": {"val": 0.25, "test": 0.3}},
        "model": {"arch": "cbr_small"},
        "train": {"epochs": 1, "batch_size": 32},
        "export": {"formats": ["onnx"], "parity_images": 8},
        "bench": {"runtimes": ["onnxruntime", "torch"], "warmup": 1, "iterations": 2},
        "evaluate": {
            "operating_point": "sensitivity",
            "target_sensitivity": 0.8,
            "temperature_scaling": True,
            "bootstrap_resamples": 200,
            "endpoints": {"min_specificity": 0.01},
        },
        "bundle": {"enabled": False},
    }

    def make(folder: Path) -> tuple[Path, dict]:
        result = build(validate_recipe_dict(recipe), folder / "b", console=Console(quiet=True))
        return folder / "b", result.report

    return made_once(tmp_path_factory, "report-tiny-build", make)
