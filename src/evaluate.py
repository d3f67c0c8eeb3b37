"""`python -m src.evaluate`: out-of-fold metrics, tables and plots of a finished CV.

Reads `{train.out}/cv.json` and each fold's test_predictions.csv (every image predicted
exactly once, by the one fold model that never saw it) and writes under `evaluate.out`:

- oof_predictions.csv   pooled predictions: index, file, patient, fold, label, prob_<class>...
- metrics.json          flat keys, identical in every run (`dvc metrics show`, the register gate)
- fold_metrics.csv      one row per fold (+ per_class_metrics.csv with more than two classes)
- plots/*.csv           ROC, PR, confusion, calibration data for `dvc plots`
- plots/*.png           the same figures, also logged to the CV's MLflow parent run with the metrics
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from src import tracking
from src.cli import run_main
from src.config import Params, add_params_args, params_from_args
from src.errors import BoneHealthError, DataError
from src.fileio import atomic_write_json
from src.metrics import METRIC_KEYS, bootstrap_auc_ci, classification_metrics, fast_binary_auc, per_class_table
from src.models import read_meta
from src.plots import (calibration_table, confusion_rows, plot_calibration, plot_confusion, plot_pr, plot_roc,
                       pr_table, roc_table, write_csv)
from src.trainer import PREDICTIONS_FILE
from src.train import CV_FILE

OOF_FILE = "oof_predictions.csv"
METRICS_FILE = "metrics.json"
FOLD_TABLE = "fold_metrics.csv"
CLASS_TABLE = "per_class_metrics.csv"
PLOTS_DIR = "plots"


# ----------------------------------------------------------------------------- inputs
def read_cv(train_out: str | Path) -> dict:
    path = Path(train_out) / CV_FILE
    if not path.is_file():
        raise DataError(f"{path}: not found; run `python -m src.train` first")
    try:
        cv = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg})") from None
    if cv.get("status") != "FINISHED":
        raise DataError(f"{path}: status is {cv.get('status')!r}, expected 'FINISHED'; rerun `python -m src.train`")
    return cv


def load_oof(train_out: str | Path, cv: dict) -> tuple[pd.DataFrame, dict[str, Any], list[dict]]:
    """Pool the folds' test predictions; returns (oof frame sorted by index, fold-0 meta, fold metas)."""
    train_out = Path(train_out)
    frames, metas = [], []
    for k in range(int(cv["folds"])):
        fold_dir = train_out / f"fold_{k}"
        path = fold_dir / PREDICTIONS_FILE
        if not path.is_file():
            raise DataError(f"{path}: fold {k} predictions missing; rerun `python -m src.train`")
        frames.append(pd.read_csv(path, dtype={"patient": str, "file": str}))
        metas.append(read_meta(fold_dir))
    classes = metas[0]["classes"]
    for k, meta in enumerate(metas):
        if meta["classes"] != classes:
            raise DataError(f"{train_out}/fold_{k}/meta.json: classes {meta['classes']} differ from fold 0's {classes}")
    oof = pd.concat(frames, ignore_index=True).sort_values("index", kind="mergesort").reset_index(drop=True)
    dup = oof["index"][oof["index"].duplicated()]
    if len(dup):
        raise DataError(f"{train_out}: image index {int(dup.iloc[0])} is predicted by more than one fold")
    missing = [f"prob_{c}" for c in classes if f"prob_{c}" not in oof]
    if missing:
        raise DataError(f"{train_out}: prediction columns {missing} missing")
    return oof, metas[0], metas


# ----------------------------------------------------------------------------- metrics
def _clean(value: Any) -> Any:
    """NaN/inf are not JSON: undefined metrics become null."""
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


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
        rows.append({"fold": int(fold), **{k: m[k] for k in METRIC_KEYS}, "n": m["n"],
                     "n_patients": int(part["patient"].nunique())})
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
    metrics.update({"n_images": int(len(oof)), "n_patients": int(oof["patient"].nunique()),
                    "n_folds": int(oof["fold"].nunique()), "threshold": float(cfg.threshold),
                    "bootstrap_resamples": int(ci.n_resamples)})
    return {k: _clean(v) for k, v in metrics.items()}, folds, per_class


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
    import time

    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    tracking.configure(params.mlflow)
    client = MlflowClient()
    try:
        client.get_run(run_id)
    except Exception:
        raise BoneHealthError(
            f"cv.json: parent run {run_id} is not in the MLflow store {tracking.tracking_uri(params.mlflow)}; "
            f"rerun `python -m src.train` against this store") from None
    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, 0) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    for i in range(0, len(batch), 500):
        client.log_batch(run_id, metrics=batch[i:i + 500])
    for path in files:
        client.log_artifact(run_id, str(path), artifact_path="plots" if path.parent.name == PLOTS_DIR else "evaluation")


# ----------------------------------------------------------------------------- the stage
def evaluate(params: Params) -> dict:
    """Write every output listed in the module docstring; returns the flat metrics."""
    cfg = params.evaluate
    cv = read_cv(params.train.out)
    oof, meta, _ = load_oof(params.train.out, cv)
    classes, positive = list(meta["classes"]), meta["positive_class"]
    out = Path(cfg.out)
    metrics, folds, per_class = compute_metrics(oof, classes, positive, cfg)

    files = [write_csv(oof, out / OOF_FILE)]
    files.append(write_csv(folds, out / FOLD_TABLE))
    if per_class is not None:
        files.append(write_csv(per_class, out / CLASS_TABLE))
    files += write_plots(oof, classes, positive, cfg, out)
    files.append(atomic_write_json(out / METRICS_FILE, metrics))
    # The PNGs and the tables go to MLflow; the plot CSVs are DVC's (they repeat the PNGs).
    log_to_parent(params, cv["parent_run_id"], metrics, [f for f in files if f.suffix == ".png" or f.parent == out])
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = add_params_args(argparse.ArgumentParser(prog="python -m src.evaluate", description=__doc__.splitlines()[0]))
    params = params_from_args(parser.parse_args(argv))
    m = evaluate(params)

    def f(key: str) -> str:
        v = m.get(key)
        return "n/a" if v is None else f"{v:.3f}"

    print(f"evaluate: pooled OOF ROC-AUC {f('oof_roc_auc')} ({params.evaluate.ci:.0%} CI {f('oof_roc_auc_ci_low')}-{f('oof_roc_auc_ci_high')}), "
          f"fold mean {f('fold_mean_roc_auc')} ± {f('fold_std_roc_auc')}; sensitivity {f('oof_sensitivity')}, "
          f"specificity {f('oof_specificity')}; written to {params.evaluate.out}/", file=sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
