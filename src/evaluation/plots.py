"""Curve data (CSV for `dvc plots`) and the matching PNGs (for the MLflow parent run).

Every figure is derived from one table, so the DVC plot and the PNG never disagree.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import precision_recall_curve, roc_curve

from src.core.fileio import atomic_path
from src.core.plotting import pyplot
from src.evaluation.metrics import calibration_bins


def roc_table(y_pos: np.ndarray, score: np.ndarray, name: str | None = None) -> pd.DataFrame:
    fpr, tpr, thr = roc_curve(np.asarray(y_pos).astype(int), score)
    frame = pd.DataFrame({"fpr": fpr, "tpr": tpr, "threshold": np.clip(thr, 0.0, 1.0)})
    if name is not None:
        frame.insert(0, "class", name)
    return frame


def pr_table(y_pos: np.ndarray, score: np.ndarray) -> pd.DataFrame:
    precision, recall, _ = precision_recall_curve(np.asarray(y_pos).astype(int), score)
    # sklearn returns decreasing recall; DVC draws the line in row order.
    return pd.DataFrame({"recall": recall[::-1], "precision": precision[::-1]})


def calibration_table(y_pos: np.ndarray, score: np.ndarray, n_bins: int) -> pd.DataFrame:
    return pd.DataFrame(calibration_bins(y_pos, score, n_bins),
                        columns=["bin", "low", "high", "mean_predicted", "fraction_positive", "count"])


def confusion_rows(labels: np.ndarray, predicted: np.ndarray, classes: Sequence[str]) -> pd.DataFrame:
    """One row per image (actual, predicted): the shape DVC's confusion template expects."""
    names = np.asarray(classes, dtype=object)
    return pd.DataFrame({"actual": names[np.asarray(labels)], "predicted": names[np.asarray(predicted)]})


def write_csv(frame: pd.DataFrame, path: Path) -> Path:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return path


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    return path


def plot_roc(curves: dict[str, pd.DataFrame], aucs: dict[str, float], path: Path, title: str) -> Path:
    fig, ax = pyplot().subplots(figsize=(4.5, 4.5))
    for name, frame in curves.items():
        ax.plot(frame["fpr"], frame["tpr"], label=f"{name} (AUC {aucs.get(name, float('nan')):.3f})")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
    ax.set(xlabel="false positive rate (1 - specificity)", ylabel="true positive rate (sensitivity)",
           xlim=(0, 1), ylim=(0, 1.02), title=title)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_pr(frame: pd.DataFrame, prevalence: float, path: Path, title: str) -> Path:
    fig, ax = pyplot().subplots(figsize=(4.5, 4.5))
    ax.plot(frame["recall"], frame["precision"])
    ax.axhline(prevalence, ls="--", c="grey", lw=0.8, label=f"prevalence {prevalence:.2f}")
    ax.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", xlim=(0, 1), ylim=(0, 1.02), title=title)
    ax.legend(loc="lower left", fontsize=8)
    return _save(fig, path)


def plot_confusion(labels: np.ndarray, predicted: np.ndarray, classes: Sequence[str], path: Path, title: str) -> Path:
    n = len(classes)
    matrix = np.zeros((n, n), dtype=int)
    np.add.at(matrix, (np.asarray(labels), np.asarray(predicted)), 1)
    fig, ax = pyplot().subplots(figsize=(1.2 * n + 2.5, 1.2 * n + 2))
    ax.imshow(matrix, cmap="Blues")
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center",
                    color="white" if matrix[i, j] > matrix.max() / 2 else "black")
    ax.set(xticks=range(n), yticks=range(n), xticklabels=classes, yticklabels=classes,
           xlabel="predicted", ylabel="actual", title=title)
    return _save(fig, path)


def plot_calibration(frame: pd.DataFrame, path: Path, title: str) -> Path:
    fig, ax = pyplot().subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8, label="perfect")
    ax.plot(frame["mean_predicted"], frame["fraction_positive"], marker="o", label="model")
    ax.set(xlabel="mean predicted probability", ylabel="observed fraction positive",
           xlim=(0, 1), ylim=(0, 1), title=title)
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


# The learning curve's panels: (history column, panel title).
CURVE_PANELS = (("train_loss", "training loss"), ("val_loss", "inner-validation loss"),
                ("val_auc", "inner-validation ROC AUC"))


def plot_learning_curves(histories: dict[int, pd.DataFrame], path: Path, title: str,
                         best_epochs: dict[int, int] | None = None) -> Path:
    """Losses and validation AUC against epoch, one colour per fold, all folds in one figure;
    a ring marks the epoch whose checkpoint each fold kept (`best_epochs`)."""
    plt = pyplot()
    best_epochs = best_epochs or {}
    fig, axes = plt.subplots(1, len(CURVE_PANELS), figsize=(4.2 * len(CURVE_PANELS), 3.9), squeeze=False)
    colours = plt.get_cmap("tab10")
    for k, frame in sorted(histories.items()):
        colour = colours(k % 10)
        best = best_epochs.get(k)
        label = f"fold {k}" + (f" (kept epoch {best})" if best else "")
        for ax, (column, _) in zip(axes[0], CURVE_PANELS):
            ax.plot(frame["epoch"], frame[column], color=colour, lw=1.4, marker="o" if len(frame) <= 20 else None,
                    ms=3, label=label)
            kept = frame[frame["epoch"] == best] if best else frame.iloc[:0]
            if column != "train_loss" and len(kept):
                ax.plot(kept["epoch"], kept[column], ls="none", marker="o", ms=9, mfc="none", mec=colour, mew=1.5)
    for ax, (column, name) in zip(axes[0], CURVE_PANELS):
        ax.set(xlabel="epoch", title=name)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if best_epochs and handles:
        from matplotlib.lines import Line2D

        handles.append(Line2D([], [], ls="none", marker="o", ms=9, mfc="none", mec="grey", mew=1.5))
        labels.append("kept checkpoint")
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=11)
    # Room below the panels for the legend (6 entries a row), above for the title.
    rows = -(-max(len(handles), 1) // 6)
    fig.subplots_adjust(left=0.05, right=0.99, top=0.86, bottom=0.2 + 0.05 * (rows - 1), wspace=0.22)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
