"""The guard's verdict with its evidence in cases, and the report's test-split flags."""

from __future__ import annotations

import numpy as np

from tlcompile.build.stages.bench import flag_test_drops
from tlcompile.compress.guard import evidence, evidence_text


def _logits(p_referable: np.ndarray) -> np.ndarray:
    p = np.clip(p_referable, 1e-6, 1 - 1e-6)
    return np.stack([np.zeros_like(p), np.log(p / (1 - p))], axis=1)


def test_evidence_counts_the_eyes_whose_decision_changed():
    targets = np.array([1] * 5 + [0] * 5)  # a referable-task model: 5 referable eyes, 5 not
    reference = _logits(np.array([0.9, 0.8, 0.7, 0.6, 0.2, 0.1, 0.2, 0.3, 0.6, 0.4]))
    compressed = _logits(np.array([0.9, 0.4, 0.3, 0.6, 0.7, 0.1, 0.7, 0.3, 0.4, 0.4]))
    e = evidence(reference, compressed, targets, threshold=0.5, resamples=200)
    assert (e["referable"], e["referable_newly_missed"], e["referable_newly_caught"]) == (5, 2, 1)
    assert (e["non_referable"], e["non_referable_newly_referred"], e["non_referable_no_longer_referred"]) == (5, 1, 1)
    assert e["decisions_changed"] == 5 and e["n"] == 10
    lo, hi = e["auc_drop_ci95"]
    assert lo <= hi and -1 <= lo and hi <= 1
    text = evidence_text(e)
    assert text.startswith(
        "2 of 5 referable val eyes newly missed (1 newly caught); 1 of 5 non-referable newly referred"
    )
    # The same model against itself: nothing flipped, and the AUC drop CI is exactly 0.
    same = evidence(reference, reference, targets, threshold=0.5, resamples=50)
    assert same["decisions_changed"] == 0 and same["auc_drop_ci95"] == [0.0, 0.0]


def _row(name, runtime, sens, spec, auc=0.95, against=None, limit=0.02):
    row = {
        "name": name,
        "runtime": runtime,
        "metrics": {"auc": auc, "sensitivity": sens, "specificity": spec, "accuracy": 0.9},
    }
    if against:
        item = {"max_drop": limit}
        row["guard"] = {
            "met": True,
            "checks": [
                {
                    "against": against,
                    "auc": {"max_drop": 0.01},
                    "sensitivity": item,
                    "specificity": {"max_drop": 0.05},
                    "accuracy": {"max_drop": None},
                }
            ],
        }
    return row


def test_a_test_drop_beyond_the_guards_limits_is_flagged_on_the_row():
    rows = [
        _row("fp32", "openvino", 0.919, 0.95),
        _row("int8", "openvino", 0.886, 0.95, against="fp32"),
        _row("fp32", "onnxruntime", 0.919, 0.95),
        _row("int8", "onnxruntime", 0.910, 0.95, against="fp32"),
    ]
    flag_test_drops(rows)
    flags = rows[1]["test_flags"]
    assert [f["metric"] for f in flags] == ["sensitivity"] and flags[0]["drop"] == 0.033
    assert "test sensitivity -3.3 pp vs fp32 (guard limit -2.0 pp" in flags[0]["text"]
    assert rows[3]["test_flags"] == []  # 0.9 points: within the limit
    assert "test_flags" not in rows[0]  # fp32 has no guard
