"""Screening metrics in numpy alone (the runtime half uses them on the edge box).

Scores: for the referable task the probability of class 1; for the 5-grade task the summed probability of
grades >= 2, so both tasks give a referable-DR score and AUC means the same thing.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def logsumexp(z: np.ndarray) -> np.ndarray:
    """log(sum(exp(z))) of each row of a 2-D array, shifted by the row maximum so large logits do not overflow."""
    peak = z.max(axis=1, keepdims=True)
    return (peak + np.log(np.exp(z - peak).sum(axis=1, keepdims=True)))[:, 0]


def round_finite(x: Any, digits: int | None = 6) -> float | None:
    """``x`` as a float rounded to ``digits`` (``None``: not rounded), or None when ``x`` is None, NaN or infinite:
    the form a metric takes in JSON records (a NaN AUC of a one-class split becomes null)."""
    if x is None:
        return None
    value = float(x)
    if not math.isfinite(value):
        return None
    return value if digits is None else round(value, digits)


def referable_classes(num_classes: int) -> slice:
    """The classes that mean referable DR: class 1 of the binary task, grades 2-4 of the 5-grade one."""
    return slice(1, 2) if num_classes == 2 else slice(2, num_classes)


def referable_score(logits: np.ndarray) -> np.ndarray:
    """P(referable DR) from logits of either task (2 classes: p[1]; 5 grades: p[2:] summed)."""
    p = softmax(logits)
    return p[:, referable_classes(p.shape[1])].sum(axis=1)


def referable_truth(targets: np.ndarray, num_classes: int) -> np.ndarray:
    t = np.asarray(targets)
    ref = referable_classes(num_classes)
    return ((t >= ref.start) & (t < ref.stop)).astype(np.int64)


def roc_auc(y_true: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties). NaN if one class is absent."""
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(score, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(s.size, dtype=np.float64)
    sorted_s = s[order]
    # Average ranks over ties.
    _, first, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve(y_true: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) with thresholds descending; a score >= threshold is called positive."""
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(score, dtype=np.float64)
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    distinct = np.r_[np.flatnonzero(np.diff(s_sorted)), s_sorted.size - 1]
    tps = np.cumsum(y_sorted)[distinct]
    fps = (distinct + 1) - tps
    n_pos, n_neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    tpr = np.r_[0.0, tps / n_pos]
    fpr = np.r_[0.0, fps / n_neg]
    thresholds = np.r_[np.inf, s_sorted[distinct]]
    return fpr, tpr, thresholds


def operating_point(
    y_true: np.ndarray, score: np.ndarray, *, method: str = "youden", target_sensitivity: float | None = None
) -> float:
    """Lock a decision threshold on validation data.

    youden: maximise sensitivity + specificity - 1; sensitivity: the highest threshold reaching
    ``target_sensitivity`` (so specificity is as high as it can be at that sensitivity).
    """
    fpr, tpr, thr = roc_curve(y_true, score)
    if method == "sensitivity":
        if target_sensitivity is None:
            raise ValueError("target_sensitivity is required for method='sensitivity'")
        ok = np.flatnonzero(tpr >= target_sensitivity)
        idx = int(ok[0]) if ok.size else len(thr) - 1
    else:
        idx = int(np.argmax(tpr - fpr))
    t = float(thr[idx])
    return 1.0 if not np.isfinite(t) else t


def binary_metrics(y_true: np.ndarray, score: np.ndarray, threshold: float) -> dict[str, float]:
    y = np.asarray(y_true).astype(bool)
    pred = np.asarray(score) >= threshold
    tp, tn = int((pred & y).sum()), int((~pred & ~y).sum())
    fp, fn = int((pred & ~y).sum()), int((~pred & y).sum())

    def ratio(a: int, b: int) -> float:
        return a / b if b else float("nan")

    return {
        "sensitivity": ratio(tp, tp + fn),
        "specificity": ratio(tn, tn + fp),
        "ppv": ratio(tp, tp + fp),
        "npv": ratio(tn, tn + fn),
        "tp": tp,
        "tn": tn,
        "fp": fp,
        "fn": fn,
    }


def classification_metrics(logits: np.ndarray, targets: np.ndarray, threshold: float) -> dict[str, Any]:
    """AUC, accuracy (argmax) and sensitivity/specificity of referable DR at ``threshold``."""
    logits = np.asarray(logits)
    num_classes = logits.shape[1]
    truth = referable_truth(targets, num_classes)
    score = referable_score(logits)
    out: dict[str, Any] = {
        "auc": roc_auc(truth, score),
        "accuracy": float((logits.argmax(axis=1) == np.asarray(targets)).mean()),
        "threshold": float(threshold),
    }
    out.update(binary_metrics(truth, score, threshold))
    out["n"] = int(truth.size)
    return out
