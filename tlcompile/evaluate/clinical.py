"""Clinical evaluation of referable-DR screening with 95% confidence intervals (numpy only, torch-free).

What a screening programme has to show for every artifact, at the one operating point locked on the
validation split of the FP32 model:

- AUC of referable DR with a **stratified percentile bootstrap** CI: referable and non-referable cases are
  resampled separately (as pROC does by default), so every resample has both classes and an AUC.
- Sensitivity, specificity, PPV, NPV and the disagreement rate with **Wilson score** CIs: closed form, and it
  keeps its coverage near 0 and 1 where screening proportions live (the Wald interval collapses there).
- What compression cost: **paired** bootstrap CIs of delta-AUC, delta-sensitivity and delta-specificity against
  the FP32 model, both scored on the same resamples of the same test cases, so case difficulty cancels out.
- 5 grades: quadratic weighted kappa (bootstrap CI on the same resamples) and the confusion matrix.
- Calibration of P(referable): equal-width-bin ECE, Brier score and the reliability bins; temperature scaling
  fitted on validation (Guo et al. 2017) to the NLL of P(referable) when the recipe asks for it.

Bootstrap resamples are drawn from ``np.random.default_rng(seed)`` alone, so every artifact evaluated with the
same seed sees the same resamples: that is what makes the deltas paired.
"""

from __future__ import annotations

from collections.abc import Iterator
from statistics import NormalDist
from typing import Any

import numpy as np

from tlcompile.evaluate.metrics import (
    binary_metrics,
    logsumexp,
    operating_point,
    referable_score,
    referable_truth,
    roc_auc,
    roc_curve,
    round_finite,
)

CI_LEVEL = 0.95
# Resamples processed at once: bounds the (chunk x cases) count matrix to a few MB even for 10k test images.
BOOTSTRAP_CHUNK = 128
ENDPOINT_METRICS = {"min_sensitivity": "sensitivity", "min_specificity": "specificity", "min_auc": "auc"}
# How each interval is computed, written into report.json so a reader of the report knows without the code.
CI_METHODS = {
    "auc": "stratified percentile bootstrap",
    "sensitivity, specificity, ppv, npv, disagreement": "Wilson score interval",
    "delta_auc, delta_sensitivity, delta_specificity": "paired stratified percentile bootstrap "
    "(same resamples as the FP32 row)",
    "qwk": "stratified percentile bootstrap",
}


# ------------------------------------------------------------------------------------- proportions
def wilson_interval(successes: int, n: int, level: float = CI_LEVEL) -> tuple[float, float] | None:
    """Wilson score interval of a binomial proportion; None when there are no trials."""
    if n <= 0:
        return None
    z = NormalDist().inv_cdf(0.5 + level / 2)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, float(centre - half)), min(1.0, float(centre + half))


def proportion(successes: int, n: int) -> dict[str, Any]:
    """``{"value", "ci", "k", "n"}`` with a Wilson 95% CI; value and ci are None when n is 0."""
    ci = wilson_interval(successes, n)
    return {"value": successes / n if n else None, "ci": list(ci) if ci else None, "k": int(successes), "n": int(n)}


def percentile_interval(samples: np.ndarray, level: float = CI_LEVEL) -> list[float] | None:
    """Percentile bootstrap interval over the finite samples; None when fewer than two are finite."""
    finite = np.asarray(samples, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size < 2:
        return None
    lo, hi = np.percentile(finite, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return [float(lo), float(hi)]


# --------------------------------------------------------------------------------------- bootstrap
def stratified_resample_counts(
    truth: np.ndarray, resamples: int, seed: int, chunk: int = BOOTSTRAP_CHUNK
) -> Iterator[np.ndarray]:
    """Yield (b, n) matrices: how often each case appears in each bootstrap resample.

    Positives and negatives are resampled within their class (stratified), so the class counts of every resample
    equal those of the test set. Counts instead of index lists let one weighted pass score every statistic.
    """
    truth = np.asarray(truth).astype(bool)
    n = truth.size
    rng = np.random.default_rng(seed)
    positives, negatives = np.flatnonzero(truth), np.flatnonzero(~truth)
    for start in range(0, resamples, chunk):
        b = min(chunk, resamples - start)
        # One uniform per draw, filled row by row from the stream, so the resamples do not depend on the chunk size.
        u = rng.random((b, n))
        draws = np.concatenate(
            [
                positives[(u[:, : positives.size] * positives.size).astype(np.int64)],
                negatives[(u[:, positives.size :] * negatives.size).astype(np.int64)],
            ],
            axis=1,
        )
        counts = np.bincount((draws + (n * np.arange(b))[:, None]).ravel(), minlength=b * n)
        yield counts.reshape(b, n)


def _group_sums(weights: np.ndarray, group: np.ndarray, num_groups: int) -> np.ndarray:
    """(b, m) weights of m cases summed into (b, num_groups) by each case's group index."""
    b = weights.shape[0]
    index = group[None, :] + num_groups * np.arange(b)[:, None]
    return np.bincount(index.ravel(), weights=weights.ravel(), minlength=b * num_groups).reshape(b, num_groups)


def weighted_auc(truth: np.ndarray, score: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """AUC under each row of case weights ``counts`` (b, n); ties count one half, as in :func:`roc_auc`.

    Mann-Whitney with weights: group the cases by distinct score; a positive beats every negative in a lower
    group and half of those in its own group. O(b * n) after one sort, instead of b sorts.
    """
    truth = np.asarray(truth).astype(bool)
    counts = np.atleast_2d(counts).astype(np.float64)
    values, group = np.unique(np.asarray(score, dtype=np.float64), return_inverse=True)
    pos = _group_sums(counts[:, truth], group[truth], values.size)
    neg = _group_sums(counts[:, ~truth], group[~truth], values.size)
    neg_below = np.cumsum(neg, axis=1) - neg
    wins = (pos * (neg_below + 0.5 * neg)).sum(axis=1)
    pairs = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, wins / np.where(pairs > 0, pairs, 1), np.nan)


def weighted_rate(hit: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Weighted fraction of ``hit`` among the cases of ``counts`` (b, m); NaN where a row has no weight."""
    counts = np.atleast_2d(counts).astype(np.float64)
    total = counts.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, counts @ np.asarray(hit, dtype=np.float64) / np.where(total > 0, total, 1), np.nan)


# -------------------------------------------------------------------------------------------- grades
def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) counts; rows are the truth, columns the prediction."""
    t, p = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _qwk_from_confusion(observed: np.ndarray) -> np.ndarray:
    """Quadratic weighted kappa of each (b, K, K) confusion matrix; NaN where it is undefined."""
    observed = np.asarray(observed, dtype=np.float64)
    k = observed.shape[-1]
    i, j = np.indices((k, k))
    weights = (i - j) ** 2 / max((k - 1) ** 2, 1)
    total = observed.sum(axis=(1, 2))
    safe_total = np.where(total > 0, total, 1)
    expected = observed.sum(axis=2)[:, :, None] * observed.sum(axis=1)[:, None, :] / safe_total[:, None, None]
    disagreement_expected = (weights * expected).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(
            disagreement_expected > 0, 1 - (weights * observed).sum(axis=(1, 2)) / disagreement_expected, np.nan
        )


def quadratic_weighted_kappa(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    """Cohen's kappa with quadratic weights (the Kaggle/APTOS DR grading metric)."""
    return float(_qwk_from_confusion(confusion_matrix(y_true, y_pred, num_classes)[None])[0])


# --------------------------------------------------------------------------------------- calibration
def brier_score(truth: np.ndarray, prob: np.ndarray) -> float:
    """Mean squared error of P(referable) against the 0/1 truth."""
    t, p = np.asarray(truth, dtype=np.float64), np.asarray(prob, dtype=np.float64)
    return float(np.mean((p - t) ** 2)) if t.size else float("nan")


def reliability_bins(truth: np.ndarray, prob: np.ndarray, bins: int = 10) -> list[dict[str, Any]]:
    """Equal-width bins of P(referable) on [0, 1]: cases, mean predicted probability and observed referable rate."""
    t, p = np.asarray(truth, dtype=np.float64), np.asarray(prob, dtype=np.float64)
    which = np.clip(np.floor(p * bins).astype(np.int64), 0, bins - 1)  # p == 1.0 falls in the last bin
    n = np.bincount(which, minlength=bins)
    sum_p = np.bincount(which, weights=p, minlength=bins)
    sum_t = np.bincount(which, weights=t, minlength=bins)
    out = []
    for b in range(bins):
        out.append(
            {
                "lo": b / bins,
                "hi": (b + 1) / bins,
                "n": int(n[b]),
                "mean_predicted": float(sum_p[b] / n[b]) if n[b] else None,
                "observed": float(sum_t[b] / n[b]) if n[b] else None,
            }
        )
    return out


def expected_calibration_error(truth: np.ndarray, prob: np.ndarray, bins: int = 10) -> float:
    """ECE of P(referable): case-weighted mean |observed referable rate - mean predicted| over equal-width bins."""
    table = reliability_bins(truth, prob, bins)
    total = sum(b["n"] for b in table)
    if not total:
        return float("nan")
    return float(sum(b["n"] * abs(b["observed"] - b["mean_predicted"]) for b in table if b["n"]) / total)


def calibration_summary(truth: np.ndarray, prob: np.ndarray, bins: int = 10) -> dict[str, Any]:
    return {
        "ece": expected_calibration_error(truth, prob, bins),
        "brier": brier_score(truth, prob),
        "bins": reliability_bins(truth, prob, bins),
    }


def referable_nll(logits: np.ndarray, targets: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the referable-DR truth under P(referable) from softmax(logits / temperature).

    For the 2-class task this is the usual cross-entropy; for 5 grades it scores the summed P(grade >= 2), the
    probability the referral decision uses. Computed with log-sum-exp, so confident logits do not overflow.
    """
    z = np.asarray(logits, dtype=np.float64) / temperature
    first_referable = 1 if z.shape[1] == 2 else 2
    truth = referable_truth(targets, z.shape[1]).astype(bool)
    total = logsumexp(z)
    log_referable = logsumexp(z[:, first_referable:]) - total
    log_non_referable = logsumexp(z[:, :first_referable]) - total
    return float(-np.where(truth, log_referable, log_non_referable).mean())


def fit_temperature(
    logits: np.ndarray, targets: np.ndarray, *, low: float = 0.05, high: float = 20.0, iterations: int = 60
) -> float:
    """Temperature T on [low, high] minimising the validation :func:`referable_nll` (Guo et al. 2017, on P(referable)).

    A log-spaced scan brackets the minimum, then golden-section search on log T refines it: for 2 classes the NLL is
    convex in 1/T and the scan is only a bracket; for 5 grades the summed probability need not be, and the scan
    keeps the search off a local dip. The answer sits on a bound when val is separated perfectly (the NLL keeps
    falling as T -> 0) or the model is no better than chance (T -> infinity); the bounds keep it finite.
    """
    logits, targets = np.asarray(logits, dtype=np.float64), np.asarray(targets, dtype=np.int64)
    if targets.size == 0:
        raise ValueError("fit_temperature needs at least one validation case")
    grid = np.geomspace(low, high, 41)
    i = int(np.argmin([referable_nll(logits, targets, t) for t in grid]))
    a, b = np.log(grid[max(i - 1, 0)]), np.log(grid[min(i + 1, grid.size - 1)])

    def nll(log_t: float) -> float:
        return referable_nll(logits, targets, float(np.exp(log_t)))

    ratio = (np.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = nll(c), nll(d)
    for _ in range(iterations):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = nll(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = nll(d)
    return float(np.exp((a + b) / 2))


# ---------------------------------------------------------------------------------- operating point
def lock_operating_point(
    val_logits: np.ndarray,
    val_targets: np.ndarray,
    *,
    method: str = "youden",
    target_sensitivity: float | None = None,
    temperature_scaling: bool = False,
) -> dict[str, Any]:
    """Fit the temperature (if asked) and lock the referral threshold on the FP32 model's validation logits.

    Every artifact is later judged with this same temperature and threshold: the decision rule is validated once,
    and what compression changes shows up as a change in sensitivity and specificity, not a new threshold.
    """
    val_logits = np.asarray(val_logits, dtype=np.float64)
    temperature = fit_temperature(val_logits, val_targets) if temperature_scaling else 1.0
    truth = referable_truth(val_targets, val_logits.shape[1])
    score = referable_score(val_logits / temperature)
    threshold = operating_point(truth, score, method=method, target_sensitivity=target_sensitivity)
    at_threshold = binary_metrics(truth, score, threshold)
    return {
        "threshold": float(threshold),
        "method": method,
        "target_sensitivity": target_sensitivity if method == "sensitivity" else None,
        "temperature": float(temperature),
        "val": {
            "n": int(truth.size),
            "referable": int(truth.sum()),
            "auc": round_finite(roc_auc(truth, score), digits=None),
            "sensitivity": round_finite(at_threshold["sensitivity"], digits=None),
            "specificity": round_finite(at_threshold["specificity"], digits=None),
            "nll_before": referable_nll(val_logits, val_targets, 1.0),
            "nll_after": referable_nll(val_logits, val_targets, temperature),
        },
    }


# ---------------------------------------------------------------------------------------- per artifact
def compact_roc(truth: np.ndarray, score: np.ndarray, decimals: int = 4) -> dict[str, list[float]]:
    """ROC points with the collinear ones dropped (the corners draw the same curve), rounded for report.json."""
    fpr, tpr, _ = roc_curve(truth, score)
    if fpr.size > 2:
        keep = np.r_[True, np.logical_or(np.diff(fpr, 2) != 0, np.diff(tpr, 2) != 0), True]
        fpr, tpr = fpr[keep], tpr[keep]
    return {"fpr": np.round(fpr, decimals).tolist(), "tpr": np.round(tpr, decimals).tolist()}


def clinical_evaluation(
    logits: np.ndarray,
    targets: np.ndarray,
    *,
    threshold: float,
    temperature: float = 1.0,
    reference_logits: np.ndarray | None = None,
    resamples: int = 2000,
    seed: int = 0,
    calibration_bins: int = 10,
) -> dict[str, Any]:
    """Everything the report shows about one artifact on the test split, at the locked operating point.

    ``targets`` are the task targets (0/1 referable, or grades 0-4 for a 5-class model). ``reference_logits`` are
    the FP32 model's logits on the same cases in the same order; with them come the paired deltas and the
    disagreement rate. Undefined values (one class absent) are None, so report.json stays valid JSON.
    """
    logits = np.asarray(logits, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    if logits.shape[0] != targets.size:
        raise ValueError(f"{logits.shape[0]} logit rows for {targets.size} targets")
    num_classes = logits.shape[1]
    truth = referable_truth(targets, num_classes).astype(bool)
    score = referable_score(logits / temperature)
    refer = score >= threshold
    tp, fn = int((refer & truth).sum()), int((~refer & truth).sum())
    fp, tn = int((refer & ~truth).sum()), int((~refer & ~truth).sum())
    out: dict[str, Any] = {
        "n": int(truth.size),
        "referable": int(truth.sum()),
        "threshold": float(threshold),
        "temperature": float(temperature),
        "auc": {"value": round_finite(roc_auc(truth, score), digits=None), "ci": None},
        "sensitivity": proportion(tp, tp + fn),
        "specificity": proportion(tn, tn + fp),
        "ppv": proportion(tp, tp + fp),
        "npv": proportion(tn, tn + fn),
        # rows: truth (non-referable, referable); columns: the referral decision.
        "referral_confusion": [[tn, fp], [fn, tp]],
        "roc": compact_roc(truth, score),
        "calibration": calibration_summary(truth, score, calibration_bins),
    }
    if temperature != 1.0:
        out["calibration_unscaled"] = calibration_summary(truth, referable_score(logits), calibration_bins)
    grading = num_classes > 2
    if grading:
        predicted_grade = logits.argmax(axis=1)
        out["grading"] = {
            "qwk": {
                "value": round_finite(quadratic_weighted_kappa(targets, predicted_grade, num_classes), digits=None),
                "ci": None,
            },
            "confusion": confusion_matrix(targets, predicted_grade, num_classes).tolist(),
            "accuracy": float((predicted_grade == targets).mean()) if targets.size else None,
        }

    reference = None
    if reference_logits is not None:
        reference_logits = np.asarray(reference_logits, dtype=np.float64)
        if reference_logits.shape != logits.shape:
            raise ValueError(f"reference logits {reference_logits.shape} do not match logits {logits.shape}")
        reference_score = referable_score(reference_logits / temperature)
        reference_refer = reference_score >= threshold
        changed = refer != reference_refer
        reference = {
            "delta_auc": {"value": _difference(out["auc"]["value"], roc_auc(truth, reference_score)), "ci": None},
            "delta_sensitivity": {
                "value": _difference(
                    refer[truth].mean() if tp + fn else None, reference_refer[truth].mean() if tp + fn else None
                ),
                "ci": None,
            },
            "delta_specificity": {
                "value": _difference(
                    (~refer[~truth]).mean() if tn + fp else None, (~reference_refer[~truth]).mean() if tn + fp else None
                ),
                "ci": None,
            },
            "disagreement": proportion(int(changed.sum()), truth.size),
            "newly_referred": int((refer & ~reference_refer).sum()),
            "no_longer_referred": int((~refer & reference_refer).sum()),
            "missed_referable": int(
                (~refer & reference_refer & truth).sum()
            ),  # referable cases FP32 caught and this one misses
        }
        out["vs_reference"] = reference

    # One pass over the resamples scores every bootstrap statistic on the same resampled cases.
    samples: dict[str, list[np.ndarray]] = {
        "auc": [],
        "qwk": [],
        "delta_auc": [],
        "delta_sensitivity": [],
        "delta_specificity": [],
    }
    if resamples > 0 and truth.any() and (~truth).any():
        for counts in stratified_resample_counts(truth, resamples, seed):
            auc = weighted_auc(truth, score, counts)
            samples["auc"].append(auc)
            if grading:
                confusion = _group_sums(
                    counts.astype(np.float64), targets * num_classes + predicted_grade, num_classes * num_classes
                )
                samples["qwk"].append(_qwk_from_confusion(confusion.reshape(-1, num_classes, num_classes)))
            if reference is not None:
                samples["delta_auc"].append(auc - weighted_auc(truth, reference_score, counts))
                pos, neg = counts[:, truth], counts[:, ~truth]
                samples["delta_sensitivity"].append(
                    weighted_rate(refer[truth], pos) - weighted_rate(reference_refer[truth], pos)
                )
                samples["delta_specificity"].append(
                    weighted_rate(~refer[~truth], neg) - weighted_rate(~reference_refer[~truth], neg)
                )
        out["auc"]["ci"] = percentile_interval(np.concatenate(samples["auc"]))
        if grading:
            out["grading"]["qwk"]["ci"] = percentile_interval(np.concatenate(samples["qwk"]))
        if reference is not None:
            for key in ("delta_auc", "delta_sensitivity", "delta_specificity"):
                reference[key]["ci"] = percentile_interval(np.concatenate(samples[key]))
    return out


def judge_endpoints(
    clinical: dict[str, Any], endpoints: dict[str, float | None], rule: str = "point_estimate"
) -> dict[str, Any]:
    """Pass/fail of each endpoint set in the recipe (``min_sensitivity: 0.85`` ...) for one artifact.

    rule ``point_estimate`` compares the measured value (as IDx-DR's pivotal trial reported its endpoints);
    ``ci_lower_bound`` demands the lower 95% bound clear the target, the stricter claim. ``pass`` is None when the
    recipe sets no endpoint, and False when a metric is undefined (e.g. no referable case in the test split).
    """
    if rule not in ("point_estimate", "ci_lower_bound"):
        raise ValueError(f"unknown endpoint rule {rule!r}; valid: point_estimate, ci_lower_bound")
    checks: dict[str, Any] = {}
    for key, target in endpoints.items():
        if target is None:
            continue
        if key not in ENDPOINT_METRICS:
            raise ValueError(f"unknown endpoint {key!r}; valid: {', '.join(ENDPOINT_METRICS)}")
        measured = clinical[ENDPOINT_METRICS[key]]
        value, ci = measured.get("value"), measured.get("ci")
        judged = value if rule == "point_estimate" else (ci[0] if ci else None)
        checks[key] = {
            "target": float(target),
            "value": value,
            "ci_low": ci[0] if ci else None,
            "pass": judged is not None and judged >= target,
        }
    return {"rule": rule, "checks": checks, "pass": all(c["pass"] for c in checks.values()) if checks else None}


def _difference(a: Any, b: Any) -> float | None:
    a, b = round_finite(a, digits=None), round_finite(b, digits=None)
    return None if a is None or b is None else a - b


def add_clinical_to_rows(
    rows: list[dict[str, Any]],
    row_logits: list[np.ndarray | None],
    targets: np.ndarray,
    *,
    threshold: float,
    temperature: float = 1.0,
    endpoints: dict[str, float | None] | None = None,
    endpoint_rule: str = "point_estimate",
    resamples: int = 2000,
    seed: int = 0,
    calibration_bins: int = 10,
    reference_name: str = "fp32",
) -> None:
    """Add ``clinical`` to each report row (``name``, ``runtime``) that has test logits (``row_logits[i]``).

    Each row is paired with the ``reference_name`` row of the same runtime (same cases, same bootstrap resamples),
    so the deltas measure what compression cost on that runtime rather than a runtime difference; a runtime with
    no reference row falls back to the first reference row there is.
    """
    references = [
        (row, logits)
        for row, logits in zip(rows, row_logits, strict=True)
        if row["name"] == reference_name and logits is not None
    ]
    for row, logits in zip(rows, row_logits, strict=True):
        if logits is None:
            continue
        reference = None
        if row["name"] != reference_name and references:
            reference = next((ref for ref in references if ref[0]["runtime"] == row["runtime"]), references[0])
        clinical = clinical_evaluation(
            logits,
            targets,
            threshold=threshold,
            temperature=temperature,
            reference_logits=reference[1] if reference else None,
            resamples=resamples,
            seed=seed,
            calibration_bins=calibration_bins,
        )
        if reference is not None:
            clinical["vs_reference"]["reference"] = f"{reference[0]['name']} on {reference[0]['runtime']}"
        clinical["endpoints"] = judge_endpoints(clinical, endpoints or {}, endpoint_rule)
        row["clinical"] = clinical
