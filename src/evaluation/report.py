"""Out-of-fold evaluation of a finished CV (the evaluate stage's work): every image predicted
exactly once, by the one fold model that never saw it; metrics, tables and plots under
`evaluate.out`, also logged to the CV's MLflow parent run (file list: src/evaluate.py).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from src.artifacts.cv_run import cv_provenance, load_oof, open_parent_run, read_cv
from src.artifacts.metrics_file import (
    clean,
    with_provenance,
    write_headline,
    write_metrics,
)
from src.core.config import Params
from src.core.tracking import mlflow_metrics
from src.evaluation.metrics import (
    METRIC_KEYS,
    bootstrap_auc_ci,
    classification_metrics,
    fast_binary_auc,
    per_class_table,
)
from src.evaluation.plots import (
    calibration_table,
    confusion_rows,
    plot_calibration,
    plot_confusion,
    plot_pr,
    plot_roc,
    pr_table,
    roc_table,
    write_csv,
)

log = logging.getLogger(__name__)
OOF_FILE = "oof_predictions.csv"
FOLD_TABLE = "fold_metrics.csv"
CLASS_TABLE = "per_class_metrics.csv"
PLOTS_DIR = "plots"
# headline.json (the DVC metrics; `make exp`): short name -> metrics.json key.  Short, because
# `dvc exp show` gives every name a column.
HEADLINE = {
    "auc": "oof_roc_auc",
    "auc_lo": "oof_roc_auc_ci_low",
    "auc_hi": "oof_roc_auc_ci_high",
    "sens": "oof_sensitivity",
    "spec": "oof_specificity",
    "bal_acc": "oof_balanced_accuracy",
    "brier": "oof_brier",
    "ece": "oof_ece",
    "chain_auc": "chain_oof_roc_auc",  # crops at the boxes the localiser found (null without locate)
}


# ----------------------------------------------------------------------------- metrics
def compute_metrics(oof: pd.DataFrame, classes: list[str], positive: str, cfg) -> tuple[dict, pd.DataFrame, pd.DataFrame | None]:
    """(flat metrics, per-fold table, per-class table or None)."""
    cols = [f"prob_{c}" for c in classes]
    pos = classes.index(positive)
    y = oof["label"].to_numpy(dtype=int)
    probs = oof[cols].to_numpy(dtype=np.float64)
    pooled = classification_metrics(y, probs, pos, cfg.threshold, cfg.calibration_bins)
    binary = len(classes) == 2
    ci = bootstrap_auc_ci((y == pos).astype(int) if binary else y, probs[:, pos] if binary else probs,
                          oof["patient"].to_numpy(), n=cfg.bootstrap, ci=cfg.ci, seed=cfg.seed)
    metrics: dict[str, Any] = {f"oof_{k}": pooled[k] for k in METRIC_KEYS}
    metrics["oof_roc_auc_ci_low"] = ci.low
    metrics["oof_roc_auc_ci_high"] = ci.high

    rows = []
    for fold, part in oof.groupby("fold", sort=True):
        m = classification_metrics(part["label"].to_numpy(dtype=int), part[cols].to_numpy(dtype=np.float64),
                                   pos, cfg.threshold, cfg.calibration_bins)
        p_pos = part[cols[pos]].to_numpy(dtype=np.float64)
        rows.append({"fold": int(fold), **{k: m[k] for k in METRIC_KEYS}, "n": m["n"],
                     "n_patients": int(part["patient"].nunique()),
                     "prob_spread": float(p_pos.max() - p_pos.min()) if len(p_pos) else float("nan")})
    folds = pd.DataFrame(rows)
    for k in METRIC_KEYS:
        values = folds[k].to_numpy(dtype=np.float64)
        metrics[f"fold_mean_{k}"] = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
        metrics[f"fold_std_{k}"] = float(np.nanstd(values, ddof=1)) if np.isfinite(values).sum() > 1 else float("nan")
    per_class = None
    if not binary:
        per_class = pd.DataFrame(per_class_table(y, probs, classes))
        for row in per_class.to_dict("records"):
            metrics[f"class_{row['class']}_roc_auc"] = row["roc_auc"]
    # A fold whose model answers (nearly) the same probability for everyone has learnt nothing,
    # whatever its AUC says on a few images: flag it where the user and the gate look.
    collapsed = folds[folds["prob_spread"] < cfg.collapse_spread]
    for row in collapsed.itertuples():
        log.warning("warning: fold %d's test probabilities of %s span only %.4f (< evaluate.collapse_spread %g): "
                    "its model outputs a near-constant probability", row.fold, positive, row.prob_spread,
                    cfg.collapse_spread)
    metrics["fold_min_prob_spread"] = float(folds["prob_spread"].min())
    metrics["n_collapsed_folds"] = int(len(collapsed))
    metrics.update({"n_images": int(len(oof)), "n_patients": int(oof["patient"].nunique()),
                    "n_folds": int(oof["fold"].nunique()), "threshold": float(cfg.threshold),
                    "bootstrap_resamples": int(ci.n_resamples)})
    return {k: clean(v) for k, v in metrics.items()}, folds, per_class


# ----------------------------------------------------------------------------- plots
def write_plots(oof: pd.DataFrame, classes: list[str], positive: str, cfg, out: Path) -> list[Path]:
    plots = out / PLOTS_DIR
    pos = classes.index(positive)
    y = oof["label"].to_numpy(dtype=int)
    probs = oof[[f"prob_{c}" for c in classes]].to_numpy(dtype=np.float64)
    y_pos = y == pos
    binary = len(classes) == 2
    # Two classes: the screening threshold on P(positive); more: the most probable class.
    predicted = np.where(probs[:, pos] >= cfg.threshold, pos, 1 - pos) if binary else probs.argmax(axis=1)
    written: list[Path] = []

    roc = roc_table(y_pos, probs[:, pos])
    written.append(write_csv(roc, plots / "roc.csv"))
    curves = {f"{positive}" + ("" if binary else " vs rest"): roc}
    aucs = {next(iter(curves)): fast_binary_auc(y_pos, probs[:, pos])}
    if not binary:
        per_class = [roc_table(y == c, probs[:, c], name) for c, name in enumerate(classes)]
        written.append(write_csv(pd.concat(per_class, ignore_index=True), plots / "roc_per_class.csv"))
        curves = {name: frame for name, frame in zip(classes, per_class)}
        aucs = {name: fast_binary_auc(y == c, probs[:, c]) for c, name in enumerate(classes)}
    pr = pr_table(y_pos, probs[:, pos])
    calib = calibration_table(y_pos, probs[:, pos], cfg.calibration_bins)
    written.append(write_csv(pr, plots / "pr.csv"))
    written.append(write_csv(confusion_rows(y, predicted, classes), plots / "confusion.csv"))
    written.append(write_csv(calib, plots / "calibration.csv"))

    title = f"out-of-fold, {len(oof)} images"
    written.append(plot_roc(curves, aucs, plots / "roc.png", f"ROC, {title}"))
    written.append(plot_pr(pr, float(y_pos.mean()), plots / "pr.png", f"PR ({positive}), {title}"))
    written.append(plot_confusion(y, predicted, classes, plots / "confusion.png", f"confusion, {title}"))
    written.append(plot_calibration(calib, plots / "calibration.png", f"calibration ({positive}), {title}"))
    return written


# ----------------------------------------------------------------------------- mlflow
def log_to_parent(params: Params, run_id: str, metrics: dict, files: list[Path]) -> None:
    """Metrics and artifacts onto the CV's parent run, without reopening (its status stays)."""
    from mlflow.entities import Metric

    client, _ = open_parent_run(params.mlflow, params.train.out, run_id)
    now = int(time.time() * 1000)
    # numbers only: the provenance strings are not metrics (the parent run is the CV they name).
    batch = [Metric(k, v, now, 0) for k, v in mlflow_metrics(metrics).items()]
    for i in range(0, len(batch), 500):
        client.log_batch(run_id, metrics=batch[i:i + 500])
    for path in files:
        client.log_artifact(run_id, str(path), artifact_path="plots" if path.parent.name == PLOTS_DIR else "evaluation")


# ----------------------------------------------------------------------------- the stage
def evaluate(params: Params, chain: Callable[..., dict] | None = None) -> dict:
    """Write every output listed in the module docstring; returns metrics.json's contents: the
    flat metrics plus the provenance register checks (the CV parent run and its checkpoints' hash).
    `chain(cv, oof, classes, positive, annotated_auc)` adds the chain_* figures (src.localise.chain:
    this package may not import the networks)."""
    cfg = params.evaluate
    cv = read_cv(params.train.out)
    # Hashed before the predictions are read: a retrain racing this stage then shows as a
    # mismatch at register instead of numbers vouched for by the newer checkpoints.
    provenance = cv_provenance(params.train.out, cv)
    oof, metas = load_oof(params.train.out, cv)
    classes, positive = list(metas[0].classes), metas[0].positive_class
    out = Path(cfg.out)
    metrics, folds, per_class = compute_metrics(oof, classes, positive, cfg)
    if chain is not None:
        metrics.update({k: clean(v) for k, v in chain(cv, oof, classes, positive, metrics.get("oof_roc_auc")).items()})
    for line in cv.warnings:  # data too small for the settings, found by train (model.data_checks)
        log.warning("warning: %s", line)
    if cv.warnings:
        metrics["data_warnings"] = " | ".join(cv.warnings)
    metrics = with_provenance(metrics, provenance)

    files = [write_csv(oof, out / OOF_FILE)]
    files.append(write_csv(folds, out / FOLD_TABLE))
    if per_class is not None:
        files.append(write_csv(per_class, out / CLASS_TABLE))
    files += write_plots(oof, classes, positive, cfg, out)
    write_headline(out, metrics, HEADLINE)  # DVC's; MLflow gets every figure below
    files.append(write_metrics(out, metrics))
    # The PNGs and the tables go to MLflow; the plot CSVs are DVC's (they repeat the PNGs).
    log_to_parent(params, cv.parent_run_id, metrics, [f for f in files if f.suffix == ".png" or f.parent == out])
    return metrics
