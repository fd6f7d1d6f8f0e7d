"""Fixtures for the compression tests: a few dozen synthetic images at 32 px and small trained-ish models."""

from __future__ import annotations

import pytest
import torch

from tlcompile.data.datamodule import load_data
from tlcompile.recipe import DataConfig, SplitConfig


@pytest.fixture(scope="session")
def tiny_data():
    """64 synthetic fundus images at 32 px, referable task, split 32/16/16."""
    cfg = DataConfig(
        source="synthetic", num_images=64, image_size=32, task="referable", split=SplitConfig(val=0.25, test=0.25)
    )
    return load_data(cfg, seed=0)


@pytest.fixture(scope="session")
def calibration_inputs(tiny_data):
    """The training images as normalised float batches (for BN adaptation and NNCF)."""
    from tlcompile.compress.calibration import input_batches

    x, _ = tiny_data.subset("train")
    return [xb for xb, _ in input_batches(x, tiny_data.spec, batch_size=16, device=torch.device("cpu"))]


def settled(arch: str, batches, *, seed: int = 0):
    """A registry model with BatchNorm statistics adapted to real images (activations in realistic ranges)."""
    from tlcompile.compress.prune import adapt_batchnorm
    from tlcompile.models import get_model

    torch.manual_seed(seed)
    model = get_model(arch, num_classes=2).eval()
    adapt_batchnorm(model, batches)
    return model
