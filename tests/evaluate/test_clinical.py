"""Clinical metrics: checked against scikit-learn / scipy, hand-computed cases and coverage simulations."""

from __future__ import annotations

import json
import subprocess
import sys
from statistics import NormalDist

import numpy as np
import pytest
from scipy.stats import binomtest
from sklearn.metrics import brier_score_loss, cohen_kappa_score, log_loss, roc_auc_score
from sklearn.metrics import confusion_matrix as sk_confusion_matrix

from tlcompile.evaluate.clinical import (
    add_clinical_to_rows,
    brier_score,
    clinical_evaluation,
    confusion_matrix,
    expected_calibration_error,
    fit_temperature,
    judge_endpoints,
    lock_operating_point,
    percentile_interval,
    proportion,
    quadratic_weighted_kappa,
    referable_nll,
    reliability_bins,
    stratified_resample_counts,
    weighted_auc,
    weighted_rate,
    wilson_interval,
)
from tlcompile.evaluate.metrics import binary_metrics, referable_score, roc_auc


def binary_logits(
    truth: np.ndarray, rng: np.random.Generator, separation: float = 2.0, noise: float = 1.0
) -> np.ndarray:
    """Two-class logits whose log-odds are a noisy function of the truth."""
    return np.c_[np.zeros(truth.size), separation * (truth - 0.5) + rng.normal(scale=noise, size=truth.size)]


# ------------------------------------------------------------------------------------------ proportions
@pytest.mark.parametrize(("k", "n"), [(0, 10), (1, 10), (8, 10), (10, 10), (141, 163), (5, 200)])
def test_wilson_interval_matches_scipy(k, n):
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-12)


def test_proportion_is_none_without_cases():
    assert proportion(0, 0) == {"value": None, "ci": None, "k": 0, "n": 0}
    p = proportion(87, 100)
    assert p["value"] == 0.87 and p["ci"][0] < 0.87 < p["ci"][1]


def test_wilson_coverage_near_nominal_at_screening_proportions():
    # At p = 0.9 and n = 40 (a small clinic's referable test cases) the Wilson interval still covers ~95%.
    rng = np.random.default_rng(0)
    draws = rng.binomial(40, 0.9, size=4000)
    covered = np.mean([lo <= 0.9 <= hi for lo, hi in (wilson_interval(int(k), 40) for k in draws)])
    assert 0.92 <= covered <= 0.98


# -------------------------------------------------------------------------------------------- bootstrap
def test_resample_counts_are_stratified_and_reproducible():
    truth = np.array([1] * 7 + [0] * 13)
    chunks = list(stratified_resample_counts(truth, 300, seed=5, chunk=128))
    counts = np.concatenate(chunks)
    assert [c.shape[0] for c in chunks] == [128, 128, 44]
    assert (counts.sum(axis=1) == 20).all()
    assert (counts[:, truth == 1].sum(axis=1) == 7).all()  # class sizes never change
    assert (counts >= 0).all() and counts.std() > 0
    again = np.concatenate(list(stratified_resample_counts(truth, 300, seed=5, chunk=64)))
    assert np.array_equal(counts, again)  # the chunk size (a memory bound) does not change the resamples
    other = np.concatenate(list(stratified_resample_counts(truth, 300, seed=6)))
    assert not np.array_equal(counts, other)


def test_resample_counts_are_uniform_over_cases():
    # Each case is drawn with probability 1 / class size: mean count 1 per resample, for every case.
    truth = np.array([1] * 5 + [0] * 15)
    counts = np.concatenate(list(stratified_resample_counts(truth, 4000, seed=0)))
    assert counts.mean(axis=0) == pytest.approx(np.ones(20), abs=0.08)


@pytest.mark.parametrize("seed", range(3))
def test_weighted_auc_matches_sklearn_sample_weight_with_ties(seed):
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 2, 80)
    score = np.round(rng.normal(size=80) + truth, 1)  # many ties
    counts = next(stratified_resample_counts(truth, 20, seed=seed))
    got = weighted_auc(truth, score, counts)
    want = [roc_auc_score(truth, score, sample_weight=c) for c in counts]
    assert got == pytest.approx(want, abs=1e-12)
    # Unit weights give the plain AUC.
    assert weighted_auc(truth, score, np.ones((1, 80)))[0] == pytest.approx(roc_auc(truth, score), abs=1e-12)


def test_weighted_auc_equals_auc_of_the_materialised_resample():
    rng = np.random.default_rng(3)
    truth = rng.integers(0, 2, 60)
    score = rng.normal(size=60) + truth
    counts = next(stratified_resample_counts(truth, 5, seed=0))
    for row, value in zip(counts, weighted_auc(truth, score, counts), strict=True):
        idx = np.repeat(np.arange(60), row)
        assert value == pytest.approx(roc_auc(truth[idx], score[idx]), abs=1e-12)


def test_weighted_rate():
    hit = np.array([1, 0, 1, 1])
    assert weighted_rate(hit, np.array([[1, 1, 1, 1], [0, 2, 1, 1], [0, 0, 0, 0]])) == pytest.approx(
        [0.75, 0.5, np.nan], nan_ok=True
    )


def test_percentile_interval_ignores_nan_and_needs_two_values():
    assert percentile_interval(np.array([np.nan, 1.0])) is None
    lo, hi = percentile_interval(np.r_[np.arange(1001.0), np.nan])
    assert (lo, hi) == pytest.approx((25.0, 975.0))


def test_auc_bootstrap_ci_covers_the_true_auc_about_95_percent():
    # Binormal model: scores N(0,1) vs N(d,1) have AUC = Phi(d / sqrt 2) exactly.
    d, n_pos, n_neg = 1.2, 60, 90
    true_auc = NormalDist().cdf(d / np.sqrt(2))
    rng = np.random.default_rng(11)
    truth = np.r_[np.ones(n_pos), np.zeros(n_neg)].astype(int)
    covered, widths = [], []
    for _ in range(150):
        score = np.r_[rng.normal(d, 1, n_pos), rng.normal(0, 1, n_neg)]
        logits = np.c_[np.zeros(truth.size), score]
        ci = clinical_evaluation(logits, truth, threshold=0.5, resamples=400, seed=int(rng.integers(1 << 30)))["auc"][
            "ci"
        ]
        covered.append(ci[0] <= true_auc <= ci[1])
        widths.append(ci[1] - ci[0])
    assert 0.88 <= np.mean(covered) <= 0.99
    # Hanley-McNeil standard error for this design is ~0.032, so a 95% interval is ~0.12 wide.
    assert 0.09 < np.mean(widths) < 0.16


# -------------------------------------------------------------------------------------- per artifact
def test_screening_counts_and_confusion_are_at_the_threshold():
    truth = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    p = np.array([0.9, 0.6, 0.3, 0.7, 0.2, 0.1, 0.4, 0.55])
    logits = np.c_[np.zeros(8), np.log(p / (1 - p))]
    out = clinical_evaluation(logits, truth, threshold=0.5, resamples=200)
    assert out["referral_confusion"] == [[3, 1], [1, 3]]  # rows truth (non-ref, ref); columns (not referred, referred)
    assert out["sensitivity"]["value"] == 0.75 and out["sensitivity"]["k"] == 3 and out["sensitivity"]["n"] == 4
    assert out["specificity"]["value"] == 0.75 and out["ppv"]["value"] == 0.75 and out["npv"]["value"] == 0.75
    assert out["sensitivity"]["ci"] == pytest.approx(list(wilson_interval(3, 4)))
    assert out["auc"]["value"] == pytest.approx(roc_auc(truth, p))
    assert out["roc"]["fpr"][0] == 0.0 and out["roc"]["tpr"][-1] == 1.0
    json.dumps(out, allow_nan=False)  # valid JSON: undefined values are None, never NaN


def test_identical_models_have_zero_deltas_and_no_disagreement():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 2, 120)
    logits = binary_logits(truth, rng)
    ref = clinical_evaluation(logits, truth, threshold=0.5, reference_logits=logits.copy(), resamples=300)[
        "vs_reference"
    ]
    for key in ("delta_auc", "delta_sensitivity", "delta_specificity"):
        assert ref[key]["value"] == 0.0 and ref[key]["ci"] == [0.0, 0.0]
    assert ref["disagreement"]["value"] == 0.0 and ref["disagreement"]["k"] == 0
    assert ref["newly_referred"] == ref["no_longer_referred"] == ref["missed_referable"] == 0


def test_paired_deltas_count_flips_and_are_tighter_than_unpaired():
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 2, 300)
    fp32 = binary_logits(truth, rng)
    compressed = fp32 + rng.normal(scale=0.3, size=fp32.shape)
    out = clinical_evaluation(compressed, truth, threshold=0.5, reference_logits=fp32, resamples=1000, seed=3)
    ref = out["vs_reference"]
    refer, fp32_refer = referable_score(compressed) >= 0.5, referable_score(fp32) >= 0.5
    assert ref["disagreement"]["k"] == int((refer != fp32_refer).sum())
    assert ref["newly_referred"] == int((refer & ~fp32_refer).sum())
    assert ref["no_longer_referred"] == int((~refer & fp32_refer).sum())
    assert ref["missed_referable"] == int((~refer & fp32_refer & (truth == 1)).sum())
    assert ref["delta_auc"]["value"] == pytest.approx(
        roc_auc(truth, referable_score(compressed)) - roc_auc(truth, referable_score(fp32))
    )
    sens = (
        binary_metrics(truth, referable_score(compressed), 0.5)["sensitivity"]
        - binary_metrics(truth, referable_score(fp32), 0.5)["sensitivity"]
    )
    assert ref["delta_sensitivity"]["value"] == pytest.approx(sens)
    lo, hi = ref["delta_auc"]["ci"]
    assert lo <= ref["delta_auc"]["value"] <= hi
    # Pairing cancels case difficulty: the delta's interval is far narrower than either AUC's own interval.
    auc_lo, auc_hi = out["auc"]["ci"]
    assert hi - lo < 0.5 * (auc_hi - auc_lo)


def test_a_worse_model_has_a_negative_delta_auc_interval():
    rng = np.random.default_rng(2)
    truth = rng.integers(0, 2, 400)
    fp32 = binary_logits(truth, rng, separation=3.0, noise=0.8)
    broken = fp32 + rng.normal(scale=3.0, size=fp32.shape)
    ci = clinical_evaluation(broken, truth, threshold=0.5, reference_logits=fp32, resamples=500)["vs_reference"][
        "delta_auc"
    ]["ci"]
    assert ci[1] < 0


def test_one_class_test_split_gives_none_not_nan():
    truth = np.zeros(10, dtype=int)
    logits = binary_logits(truth, np.random.default_rng(0))
    out = clinical_evaluation(logits, truth, threshold=0.5, reference_logits=logits, resamples=200)
    assert out["auc"] == {"value": None, "ci": None}
    assert out["sensitivity"]["value"] is None and out["sensitivity"]["ci"] is None
    assert out["vs_reference"]["delta_sensitivity"]["value"] is None
    json.dumps(out, allow_nan=False)


def test_mismatched_shapes_are_rejected():
    with pytest.raises(ValueError, match="logit rows"):
        clinical_evaluation(np.zeros((3, 2)), np.zeros(4, dtype=int), threshold=0.5)
    with pytest.raises(ValueError, match="reference logits"):
        clinical_evaluation(np.zeros((3, 2)), np.zeros(3, dtype=int), threshold=0.5, reference_logits=np.zeros((4, 2)))


# --------------------------------------------------------------------------------------------- grades
def test_kappa_and_confusion_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 300)
    pred = np.clip(y + rng.integers(-1, 2, 300), 0, 4)
    assert quadratic_weighted_kappa(y, pred, 5) == pytest.approx(
        cohen_kappa_score(y, pred, weights="quadratic"), abs=1e-12
    )
    assert np.array_equal(confusion_matrix(y, pred, 5), sk_confusion_matrix(y, pred, labels=range(5)))
    assert quadratic_weighted_kappa(y, y, 5) == 1.0


def test_grade_evaluation_has_kappa_with_ci_and_a_5x5_matrix():
    rng = np.random.default_rng(4)
    grades = rng.integers(0, 5, 250)
    latent = grades + rng.normal(scale=0.8, size=grades.size)
    logits = -((latent[:, None] - np.arange(5)[None, :]) ** 2)
    out = clinical_evaluation(logits, grades, threshold=0.5, resamples=400)
    g = out["grading"]
    assert np.array(g["confusion"]).shape == (5, 5) and np.array(g["confusion"]).sum() == 250
    assert g["qwk"]["value"] == pytest.approx(cohen_kappa_score(grades, logits.argmax(1), weights="quadratic"))
    assert g["qwk"]["ci"][0] < g["qwk"]["value"] < g["qwk"]["ci"][1]
    # Referable DR for 5 grades is grade >= 2.
    assert out["referable"] == int((grades >= 2).sum())


# ---------------------------------------------------------------------------------------- calibration
def test_ece_brier_and_bins_by_hand():
    truth = np.array([0, 0, 1, 1, 1])
    prob = np.array([0.05, 0.15, 0.15, 0.95, 1.0])
    bins = reliability_bins(truth, prob, bins=10)
    assert [b["n"] for b in bins] == [1, 2, 0, 0, 0, 0, 0, 0, 0, 2]  # 1.0 falls in the last bin
    assert bins[1]["observed"] == 0.5 and bins[1]["mean_predicted"] == pytest.approx(0.15)
    # |0-0.05|*1 + |0.5-0.15|*2 + |1-0.975|*2, over 5 cases
    assert expected_calibration_error(truth, prob, 10) == pytest.approx((0.05 + 0.7 + 0.05) / 5)
    assert brier_score(truth, prob) == pytest.approx(brier_score_loss(truth, prob))


def test_referable_nll_matches_log_loss():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 2, 100)
    logits = binary_logits(truth, rng)
    assert referable_nll(logits, truth) == pytest.approx(log_loss(truth, referable_score(logits)), abs=1e-9)
    grades = rng.integers(0, 5, 100)
    glogits = rng.normal(size=(100, 5))
    assert referable_nll(glogits, grades, 2.0) == pytest.approx(
        log_loss(grades >= 2, referable_score(glogits / 2.0)), abs=1e-9
    )
    assert np.isfinite(referable_nll(logits * 1e4, truth))  # confident logits do not overflow


def test_temperature_recovers_overconfidence_and_improves_calibration():
    rng = np.random.default_rng(7)
    n = 4000
    log_odds = rng.normal(scale=2.0, size=n)
    truth = (rng.random(n) < 1 / (1 + np.exp(-log_odds))).astype(int)  # calibrated by construction
    overconfident = np.c_[np.zeros(n), 3.0 * log_odds]
    t = fit_temperature(overconfident, truth)
    assert t == pytest.approx(3.0, rel=0.1)
    grid = np.geomspace(0.5, 10, 400)
    assert referable_nll(overconfident, truth, t) <= min(referable_nll(overconfident, truth, g) for g in grid) + 1e-9
    before = expected_calibration_error(truth, referable_score(overconfident))
    after = expected_calibration_error(truth, referable_score(overconfident / t))
    assert after < 0.5 * before


def test_temperature_on_separated_data_stays_finite():
    truth = np.array([0, 0, 1, 1])
    logits = np.c_[np.zeros(4), [-5.0, -4.0, 4.0, 5.0]]
    t = fit_temperature(logits, truth)
    assert 0.05 <= t <= 0.06  # the NLL falls towards T -> 0: the lower bound


def test_evaluation_reports_calibration_before_and_after_temperature():
    rng = np.random.default_rng(8)
    truth = rng.integers(0, 2, 200)
    logits = binary_logits(truth, rng) * 4
    out = clinical_evaluation(logits, truth, threshold=0.5, temperature=4.0, resamples=100)
    assert out["calibration_unscaled"]["brier"] == pytest.approx(brier_score(truth, referable_score(logits)))
    assert out["calibration"]["brier"] == pytest.approx(brier_score(truth, referable_score(logits / 4.0)))
    assert "calibration_unscaled" not in clinical_evaluation(logits, truth, threshold=0.5, resamples=100)


# ---------------------------------------------------------------------------------- operating point
def test_operating_point_reaches_the_target_sensitivity_on_val():
    rng = np.random.default_rng(9)
    truth = rng.integers(0, 2, 300)
    logits = binary_logits(truth, rng)
    op = lock_operating_point(logits, truth, method="sensitivity", target_sensitivity=0.87)
    assert op["val"]["sensitivity"] >= 0.87 and op["target_sensitivity"] == 0.87 and op["temperature"] == 1.0
    assert binary_metrics(truth, referable_score(logits), op["threshold"])["sensitivity"] == op["val"]["sensitivity"]
    youden = lock_operating_point(logits, truth)
    assert youden["method"] == "youden" and youden["target_sensitivity"] is None
    assert (
        youden["val"]["sensitivity"] + youden["val"]["specificity"]
        >= op["val"]["sensitivity"] + op["val"]["specificity"]
    )


def test_temperature_does_not_change_binary_decisions():
    # For 2 classes P(referable) is monotone in logits / T, so the locked decisions on val are the same.
    rng = np.random.default_rng(10)
    truth = rng.integers(0, 2, 300)
    logits = binary_logits(truth, rng) * 5
    plain = lock_operating_point(logits, truth, method="sensitivity", target_sensitivity=0.9)
    scaled = lock_operating_point(logits, truth, method="sensitivity", target_sensitivity=0.9, temperature_scaling=True)
    assert scaled["temperature"] > 2
    assert (
        scaled["val"]["sensitivity"] == plain["val"]["sensitivity"]
        and scaled["val"]["specificity"] == plain["val"]["specificity"]
    )
    assert scaled["val"]["nll_after"] < scaled["val"]["nll_before"]


# ------------------------------------------------------------------------------------------- endpoints
def test_endpoints_point_estimate_and_ci_lower_bound():
    clinical = {
        "sensitivity": {"value": 0.872, "ci": [0.818, 0.912]},
        "specificity": {"value": 0.907, "ci": [0.883, 0.927]},
        "auc": {"value": 0.93, "ci": [0.9, 0.95]},
    }
    endpoints = {"min_sensitivity": 0.85, "min_specificity": 0.825, "min_auc": None}
    point = judge_endpoints(clinical, endpoints, "point_estimate")
    assert point["pass"] is True and set(point["checks"]) == {"min_sensitivity", "min_specificity"}
    strict = judge_endpoints(clinical, endpoints, "ci_lower_bound")
    assert strict["checks"]["min_sensitivity"]["pass"] is False and strict["checks"]["min_specificity"]["pass"] is True
    assert strict["pass"] is False
    assert judge_endpoints(clinical, {"min_sensitivity": None}, "point_estimate") == {
        "rule": "point_estimate",
        "checks": {},
        "pass": None,
    }
    undefined = judge_endpoints({"sensitivity": {"value": None, "ci": None}}, {"min_sensitivity": 0.5})
    assert undefined["pass"] is False
    with pytest.raises(ValueError, match="unknown endpoint"):
        judge_endpoints(clinical, {"min_ppv": 0.5})


def test_rows_are_paired_with_fp32_of_the_same_runtime():
    rng = np.random.default_rng(12)
    truth = rng.integers(0, 2, 100)
    fp32 = binary_logits(truth, rng)
    rows = [{"name": n, "runtime": rt} for n in ("fp32", "int8") for rt in ("openvino", "onnxruntime")]
    logits = [fp32, fp32 + 1e-7, fp32 + rng.normal(scale=0.5, size=fp32.shape), fp32 + 1e-7]
    add_clinical_to_rows(rows, logits, truth, threshold=0.5, endpoints={"min_sensitivity": 0.99}, resamples=200)
    assert "vs_reference" not in rows[0]["clinical"] and "vs_reference" not in rows[1]["clinical"]
    assert rows[2]["clinical"]["vs_reference"]["reference"] == "fp32 on openvino"
    assert rows[3]["clinical"]["vs_reference"]["reference"] == "fp32 on onnxruntime"
    assert rows[3]["clinical"]["vs_reference"]["disagreement"]["k"] == 0  # same logits as its own runtime's fp32
    assert rows[2]["clinical"]["vs_reference"]["disagreement"]["k"] > 0
    assert all(r["clinical"]["endpoints"]["checks"]["min_sensitivity"]["target"] == 0.99 for r in rows)
    # Rows without logits are left alone; the same seed gives the same intervals (paired across rows).
    more = [{"name": "fp32", "runtime": "openvino"}, {"name": "int8", "runtime": "torch"}]
    add_clinical_to_rows(more, [fp32, None], truth, threshold=0.5, resamples=200)
    assert "clinical" not in more[1] and more[0]["clinical"]["auc"] == rows[0]["clinical"]["auc"]


def test_clinical_module_imports_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None; import tlcompile.evaluate.clinical as c; "
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
