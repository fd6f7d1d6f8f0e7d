"""Tiny fixtures for the transfer tests: a few dozen synthetic images at 32 px and source weight files."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from tlcompile.data.datamodule import load_data
from tlcompile.recipe import DataConfig, SplitConfig


@pytest.fixture(scope="session")
def tiny_data():
    """48 synthetic fundus images at 32 px, referable task (2 classes), split 24/12/12."""
    cfg = DataConfig(
        source="synthetic", num_images=48, image_size=32, task="referable", split=SplitConfig(val=0.25, test=0.25)
    )
    return load_data(cfg, seed=0)


def source_like(arch: str, num_classes: int, *, seed: int = 123) -> dict[str, torch.Tensor]:
    """A 'trained' state_dict of ``arch``: the fresh init with each conv/linear weight shifted and scaled, so every
    layer has its own non-zero mean and std (as learned weights do) and BN statistics away from (0, 1)."""
    from tlcompile.models import get_model

    torch.manual_seed(seed)
    state = get_model(arch, num_classes=num_classes).state_dict()
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, (key, value) in enumerate(state.items()):
        if value.dtype.is_floating_point and key.endswith("weight") and value.dim() > 1:
            value = value * (1.5 + i % 3) + 0.02 * (1 + i % 5)
        elif key.endswith(("running_mean", "bias")):
            value = value + torch.rand(value.shape, generator=g) - 0.5
        elif key.endswith("running_var"):
            value = value * (0.5 + torch.rand(value.shape, generator=g))
        out[key] = value.clone()
    return out


def fake_build(folder, arch: str, task: str, *, with_report: bool) -> dict[str, torch.Tensor]:
    """The files of a finished tlcompile build that a later build reads: 02_train/fp32.pt and its metadata."""
    state = source_like(arch, 5 if task == "grade" else 2)
    (folder / "02_train").mkdir(parents=True)
    torch.save(state, folder / "02_train" / "fp32.pt")
    recipe = {"name": "source", "model": {"arch": arch}, "data": {"task": task}}
    (folder / "recipe.resolved.yaml").write_text(yaml.safe_dump(recipe))
    if with_report:
        names = (
            ["no DR", "mild", "moderate", "severe", "proliferative"]
            if task == "grade"
            else ["non-referable", "referable"]
        )
        (folder / "report.json").write_text(
            json.dumps(
                {"name": "source", "recipe": recipe, "class_names": names, "task": task, "recipe_sha256": "ab" * 32}
            )
        )
    return state
