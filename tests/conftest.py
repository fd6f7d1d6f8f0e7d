"""Shared fixtures: tiny recipes and data so the default suite stays fast on 2 cores."""

from __future__ import annotations

import os
from pathlib import Path

# Tiny models gain nothing from a second thread, and OpenMP threads that busy-wait stall badly when the two
# cores are shared (other jobs, CI neighbours). Builds read this through runtime.inference.default_threads().
os.environ.setdefault("TLCOMPILE_NUM_THREADS", "1")
try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # the runtime-only install has no torch
    pass

import pytest
import yaml

from tlcompile.runtime import pinning

# The build's and verify's candidate bench measures each round for at least 0.2 s, so that a clinic box's choice is
# not decided by noise: ~2 s per bundle, ~30 s over the suite. The tests check what is chosen and recorded, not how
# steady the figures are, so their rounds stop after the iterations asked for (at least 20 ms).
pinning.DEFAULT_ROUND_SECONDS = 0.02

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_recipe_dict() -> dict:
    """A recipe that builds in seconds: 120 synthetic images at 48 px, cbr_small, 1 epoch, few timed runs."""
    return {
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
def write_recipe(tmp_path):
    """Write a dict (or raw text) as a recipe file and return its path."""

    def _write(content, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
        return path

    return _write
