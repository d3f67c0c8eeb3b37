"""src.evaluation.metrics against scikit-learn on fixed inputs."""
from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    balanced_accuracy_score,
    brier_score_loss,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from src.evaluation.metrics import (
    METRIC_KEYS,
    binary_metrics,
    bootstrap_auc_ci,
    calibration_bins,
    classification_metrics,
    expected_calibration_error,
    fast_binary_auc,
    multiclass_metrics,
    per_class_table,
)

RNG = np.random.default_rng(7)
Y = RNG.integers(0, 2, 200)
# Informative but imperfect scores, with ties (rounded) to exercise the tie handling.
P = np.round(np.clip(0.3 * Y + RNG.uniform(0, 0.7, 200), 0, 1), 2)


def test_binary_metrics_match_sklearn():
    m = binary_metrics(Y, P, threshold=0.5)
    pred = (P >= 0.5).astype(int)
    assert m["roc_auc"] == pytest.approx(roc_auc_score(Y, P), abs=1e-12)
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(Y, pred))
    assert m["sensitivity"] == pytest.approx(recall_score(Y, pred))
    assert m["specificity"] == pytest.approx(recall_score(Y, pred, pos_label=0))
    assert m["ppv"] == pytest.approx(precision_score(Y, pred))
    assert m["npv"] == pytest.approx(precision_score(Y, pred, pos_label=0))
    assert m["f1"] == pytest.approx(f1_score(Y, pred))
    assert m["brier"] == pytest.approx(brier_score_loss(Y, P))
    assert m["accuracy"] == pytest.approx(np.mean(pred == Y))
    assert m["n"] == 200


def test_threshold_moves_sensitivity_and_specificity():
    low, high = binary_metrics(Y, P, threshold=0.2), binary_metrics(Y, P, threshold=0.8)
    assert low["sensitivity"] > high["sensitivity"] and low["specificity"] < high["specificity"]
    assert low["roc_auc"] == high["roc_auc"]  # threshold-free


def test_ece_and_bins_match_sklearn_calibration_curve():
    frac, mean_pred = calibration_curve(Y, P, n_bins=10, strategy="uniform")
    bins = calibration_bins(Y, P, 10)
    assert [b["fraction_positive"] for b in bins] == pytest.approx(list(frac))
    assert [b["mean_predicted"] for b in bins] == pytest.approx(list(mean_pred))
    counts = np.array([b["count"] for b in bins])
    assert counts.sum() == len(Y)
    expected = float(np.sum(counts / len(Y) * np.abs(frac - mean_pred)))
    assert expected_calibration_error(Y, P, 10) == pytest.approx(expected)
    # Perfectly calibrated constant forecast: ECE 0.
    y = np.array([1] * 3 + [0] * 7)
    assert expected_calibration_error(y, np.full(10, 0.3), 10) == pytest.approx(0.0)


def test_fast_auc_handles_ties_and_one_class():
    y = np.array([0, 0, 1, 1, 0, 1])
    s = np.array([0.5, 0.5, 0.5, 0.9, 0.1, 0.1])
    assert fast_binary_auc(y, s) == pytest.approx(roc_auc_score(y, s))
    assert math.isnan(fast_binary_auc(np.ones(4), np.arange(4)))


def test_multiclass_metrics_match_sklearn():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 150)
    logits = rng.normal(size=(150, 3)) + 1.5 * np.eye(3)[y]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    m = multiclass_metrics(y, probs, positive=2)
    pred = probs.argmax(axis=1)
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["sensitivity"] == pytest.approx(recall_score(y == 2, pred == 2))
    assert m["ppv"] == pytest.approx(precision_score(y == 2, pred == 2))
    assert m["brier"] == pytest.approx(np.mean(np.sum((probs - np.eye(3)[y]) ** 2, axis=1)))
    table = per_class_table(y, probs, ["a", "b", "c"])
    assert [r["class"] for r in table] == ["a", "b", "c"]
    for c, row in enumerate(table):
        assert row["roc_auc"] == pytest.approx(roc_auc_score(y == c, probs[:, c]))
        assert row["sensitivity"] == pytest.approx(recall_score(y == c, pred == c))
        assert row["support"] == int(np.sum(y == c))


def test_classification_metrics_same_keys_for_two_and_three_classes():
    two = classification_metrics(Y, np.column_stack([1 - P, P]), positive=1)
    rng = np.random.default_rng(0)
    y3 = rng.integers(0, 3, 60)
    p3 = rng.dirichlet(np.ones(3), 60)
    three = classification_metrics(y3, p3, positive=1)
    assert set(two) == set(three) >= set(METRIC_KEYS)
    # Positive class 0 flips the roles: AUC of P(class 0) for label 0.
    flipped = classification_metrics(Y, np.column_stack([1 - P, P]), positive=0)
    assert flipped["roc_auc"] == pytest.approx(roc_auc_score(Y == 0, 1 - P))


def test_bootstrap_resamples_patients_not_images():
    rng = np.random.default_rng(1)
    n_patients = 40
    y_pat = np.array([0, 1] * (n_patients // 2))
    p_pat = np.clip(0.25 * y_pat + rng.uniform(0, 0.75, n_patients), 0, 1)
    groups_pat = np.array([f"P{i:02d}" for i in range(n_patients)])
    # Every patient imaged 5 times with identical predictions: image-level resampling would
    # pretend to have 200 independent cases and report a CI that is too narrow.
    reps = 5
    y_img, p_img, g_img = (np.repeat(a, reps) for a in (y_pat, p_pat, groups_pat))
    by_patient = bootstrap_auc_ci(y_img, p_img, g_img, n=500, ci=0.95, seed=4)
    one_per_patient = bootstrap_auc_ci(y_pat, p_pat, groups_pat, n=500, ci=0.95, seed=4)
    assert by_patient.low == pytest.approx(one_per_patient.low)
    assert by_patient.high == pytest.approx(one_per_patient.high)
    by_image = bootstrap_auc_ci(y_img, p_img, np.arange(len(y_img)), n=500, ci=0.95, seed=4)
    assert (by_image.high - by_image.low) < 0.7 * (by_patient.high - by_patient.low)
    assert by_patient.auc == pytest.approx(roc_auc_score(y_img, p_img))
    assert by_patient.low < by_patient.auc < by_patient.high
    assert by_patient.n_resamples == 500
    # Same seed, same interval.
    assert bootstrap_auc_ci(y_img, p_img, g_img, n=500, ci=0.95, seed=4) == by_patient


def test_bootstrap_multiclass_and_degenerate_inputs():
    rng = np.random.default_rng(2)
    y = np.repeat(np.arange(3), 20)
    probs = rng.dirichlet(np.ones(3), 60) + 2 * np.eye(3)[y]
    probs /= probs.sum(axis=1, keepdims=True)
    ci = bootstrap_auc_ci(y, probs, np.arange(60) // 2, n=200, ci=0.9, seed=0)
    assert ci.auc == pytest.approx(roc_auc_score(y, probs, multi_class="ovr"))
    assert ci.low <= ci.auc <= ci.high <= 1.0
    one_class = bootstrap_auc_ci(np.ones(10), np.linspace(0, 1, 10), np.arange(10), n=50)
    assert math.isnan(one_class.auc) and one_class.n_resamples == 0
    with pytest.raises(ValueError, match="differ in length"):
        bootstrap_auc_ci(np.ones(3), np.ones(4), np.ones(3))
