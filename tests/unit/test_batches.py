"""A recipe that validates must not crash training: no single-image batch for BatchNorm (issue 20, must fix 5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tlcompile.models import get_model
from tlcompile.recipe import TrainConfig
from tlcompile.runtime.preprocess import PreprocessSpec
from tlcompile.train import loop


@pytest.mark.parametrize(
    ("n", "batch", "sizes"),
    [
        (65, 32, [32, 33]),
        (64, 32, [32, 32]),
        (33, 32, [33]),
        (1, 32, [1]),
        (2, 1, [1, 1]),
        (97, 32, [32, 32, 33]),
        (31, 32, [31]),
    ],
)
def test_a_last_batch_of_one_is_merged_into_the_one_before(n, batch, sizes):
    bounds = loop.batch_bounds(n, batch)
    assert [end - start for start, end in bounds] == sizes
    assert bounds[0][0] == 0 and bounds[-1][1] == n and loop.steps_per_epoch(n, batch) == len(sizes)


def test_every_training_image_once_per_epoch_and_deterministic():
    images = np.random.default_rng(0).integers(0, 255, (65, 8, 8, 3), dtype=np.uint8)
    targets = np.arange(65)
    runs = []
    for _ in range(2):
        rng = np.random.default_rng(3)
        batches = list(
            loop.iterate_batches(
                images,
                targets,
                PreprocessSpec(size=8),
                batch_size=32,
                device=torch.device("cpu"),
                shuffle=True,
                rng=rng,
            )
        )
        assert [len(y) for _, y in batches] == [32, 33]
        runs.append(torch.cat([y for _, y in batches]).tolist())
    assert sorted(runs[0]) == list(range(65)) and runs[0] == runs[1]


def test_65_training_images_at_batch_32_train_a_model_with_1x1_batchnorm():
    """The issue's example: (training images) mod (batch size) = 1 gave BatchNorm a one-image batch at 1x1 features
    (mobilenet_v3_small at 32 px) and the build crashed with 'Expected more than 1 value per channel'."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (65, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 2, 65)
    torch.manual_seed(0)
    model = get_model("mobilenet_v3_small", num_classes=2)
    opt = loop.make_optimizer(model.parameters(), name="adamw", lr=1e-3)
    sched = loop.make_scheduler(opt, TrainConfig(), 1, loop.steps_per_epoch(65, 32))
    settings = loop.FitSettings(
        epochs=1,
        batch_size=32,
        optimizer=opt,
        scheduler=sched,
        loss_fn=torch.nn.CrossEntropyLoss(),
        seed=0,
        device=torch.device("cpu"),
    )
    result, _ = loop.fit(model, (x, y), (x[:16], y[:16]), PreprocessSpec(size=32), settings)
    assert len(result.history) == 1 and np.isfinite(result.history[0]["loss"])
