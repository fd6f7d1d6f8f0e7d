"""Numpy metrics agree with scikit-learn and with hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from tlcompile.evaluate.metrics import (
    binary_metrics,
    classification_metrics,
    logsumexp,
    operating_point,
    referable_score,
    roc_auc,
    roc_curve,
    round_finite,
)


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.normal(size=300) + y, 1)  # rounding makes many ties
    assert roc_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_auc_edge_cases():
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert roc_auc([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1]) == 0.0
    assert roc_auc([1, 1, 0, 0], [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert np.isnan(roc_auc([1, 1], [0.2, 0.3]))


def test_roc_curve_matches_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = rng.normal(size=200) + y
    fpr, tpr, _ = roc_curve(y, s)
    sk_fpr, sk_tpr, _ = sk_roc_curve(y, s, drop_intermediate=False)
    assert np.allclose(fpr, sk_fpr) and np.allclose(tpr, sk_tpr)


def test_operating_point_youden_and_target_sensitivity():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9])
    t = operating_point(y, s)
    m = binary_metrics(y, s, t)
    assert m["sensitivity"] + m["specificity"] - 1 == pytest.approx(0.75)
    t = operating_point(y, s, method="sensitivity", target_sensitivity=1.0)
    assert t == pytest.approx(0.4) and binary_metrics(y, s, t)["sensitivity"] == 1.0


def test_binary_metrics_counts():
    m = binary_metrics([1, 1, 0, 0, 1], [0.9, 0.2, 0.8, 0.1, 0.7], 0.5)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (2, 1, 1, 1)
    assert m["sensitivity"] == pytest.approx(2 / 3) and m["specificity"] == pytest.approx(0.5)
    assert m["ppv"] == pytest.approx(2 / 3) and m["npv"] == pytest.approx(0.5)


def test_grade_logits_give_referable_score():
    logits = np.log(np.array([[0.5, 0.2, 0.1, 0.1, 0.1], [0.1, 0.1, 0.2, 0.3, 0.3]]))
    assert referable_score(logits) == pytest.approx([0.3, 0.8])
    m = classification_metrics(logits, np.array([0, 3]), threshold=0.5)
    assert m["auc"] == 1.0 and m["sensitivity"] == 1.0 and m["accuracy"] == 1.0


def test_round_finite_rounds_finite_values_and_maps_the_rest_to_none() -> None:
    assert round_finite(0.123456789) == 0.123457
    assert round_finite(np.float32(0.5), digits=4) == 0.5 and type(round_finite(np.float64(0.25))) is float
    assert round_finite(0.123456789, digits=None) == 0.123456789
    assert [round_finite(x) for x in (None, float("nan"), float("inf"), -np.inf)] == [None] * 4


def test_logsumexp_is_stable_for_large_logits() -> None:
    z = np.array([[1000.0, 1000.0], [0.0, np.log(3.0)]])
    np.testing.assert_allclose(logsumexp(z), [1000.0 + np.log(2.0), np.log(4.0)])
