"""Distillation loss and hook; the accuracy guard's checks; the recipe's prune / quantize sections."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tlcompile.compress import guard
from tlcompile.compress.distill import distillation, distillation_loss
from tlcompile.errors import RecipeError
from tlcompile.recipe import validate_recipe_dict


def test_distillation_loss_is_ce_plus_scaled_kl():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(8, 2, generator=g), torch.randn(8, 2, generator=g)
    y = torch.randint(0, 2, (8,), generator=g)
    assert torch.isclose(
        distillation_loss(student, teacher, y, temperature=3.0, alpha=0.0), F.cross_entropy(student, y)
    )
    assert distillation_loss(teacher, teacher, y, temperature=3.0, alpha=1.0).abs() < 1e-6  # student == teacher
    t = 3.0
    p_t = F.softmax(teacher / t, dim=1)
    kl = (p_t * (p_t.log() - F.log_softmax(student / t, dim=1))).sum(1).mean()
    expected = 0.25 * t * t * kl + 0.75 * F.cross_entropy(student, y)
    assert torch.isclose(distillation_loss(student, teacher, y, temperature=t, alpha=0.25), expected, atol=1e-6)


def test_the_teacher_sees_the_students_batch_and_stays_frozen():
    torch.manual_seed(0)
    student, teacher = nn.Linear(4, 2), nn.Linear(4, 2)
    teacher.train()
    before = [p.clone() for p in teacher.parameters()]
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 0, 1, 1])
    with distillation(student, teacher, temperature=2.0, alpha=1.0) as loss_fn:
        assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
        student.eval()  # eval-mode passes (validation) record nothing
        expected = distillation_loss(student(x), teacher(x), y, temperature=2.0, alpha=1.0)
        student.train()
        loss = loss_fn(student(x), y)
        assert torch.isclose(loss, expected)
        loss.backward()
        with pytest.raises(RuntimeError, match="no recorded student input"):
            loss_fn(torch.zeros(5, 2), y)  # each recorded batch is used once
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())  # restored
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters(), strict=True))
    assert all(p.grad is None for p in teacher.parameters()) and student.weight.grad is not None
    assert not student._forward_pre_hooks  # the hook is gone


def _metrics(auc, sensitivity=0.9, specificity=0.9, accuracy=0.9):
    return {"auc": auc, "sensitivity": sensitivity, "specificity": specificity, "accuracy": accuracy}


def test_guard_check_limits_and_nan():
    ref = _metrics(0.90)
    limits = {"auc": 0.01, "sensitivity": 0.02, "specificity": None, "accuracy": None}
    ok = guard.check(_metrics(0.895, specificity=0.1), ref, against="fp32", limits=limits)
    assert ok["met"] and ok["auc"]["drop"] == pytest.approx(0.005) and ok["specificity"]["max_drop"] is None
    assert guard.excess(ok) == 0.0
    bad = guard.check(_metrics(0.88, sensitivity=0.85), ref, against="fp32", limits=limits)
    assert not bad["met"] and not bad["auc"]["met"] and not bad["sensitivity"]["met"]
    assert guard.excess(bad) == pytest.approx(0.01 + 0.03)
    assert "val AUC -2.00 pp (limit -1.00 pp), val sensitivity -5.00 pp (limit -2.00 pp)" == guard.describe(bad)
    exact = guard.check(_metrics(0.89), ref, against="fp32", limits=limits)
    assert exact["met"]  # a drop equal to the limit is within it
    nan = guard.check(_metrics(math.nan), ref, against="fp32", limits=limits)
    assert not nan["met"] and nan["auc"]["value"] is None and guard.excess(nan) == math.inf
    record = guard.summarize([ok, bad], ["did something"])
    assert record == {"met": False, "checks": [ok, bad], "actions": ["did something"]}


def test_guard_metrics_are_the_referral_decisions_at_the_locked_operating_point():
    # P(referable) = 0.27, 0.5, 0.73, 0.88 for logit differences -1, 0, 1, 2; threshold 0.65.
    logits = np.array([[0.0, -1.0], [0.0, 0.0], [0.0, 1.0], [0.0, 2.0]])
    m = guard.val_metrics(logits, np.array([0, 1, 1, 0]), threshold=0.65)
    assert m == {"auc": 0.5, "sensitivity": 0.5, "specificity": 0.5, "accuracy": 0.5}
    # A temperature of 4 pulls every score towards 0.5: now nothing reaches the threshold.
    m = guard.val_metrics(logits, np.array([0, 1, 1, 0]), threshold=0.65, temperature=4.0)
    assert m["sensitivity"] == 0.0 and m["specificity"] == 1.0


def _shifted_model_logits(rng, n=400, shift=1.5, classes=2):
    """Val logits of a model that ranks well but scores everything ``shift`` log-odds too high, and the labels."""
    truth = rng.random(n) < 0.4
    latent = np.where(truth, 1.5, -1.5) + rng.normal(scale=1.2, size=n)
    if classes == 2:
        return np.c_[np.zeros(n), latent], truth.astype(np.int64), np.c_[np.zeros(n), latent + shift]
    grades = np.where(truth, rng.integers(2, 5, n), rng.integers(0, 2, n))
    base = np.c_[np.zeros((n, 2)), np.repeat(latent[:, None], 3, axis=1)]
    moved = base.copy()
    moved[:, 2:] += shift
    return base, grades, moved


@pytest.mark.parametrize("classes", [2, 5])
def test_realignment_restores_the_reference_decisions_and_keeps_the_ranking(classes):
    rng = np.random.default_rng(0)
    reference_logits, targets, moved = _shifted_model_logits(rng, classes=classes)
    threshold = 0.5
    reference = guard.val_metrics(reference_logits, targets, threshold=threshold)
    limits = {"auc": 0.01, "sensitivity": 0.02, "specificity": 0.05, "accuracy": None}
    before = guard.check(
        guard.val_metrics(moved, targets, threshold=threshold), reference, against="fp32", limits=limits
    )
    assert before["auc"]["met"] and not before["specificity"]["met"]  # same ranking, more people referred
    delta = guard.realignment_shift(moved, targets, reference, threshold=threshold, temperature=1.0, limits=limits)
    assert -1.5 - 0.5 < delta < 0  # it undoes (part of) the shift that was added ...
    # ... and no smaller shift would do: it is the least change that brings the decisions within the limits.
    smaller = moved.copy()
    smaller[:, 1 if classes == 2 else slice(2, None)] += delta * 0.9
    assert not guard.check(
        guard.val_metrics(smaller, targets, threshold=threshold), reference, against="fp32", limits=limits
    )["met"]
    fixed = moved.copy()
    fixed[:, 1 if classes == 2 else slice(2, None)] += delta
    after = guard.check(
        guard.val_metrics(fixed, targets, threshold=threshold), reference, against="fp32", limits=limits
    )
    assert after["met"] and after["auc"]["value"] == pytest.approx(before["auc"]["value"], abs=1e-12)
    # A model whose decisions already match is not moved.
    assert (
        guard.realignment_shift(
            reference_logits, targets, reference, threshold=threshold, temperature=1.0, limits=limits
        )
        == 0.0
    )


@pytest.mark.parametrize("arch,classes", [("cbr_tiny", 2), ("mobilenet_v3_small", 5)])
def test_the_bias_shift_moves_the_referable_log_odds_exactly(arch, classes):
    from tlcompile.compress.realign import shift_referable_bias
    from tlcompile.models import get_model

    torch.manual_seed(0)
    model = get_model(arch, num_classes=classes).eval()
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        before = model(x).numpy()
        shift_referable_bias(model, 0.7, temperature=2.0)
        after = model(x).numpy()
    np.testing.assert_allclose(
        guard.referable_log_odds(after, 2.0) - guard.referable_log_odds(before, 2.0), 0.7, atol=1e-5
    )


def test_recipe_sections_validate_with_one_line_errors():
    r = validate_recipe_dict({"prune": {"ratio": 0.3, "keep": ["layer1"]}, "quantize": {"method": "ptq"}})
    assert r.prune.method == "channel" and r.prune.keep == ["layer1"] and r.quantize.max_auc_drop == 0.01
    assert validate_recipe_dict({}).prune is None and validate_recipe_dict({}).quantize is None
    for raw, message in [
        ({"prune": {"ratio": 1.0}}, "prune.ratio"),
        ({"prune": {"method": "filter"}}, "'filter' is not valid"),
        (
            {"prune": {"method": "magnitude", "importance": "taylor"}},
            "importance 'taylor' applies to method channel only",
        ),
        ({"prune": {"layer_ratios": {"layer4": 0}}}, "layer_ratios['layer4'] = 0"),
        ({"quantize": {"epochs": 0}}, "quantize.epochs"),
        ({"quantize": {"max_auc_drop": -0.1}}, "quantize.max_auc_drop"),
        ({"quantize": {"bits": 4}}, "unknown key 'bits'; valid keys here: calibration_images"),
    ]:
        with pytest.raises(
            RecipeError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
        ) as info:
            validate_recipe_dict(raw)
        assert "\n" not in str(info.value)
