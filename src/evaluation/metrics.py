"""Classification metrics from probabilities, shared by train, evaluate and tune.

Every metric is computed from predicted probabilities (never from hard labels alone, the
lab's mistake).  `classification_metrics` returns the SAME keys for two classes and for
more, so metrics.json, MLflow and `dvc exp show` line up across runs:

- two classes: the positive class's probability against `threshold`;
- more classes: macro one-vs-rest ROC-AUC, argmax predictions, and the positive-class
  one-vs-rest figures for sensitivity/specificity/PPV/NPV/F1 (the screening gate reads
  those whatever the number of classes).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np
from sklearn.metrics import roc_auc_score

METRIC_KEYS = (
    "roc_auc", "accuracy", "balanced_accuracy", "sensitivity", "specificity",
    "ppv", "npv", "f1", "brier", "ece",
)


def _safe_div(num: float, den: float) -> float:
    return float(num) / float(den) if den else float("nan")


def auc_score(y: np.ndarray, probs: np.ndarray) -> float:
    """ROC-AUC from probabilities: binary on column 1 (or a 1-D score), macro OvR beyond.

    NaN when the labels hold a single class (AUC undefined), instead of raising: a tiny
    inner validation split or a bootstrap resample may legitimately lack a class.
    """
    y = np.asarray(y)
    probs = np.asarray(probs, dtype=np.float64)
    present = np.unique(y)
    if len(present) < 2:
        return float("nan")
    if probs.ndim == 1:
        return float(roc_auc_score(y, probs))
    if probs.shape[1] == 2:
        return float(roc_auc_score(y, probs[:, 1]))
    if len(present) < probs.shape[1]:
        # OvR over the classes present only; absent classes have no positives to rank.
        aucs = [roc_auc_score(y == c, probs[:, c]) for c in present]
        return float(np.mean(aucs))
    return float(roc_auc_score(y, probs, multi_class="ovr", average="macro"))


def fast_binary_auc(y: np.ndarray, score: np.ndarray) -> float:
    """Mann-Whitney AUC with tie correction; the bootstrap calls this thousands of times."""
    y = np.asarray(y).astype(bool)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(score, kind="mergesort")
    s = np.asarray(score)[order]
    ranks = np.empty(len(s), dtype=np.float64)
    # Average ranks over ties (1-based).
    _, first, counts = np.unique(s, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def expected_calibration_error(y_true: np.ndarray, confidence: np.ndarray, n_bins: int = 10) -> float:
    """Weighted mean |observed frequency - mean confidence| over equal-width bins of [0, 1].

    For two classes `y_true` is the positive indicator and `confidence` the positive
    probability (the reliability diagram's axes); for more classes pass
    (argmax == label) and the top probability.
    """
    y_true = np.asarray(y_true, dtype=np.float64)
    confidence = np.asarray(confidence, dtype=np.float64)
    if len(y_true) == 0:
        return float("nan")
    bins = calibration_bins(y_true, confidence, n_bins)
    n = len(y_true)
    return float(sum(b["count"] / n * abs(b["fraction_positive"] - b["mean_predicted"]) for b in bins))


def calibration_bins(y_true: np.ndarray, prob: np.ndarray, n_bins: int = 10) -> list[dict]:
    """Non-empty equal-width bins: mean predicted, observed fraction, count (sklearn's binning)."""
    y_true = np.asarray(y_true, dtype=np.float64)
    prob = np.asarray(prob, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # Same rule as sklearn.calibration.calibration_curve(strategy="uniform").
    ids = np.searchsorted(edges[1:-1], prob)
    out = []
    for b in range(n_bins):
        mask = ids == b
        if mask.any():
            out.append({
                "bin": b, "low": float(edges[b]), "high": float(edges[b + 1]),
                "mean_predicted": float(prob[mask].mean()),
                "fraction_positive": float(y_true[mask].mean()),
                "count": int(mask.sum()),
            })
    return out


def _nanmean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return float(np.mean(kept)) if kept else float("nan")


def _confusion_counts(y_pos: np.ndarray, pred_pos: np.ndarray) -> tuple[int, int, int, int]:
    tp = int(np.sum(y_pos & pred_pos))
    tn = int(np.sum(~y_pos & ~pred_pos))
    fp = int(np.sum(~y_pos & pred_pos))
    fn = int(np.sum(y_pos & ~pred_pos))
    return tp, tn, fp, fn


def _rates(tp: int, tn: int, fp: int, fn: int) -> dict[str, float]:
    sens = _safe_div(tp, tp + fn)
    spec = _safe_div(tn, tn + fp)
    ppv = _safe_div(tp, tp + fp)
    return {
        "sensitivity": sens,
        "specificity": spec,
        "ppv": ppv,
        "npv": _safe_div(tn, tn + fn),
        "f1": _safe_div(2 * tp, 2 * tp + fp + fn),
    }


def binary_metrics(y: np.ndarray, p_pos: np.ndarray, threshold: float = 0.5, n_bins: int = 10) -> dict[str, float]:
    """Screening metrics for labels y in {0, 1} (1 = disease) and P(disease).

    A case is called positive when p_pos >= threshold.
    """
    y = np.asarray(y).astype(int)
    p_pos = np.asarray(p_pos, dtype=np.float64)
    if y.shape != p_pos.shape:
        raise ValueError(f"labels {y.shape} and probabilities {p_pos.shape} differ in shape")
    y_pos = y == 1
    pred_pos = p_pos >= threshold
    tp, tn, fp, fn = _confusion_counts(y_pos, pred_pos)
    rates = _rates(tp, tn, fp, fn)
    out = {
        "roc_auc": fast_binary_auc(y_pos, p_pos),
        "accuracy": _safe_div(tp + tn, len(y)),
        # Mean recall over the classes present, as sklearn's balanced_accuracy_score.
        "balanced_accuracy": _nanmean([rates["sensitivity"], rates["specificity"]]),
        **rates,
        "brier": float(np.mean((p_pos - y_pos) ** 2)) if len(y) else float("nan"),
        "ece": expected_calibration_error(y_pos, p_pos, n_bins),
        "n": int(len(y)),
    }
    return out


def multiclass_metrics(y: np.ndarray, probs: np.ndarray, positive: int, n_bins: int = 10) -> dict[str, float]:
    """Macro OvR AUC, accuracy, balanced accuracy (mean recall), multi-class Brier, top-label
    ECE, and the `positive` class's one-vs-rest rates under argmax predictions."""
    y = np.asarray(y).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    n_classes = probs.shape[1]
    pred = probs.argmax(axis=1)
    recalls = [np.mean(pred[y == c] == c) for c in range(n_classes) if np.any(y == c)]
    tp, tn, fp, fn = _confusion_counts(y == positive, pred == positive)
    onehot = np.eye(n_classes)[y]
    return {
        "roc_auc": auc_score(y, probs),
        "accuracy": float(np.mean(pred == y)) if len(y) else float("nan"),
        "balanced_accuracy": float(np.mean(recalls)) if recalls else float("nan"),
        **_rates(tp, tn, fp, fn),
        "brier": float(np.mean(np.sum((probs - onehot) ** 2, axis=1))) if len(y) else float("nan"),
        "ece": expected_calibration_error(pred == y, probs.max(axis=1), n_bins),
        "n": int(len(y)),
    }


def classification_metrics(y: np.ndarray, probs: np.ndarray, positive: int, threshold: float = 0.5,
                           n_bins: int = 10) -> dict[str, float]:
    """Same keys for any number of classes (see the module docstring)."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2:
        raise ValueError(f"probabilities must be (n, classes), got shape {probs.shape}")
    if probs.shape[1] == 2:
        y_pos = (np.asarray(y) == positive).astype(int)
        return binary_metrics(y_pos, probs[:, positive], threshold, n_bins)
    return multiclass_metrics(y, probs, positive, n_bins)


def per_class_table(y: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> list[dict]:
    """One-vs-rest AUC and argmax-based rates for every class (the multi-class report)."""
    y = np.asarray(y).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    pred = probs.argmax(axis=1)
    rows = []
    for c, name in enumerate(classes):
        tp, tn, fp, fn = _confusion_counts(y == c, pred == c)
        rows.append({
            "class": name,
            "support": int(np.sum(y == c)),
            "roc_auc": fast_binary_auc(y == c, probs[:, c]),
            **_rates(tp, tn, fp, fn),
        })
    return rows


class AucCI(NamedTuple):
    auc: float            # on the full sample
    low: float
    high: float
    n_resamples: int      # resamples that held every class (the others are skipped)


def bootstrap_auc_ci(y: np.ndarray, p: np.ndarray, groups: np.ndarray, n: int = 2000, ci: float = 0.95,
                     seed: int = 0) -> AucCI:
    """Percentile CI of ROC-AUC, resampling PATIENTS (groups) with replacement.

    Images of one patient are correlated; resampling images would understate the spread.
    `p` is P(positive) (1-D, y in {0, 1}) or (n, classes) probabilities (macro OvR AUC).
    """
    y = np.asarray(y)
    p = np.asarray(p, dtype=np.float64)
    groups = np.asarray(groups)
    if not (len(y) == len(p) == len(groups)):
        raise ValueError(f"y ({len(y)}), p ({len(p)}) and groups ({len(groups)}) differ in length")
    binary = p.ndim == 1 or p.shape[1] == 2
    score = (p if p.ndim == 1 else p[:, 1]) if binary else p

    def auc(idx: np.ndarray) -> float:
        if binary:
            return fast_binary_auc(y[idx] == 1, score[idx])
        if len(np.unique(y[idx])) < p.shape[1]:
            return float("nan")
        return auc_score(y[idx], score[idx])

    point = auc(np.arange(len(y)))
    if n <= 0 or math.isnan(point):
        return AucCI(point, float("nan"), float("nan"), 0)
    uniq, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(uniq))]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n):
        picked = rng.integers(0, len(uniq), size=len(uniq))
        value = auc(np.concatenate([members[g] for g in picked]))
        if not math.isnan(value):
            values.append(value)
    if not values:
        return AucCI(point, float("nan"), float("nan"), 0)
    alpha = (1.0 - ci) / 2.0
    low, high = np.quantile(values, [alpha, 1.0 - alpha])
    return AucCI(point, float(low), float(high), len(values))
