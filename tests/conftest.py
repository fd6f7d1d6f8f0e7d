"""Shared fixtures: tiny recipes and data so the default suite stays fast on 2 cores."""

from __future__ import annotations

import copy
import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Tiny models gain nothing from a second thread, and OpenMP threads that busy-wait stall badly when the two
# cores are shared (other jobs, CI neighbours). Builds read this through runtime.inference.default_threads().
os.environ.setdefault("TLCOMPILE_NUM_THREADS", "1")
# NNCF's CPU kernels, which tests/compress/test_fused_fq.py compares with, are compiled into the venv (as the Makefile
# does), not into the user-wide ~/.cache/torch_extensions that every other clone's venv rebuilds for its own paths.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))

import pytest
import yaml

from tests.once import made_once
from tlcompile.compat import decline_vendor_telemetry
from tlcompile.runtime import pinning

# Test modules import openvino while they are collected (pytest.importorskip), before any tlcompile code runs: decline
# its telemetry first, so that the suite, like tlcompile, writes nothing into ~/intel.
decline_vendor_telemetry()

# The build's and verify's candidate bench measures each round for at least 30 runs and 0.2 s, so that a clinic box's
# choice is not decided by noise: ~2 s per bundle, ~30 s over the suite. The tests check what is chosen and recorded,
# not how steady the figures are, so their rounds stop after 5 runs and 20 ms (~20 s less over the suite, 2-core
# AVX-512 AMD EPYC).
pinning.DEFAULT_ITERATIONS = 5
pinning.DEFAULT_ROUND_SECONDS = 0.02

# A RISE heatmap is explain.RISE_MASKS (256) inferences: ~0.5 s an image for cbr_small at 48 px. The tests that build
# bundles with heatmaps or run predict/serve --explain check what is written, where and when, not how faithful a
# heatmap is (tests/runtime/test_explain.py checks that with the product's 256), so they draw this many (the shared
# build, tests/runtime's CLI subprocesses and the `few_rise_masks` fixture).
FEW_RISE_MASKS = 64


def pytest_configure(config) -> None:
    """torch on one thread in each process that runs tests. pytest-xdist's controller runs none: it skips importing
    torch (~2.5 s of a core while the workers start)."""
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        return
    try:
        import torch
    except ImportError:  # the runtime-only install has no torch
        return
    torch.set_num_threads(1)


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_recipe_dict() -> dict:
    """A recipe that builds in seconds: 120 synthetic images at 48 px, cbr_small, 1 epoch, few timed runs."""
    return copy.deepcopy(TINY_RECIPE)


TINY_RECIPE = {
    "name": "tiny",
    "seed": 0,
    "data": {"source": "synthetic", "num_images": 120, "image_size": 48, "split": {"val": 0.2, "test": 0.25}},
    "model": {"arch": "cbr_small"},
    "train": {"epochs": 1, "batch_size": 32, "lr": 0.002},
    "export": {"formats": ["onnx", "openvino"], "parity_images": 16},
    "bench": {"runtimes": ["openvino", "onnxruntime", "torch"], "warmup": 1, "iterations": 3},
    "bundle": {"explain_images": 0},  # heatmaps cost ~10 s at this size: tests/runtime's tiny_build has them
}


@pytest.fixture
def no_plots(monkeypatch):
    """report.html without its matplotlib plots, for tests of the page's text and of builds that never read their
    report.html: a render costs ~1-2 s, nearly all of it the plots. The plots stay checked where they are the subject
    (tests/report/test_report.py) and in the builds that render them (the runtime tests' shared build, the e2e,
    compression, schema and DICOM builds)."""
    from tlcompile.report import html

    monkeypatch.setattr(html, "PLOTS", ())


def cli_refusal(args: list, match: str) -> str:
    """Run ``tlcompile ARGS`` in this process and return its refusal: a TlcompileError (the CLI prints ``error: ...``
    and exits 2) whose one-line message holds ``match``."""
    from typer.testing import CliRunner

    from tlcompile.cli import app
    from tlcompile.errors import TlcompileError

    result = CliRunner().invoke(app, [str(a) for a in args])
    assert isinstance(result.exception, TlcompileError), (result.exit_code, result.output, result.exception)
    message = str(result.exception)
    assert match in message and "\n" not in message, message
    return message


@pytest.fixture
def few_rise_masks(monkeypatch):
    """RISE heatmaps of FEW_RISE_MASKS masks, for tests of where heatmaps go rather than of what they show."""
    from tlcompile.runtime import explain

    monkeypatch.setattr(explain, "RISE_MASKS", FEW_RISE_MASKS)


@pytest.fixture
def write_recipe(tmp_path):
    """Write a dict (or raw text) as a recipe file and return its path."""

    def _write(content, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
        return path

    return _write


@dataclass
class TinyBuild:
    out_dir: Path
    report: dict[str, Any]
    recipe: Any

    @property
    def bundle(self) -> Path:
        return self.out_dir / "bundle"


@pytest.fixture(scope="session")
def tiny_build(tmp_path_factory) -> TinyBuild:
    """A tiny build (120 synthetic images at 48 px, cbr_small, 1 epoch; fp32 in ONNX and OpenVINO IR) with its bundle,
    built once per test run (a build takes ~15 s on 2 cores; the runtime and bench tests share it)."""
    from rich.console import Console

    from tlcompile.build import build
    from tlcompile.recipe import validate_recipe_dict

    recipe = validate_recipe_dict(
        {
            "name": "tiny-bundle",
            "seed": 0,
            "data": {"source": "synthetic", "num_images": 120, "image_size": 48, "split": {"val": 0.2, "test": 0.25}},
            "model": {"arch": "cbr_small"},
            # A small learning rate keeps the 1-epoch model's probabilities off 0 and 1, so golden samples with a
            # decision margin exist (a saturated model would put every case on the threshold).
            "train": {"epochs": 1, "batch_size": 32, "lr": 0.0003},
            "export": {"formats": ["onnx", "openvino"], "parity_images": 16},
            "bench": {"runtimes": ["openvino", "onnxruntime"], "warmup": 1, "iterations": 3},
            "evaluate": {"bootstrap_resamples": 200},
            # Heatmaps (FEW_RISE_MASKS) for the report's examples and a pointing game on 6 referable images.
            "bundle": {"golden_samples": 6, "explain_images": 6},
            # At 48 px (a field radius of ~28 px) no focus measure tells blur from sharp, and the golden frames are
            # 2x enlargements: the gate's focus limit is fixed off here; its other limits are calibrated as usual.
            "quality": {"limits": {"focus": 0.0}},
        }
    )

    def make(folder: Path) -> TinyBuild:
        from tlcompile.runtime import explain

        masks, explain.RISE_MASKS = explain.RISE_MASKS, FEW_RISE_MASKS
        try:
            result = build(recipe, folder / "build", console=Console(file=io.StringIO(), width=200))
        finally:
            explain.RISE_MASKS = masks
        return TinyBuild(out_dir=folder / "build", report=result.report, recipe=recipe)

    return made_once(tmp_path_factory, "tiny-build", make)
