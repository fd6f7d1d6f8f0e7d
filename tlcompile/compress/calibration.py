"""The calibration set: a stratified sample of the *training* split (never val or test, which judge the result).

Activation ranges (PTQ), BatchNorm statistics after pruning and Taylor channel importance are all estimated on it,
so its class mix should be the training mix: each class contributes in proportion to its share, at least one image.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from tlcompile.runtime.preprocess import PreprocessSpec
from tlcompile.train import loop


def calibration_indices(targets: np.ndarray, count: int, *, seed: int) -> np.ndarray:
    """Indices of ``min(count, len(targets))`` samples, stratified by target, sorted; fixed by ``seed``.

    Each class gets ``round(count * share)`` samples (at least one while there is room); rounding leftovers go to the
    largest classes first, so the total is exactly ``count``.
    """
    targets = np.asarray(targets)
    n = targets.shape[0]
    if count >= n:
        return np.arange(n)
    rng = np.random.default_rng([seed, 0xCA11])  # independent of the split's and training's streams
    classes, sizes = np.unique(targets, return_counts=True)
    quota = np.maximum(1, np.floor(count * sizes / n)).astype(int)
    quota = np.minimum(quota, sizes)
    # Hand out (or take back) the rounding difference, largest classes first.
    order = np.argsort(-sizes, kind="stable")
    i = 0
    while quota.sum() != count:
        c = order[i % len(order)]
        if quota.sum() < count and quota[c] < sizes[c]:
            quota[c] += 1
        elif quota.sum() > count and quota[c] > 1:
            quota[c] -= 1
        i += 1
    chosen = [
        rng.choice(np.flatnonzero(targets == cls), size=q, replace=False) for cls, q in zip(classes, quota, strict=True)
    ]
    return np.sort(np.concatenate(chosen))


def calibration_set(data, count: int, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(images, targets) of the calibration set: ``count`` stratified training images (all of them if fewer)."""
    x_train, y_train = data.subset("train")
    idx = calibration_indices(y_train, count, seed=seed)
    return x_train[idx], y_train[idx]


def input_batches(
    images: np.ndarray,
    spec: PreprocessSpec,
    *,
    batch_size: int,
    device: torch.device,
    targets: np.ndarray | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Normalised (N, 3, S, S) float batches (no augmentation) with their targets, in order."""
    targets = np.zeros(len(images), dtype=np.int64) if targets is None else targets
    yield from loop.iterate_batches(images, targets, spec, batch_size=batch_size, device=device)


def equal_batches(
    images: np.ndarray, spec: PreprocessSpec, *, batch_size: int, device: torch.device
) -> list[torch.Tensor]:
    """Normalised input batches of all ``images`` in order, ``ceil(n / batch_size)`` of them and of equal size (sizes
    differ by at most one when ``batch_size`` does not divide ``n``): a statistic that NNCF averages per batch then
    weighs every image alike."""
    count = max(1, -(-len(images) // max(1, batch_size)))
    chunks = [idx for idx in np.array_split(np.arange(len(images)), count) if len(idx)]
    return [next(input_batches(images[idx], spec, batch_size=len(idx), device=device))[0] for idx in chunks]
