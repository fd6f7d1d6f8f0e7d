"""Train/val/test splits: stratified by label, optionally grouped by patient, fixed by the seed (numpy only)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tlcompile.errors import DataError

SPLITS = ("train", "val", "test")


def stratified_split(
    labels: np.ndarray,
    *,
    val: float,
    test: float,
    seed: int,
    groups: Sequence[str] | None = None,
) -> np.ndarray:
    """Assign each sample to 'train', 'val' or 'test'.

    Stratified per label: each class is shuffled (by ``seed``) and cut into the three fractions, so every split
    has about the same class mix. With ``groups`` (patient ids), whole groups move together (both eyes of a patient
    never straddle two splits); a group's stratum is its highest label, the referral-relevant one.
    Returns an array of split names, one per sample.
    """
    labels = np.asarray(labels)
    n = labels.shape[0]
    if n < 3:
        raise DataError(f"{n} images are too few to split into train/val/test; need at least 3")
    rng = np.random.default_rng(seed)
    if groups is None:
        group_ids = np.arange(n)
    else:
        if len(groups) != n:
            raise DataError(f"{len(groups)} patient ids for {n} images")
        _, group_ids = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    num_groups = int(group_ids.max()) + 1
    group_label = np.full(num_groups, -1, dtype=np.int64)
    np.maximum.at(group_label, group_ids, labels.astype(np.int64))

    group_split = np.empty(num_groups, dtype=object)
    for label in np.unique(group_label):
        members = np.flatnonzero(group_label == label)
        members = members[rng.permutation(members.size)]
        n_test = int(round(test * members.size))
        n_val = int(round(val * members.size))
        # Small classes: keep at least one of each in val and test when there are enough members.
        if members.size >= 3:
            n_test, n_val = max(n_test, 1), max(n_val, 1)
        group_split[members[:n_test]] = "test"
        group_split[members[n_test : n_test + n_val]] = "val"
        group_split[members[n_test + n_val :]] = "train"
    assignment = group_split[group_ids].astype(str)
    for name in SPLITS:
        if not np.any(assignment == name):
            raise DataError(
                f"the '{name}' split is empty ({n} images, val={val}, test={test}); use more images or larger fractions"
            )
    return assignment
