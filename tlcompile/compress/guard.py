"""The accuracy guard: a compressed model may lose at most ``max_auc_drop`` val AUC (and/or ``max_accuracy_drop``
val accuracy at the locked operating point) against the model it was made from.

Judged on the validation split -- the test split stays untouched for the report -- with the same threshold and
temperature every artifact is judged at. A record says what was compared, the numbers, the limits and whether each
was met; the stages add what they did when it was not (more epochs, layers kept in FP32).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tlcompile.evaluate.metrics import classification_metrics


def val_metrics(logits: np.ndarray, targets: np.ndarray, *, threshold: float, temperature: float = 1.0) -> dict[str, float]:
    """AUC and accuracy of val logits at the locked operating point."""
    m = classification_metrics(logits / temperature, targets, threshold)
    return {"auc": float(m["auc"]), "accuracy": float(m["accuracy"])}


def check(
    candidate: dict[str, float],
    reference: dict[str, float],
    *,
    against: str,
    max_auc_drop: float | None,
    max_accuracy_drop: float | None,
) -> dict[str, Any]:
    """One guard check: ``candidate`` vs ``reference`` val metrics under the given limits (None = not limited).

    A NaN metric (one class missing from val) cannot show a drop within a limit and fails that limit.
    """
    out: dict[str, Any] = {"against": against, "split": "val"}
    met = True
    for metric, limit in (("auc", max_auc_drop), ("accuracy", max_accuracy_drop)):
        ref, value = reference[metric], candidate[metric]
        drop = ref - value
        item = {"reference": _r(ref), "value": _r(value), "drop": _r(drop), "max_drop": limit}
        if limit is not None:
            item["met"] = bool(np.isfinite(drop) and drop <= limit + 1e-12)
            met = met and item["met"]
        out[metric] = item
    out["met"] = met
    return out


def _r(x: float) -> float | None:
    return round(float(x), 6) if np.isfinite(x) else None


def summarize(checks: list[dict[str, Any]], actions: list[str]) -> dict[str, Any]:
    """The guard record of an artifact: met when every check is met."""
    return {"met": all(c["met"] for c in checks), "checks": checks, "actions": actions}
