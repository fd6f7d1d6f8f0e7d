"""The accuracy guard: a compressed model may lose at most so much against the model it was made from, on val.

Two kinds of limits, both judged on the validation split (the test split stays untouched for the report):

- ``max_auc_drop``: ranking quality (threshold-free);
- ``max_sensitivity_drop`` / ``max_specificity_drop`` / ``max_accuracy_drop``: the referral decisions at the
  *locked* operating point (the FP32 model's threshold and temperature, which every artifact is judged at). A
  screening programme validated those decisions; compression that keeps the AUC but shifts the scores across the
  threshold (an int8 model whose probabilities all move up a little) changes who gets referred, and must be caught.

A check records what was compared, every metric with its reference, value, drop and limit, and whether each limit
was met; the stages add what they did when it was not (more epochs, layers kept in FP32).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from tlcompile.evaluate.metrics import (
    binary_metrics,
    logsumexp,
    referable_classes,
    referable_score,
    referable_truth,
    roc_auc,
    round_finite,
)

GUARD_METRICS = ("auc", "sensitivity", "specificity", "accuracy")


def val_metrics(
    logits: np.ndarray, targets: np.ndarray, *, threshold: float, temperature: float = 1.0
) -> dict[str, float]:
    """AUC, and sensitivity / specificity / accuracy of the referral decision at the locked operating point."""
    logits = np.asarray(logits, dtype=np.float64)
    truth = referable_truth(targets, logits.shape[1])
    score = referable_score(logits / temperature)
    m = binary_metrics(truth, score, threshold)
    accuracy = (m["tp"] + m["tn"]) / truth.size if truth.size else math.nan
    return {
        "auc": roc_auc(truth, score),
        "sensitivity": m["sensitivity"],
        "specificity": m["specificity"],
        "accuracy": accuracy,
    }


def evidence(
    reference_logits: np.ndarray,
    logits: np.ndarray,
    targets: np.ndarray,
    *,
    threshold: float,
    temperature: float = 1.0,
    resamples: int = 500,
    seed: int = 0,
) -> dict[str, Any]:
    """What a guard verdict rests on, in cases rather than rates: how many referable val eyes the compressed model
    newly misses (or newly catches) against the reference at the locked threshold, how many non-referable ones it newly
    refers, and a paired stratified-bootstrap 95% CI of the AUC drop. With 46 referable val eyes one flip is a 2.2-point
    sensitivity drop: the count says how much power the check had."""
    from tlcompile.evaluate.clinical import percentile_interval, stratified_resample_counts, weighted_auc

    truth = referable_truth(targets, np.asarray(logits).shape[1]).astype(bool)
    ref_score, score = (
        referable_score(np.asarray(reference_logits, np.float64) / temperature),
        referable_score(np.asarray(logits, np.float64) / temperature),
    )
    ref_refer, refer = ref_score >= threshold, score >= threshold
    drops = []
    if truth.any() and (~truth).any():
        for counts in stratified_resample_counts(truth, resamples, seed):
            drops.append(weighted_auc(truth, ref_score, counts) - weighted_auc(truth, score, counts))
    ci = percentile_interval(np.concatenate(drops)) if drops else None
    return {
        "referable": int(truth.sum()),
        "referable_newly_missed": int((truth & ref_refer & ~refer).sum()),
        "referable_newly_caught": int((truth & ~ref_refer & refer).sum()),
        "non_referable": int((~truth).sum()),
        "non_referable_newly_referred": int((~truth & ~ref_refer & refer).sum()),
        "non_referable_no_longer_referred": int((~truth & ref_refer & ~refer).sum()),
        "decisions_changed": int((ref_refer != refer).sum()),
        "n": int(truth.size),
        "auc_drop_ci95": None if ci is None else [round(ci[0], 6), round(ci[1], 6)],
    }


def evidence_text(e: dict[str, Any]) -> str:
    """``3 of 46 referable val eyes newly missed (1 newly caught); 2 of 179 non-referable newly referred;
    ΔAUC 95% CI ...``"""
    text = (
        f"{e['referable_newly_missed']} of {e['referable']} referable val eyes newly missed"
        + (f" ({e['referable_newly_caught']} newly caught)" if e["referable_newly_caught"] else "")
        + f"; {e['non_referable_newly_referred']} of {e['non_referable']} non-referable newly referred"
        + (f" ({e['non_referable_no_longer_referred']} no longer)" if e["non_referable_no_longer_referred"] else "")
    )
    if e.get("auc_drop_ci95"):
        lo, hi = e["auc_drop_ci95"]  # of the drop (reference - new); shown as the change new - reference, in points
        text += f"; ΔAUC 95% CI {-100 * hi + 0.0:+.2f} to {-100 * lo + 0.0:+.2f} pp"
    return text


def limits_of(cfg: Any) -> dict[str, float | None]:
    """The drop limits of a recipe section (prune / quantize), by metric (None = not limited)."""
    return {metric: getattr(cfg, f"max_{metric}_drop") for metric in GUARD_METRICS}


def check(
    candidate: dict[str, float], reference: dict[str, float], *, against: str, limits: dict[str, float | None]
) -> dict[str, Any]:
    """One guard check: ``candidate`` vs ``reference`` val metrics under ``limits``.

    A NaN metric (one class missing from val) cannot show a drop within a limit and fails that limit.
    """
    out: dict[str, Any] = {"against": against, "split": "val"}
    met = True
    for metric in GUARD_METRICS:
        ref, value, limit = reference[metric], candidate[metric], limits.get(metric)
        drop = ref - value
        item: dict[str, Any] = {
            "reference": round_finite(ref),
            "value": round_finite(value),
            "drop": round_finite(drop),
            "max_drop": limit,
        }
        if limit is not None:
            item["met"] = bool(math.isfinite(drop) and drop <= limit + 1e-12)
            met = met and item["met"]
        out[metric] = item
    out["met"] = met
    return out


def excess(result: dict[str, Any]) -> float:
    """How far a check is beyond its limits (sum of drop - limit over the failed metrics; 0 when met)."""
    total = 0.0
    for metric in GUARD_METRICS:
        item = result[metric]
        if item["max_drop"] is None or item.get("met", True):
            continue
        total += math.inf if item["drop"] is None else item["drop"] - item["max_drop"]
    return total


def describe(result: dict[str, Any]) -> str:
    """``val AUC -1.23 pp (limit -1.00 pp), val sensitivity -5.43 pp (limit -2.00 pp)`` for the limited metrics: the
    change new - reference in percentage points, the report's one sign convention."""
    parts = []
    for metric in GUARD_METRICS:
        item = result[metric]
        if item["max_drop"] is not None:
            delta = "n/a" if item["drop"] is None else f"{-100 * item['drop'] + 0.0:+.2f} pp"  # + 0.0: no "-0.00"
            name = "AUC" if metric == "auc" else metric
            parts.append(f"val {name} {delta} (limit {-100 * item['max_drop']:.2f} pp)")
    text = ", ".join(parts) or "no limit set"
    if result.get("evidence"):
        text += f" [{evidence_text(result['evidence'])}]"
    return text


def summarize(checks: list[dict[str, Any]], actions: list[str]) -> dict[str, Any]:
    """The guard record of an artifact: met when every check is met."""
    return {"met": all(c["met"] for c in checks), "checks": checks, "actions": actions}


def referable_log_odds(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """log(p / (1 - p)) of P(referable) = softmax(logits / T) summed over the referable classes (exact for 2 or 5
    classes)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    ref = referable_classes(z.shape[1])
    return logsumexp(z[:, ref]) - logsumexp(z[:, : ref.start])


def realignment_shift(
    logits: np.ndarray,
    targets: np.ndarray,
    reference: dict[str, float],
    *,
    threshold: float,
    temperature: float,
    limits: dict[str, float | None],
) -> float:
    """The log-odds shift of the referable score that best restores the reference's val decisions at ``threshold``.

    A compressed model can rank as well as the reference (same AUC) while its scores sit higher or lower, so that at
    the locked threshold it refers more (or fewer) people. Adding ``delta`` to every referable log-odds moves the
    decision boundary without changing the ranking (AUC is unchanged). Candidates are the midpoints between the
    sorted val log-odds (each gives a different set of decisions) plus 0. The one chosen is the smallest shift that
    brings sensitivity and specificity within their limits (the least change to the model); where none does, the
    one least beyond the limits, then the closest to the reference's sensitivity and specificity.
    """
    lo = referable_log_odds(logits, temperature)
    truth = referable_truth(targets, np.asarray(logits).shape[1]).astype(bool)
    cut = math.log(threshold / (1.0 - threshold))
    pos, neg = max(int(truth.sum()), 1), max(int((~truth).sum()), 1)
    s = np.sort(lo)
    candidates = np.concatenate([[0.0], cut - (s[:-1] + s[1:]) / 2, [cut - s[0] + 1.0, cut - s[-1] - 1.0]])
    best, best_key = 0.0, None
    for delta in candidates:
        refer = lo + delta >= cut
        sens, spec = (refer & truth).sum() / pos, (~refer & ~truth).sum() / neg
        over = 0.0
        for metric, value in (("sensitivity", sens), ("specificity", spec)):
            limit = limits.get(metric)
            if limit is not None:
                over += max(0.0, reference[metric] - value - limit)
        distance = (
            0.0 if over == 0 else round(abs(sens - reference["sensitivity"]) + abs(spec - reference["specificity"]), 12)
        )
        key = (round(over, 12), distance, abs(delta))
        if best_key is None or key < best_key:
            best, best_key = float(delta), key
    return best
