"""data.balance: the weighted sampler draws classes equally often; the weighted loss weighs them inversely."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tlcompile.data.datamodule import DataModule
from tlcompile.runtime.preprocess import PreprocessSpec
from tlcompile.train import loop


def _imbalanced(balance: str, n: int = 400, positives: int = 40) -> DataModule:
    targets = np.zeros(n, np.int64)
    targets[:positives] = 1
    return DataModule(
        images=np.zeros((n, 4, 4, 3), np.uint8),
        grades=targets * 2,
        targets=targets,
        ids=[str(i) for i in range(n)],
        patients=[str(i) for i in range(n)],
        split=np.array(["train"] * n),
        spec=PreprocessSpec(size=4),
        task="referable",
        class_names=("non-referable", "referable"),
        balance=balance,
    )


def _drawn_positive_share(dm: DataModule, seed: int) -> float:
    x, y = dm.subset("train")
    batches = loop.iterate_batches(
        x,
        y,
        dm.spec,
        batch_size=64,
        device=torch.device("cpu"),
        shuffle=True,
        rng=np.random.default_rng(seed),
        sample_weights=dm.sample_weights("train"),
    )
    drawn = torch.cat([yb for _, yb in batches]).numpy()
    assert drawn.size == len(y)  # an epoch is still len(train) images
    return float(drawn.mean())


def test_weighted_sampler_draws_classes_equally_often():
    shares = [_drawn_positive_share(_imbalanced("weighted_sampler"), seed) for seed in range(5)]
    assert np.mean(shares) == pytest.approx(0.5, abs=0.04)
    # Without it an epoch is a permutation: the 10% minority stays 10%.
    assert _drawn_positive_share(_imbalanced("none"), 0) == pytest.approx(0.1)


def test_weighted_loss_weights_are_inverse_frequency():
    dm = _imbalanced("weighted_loss")
    assert dm.sample_weights() is None
    _, y = dm.subset("train")
    w = loop.class_weights(y, dm.num_classes)
    assert w.tolist() == pytest.approx([400 / (2 * 360), 400 / (2 * 40)])
