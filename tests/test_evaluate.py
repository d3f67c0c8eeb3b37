"""Evaluation on fixed fold predictions: pooled metrics vs scikit-learn, files for DVC, MLflow logging."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import recall_score, roc_auc_score

from src.artifacts.checkpoint import CheckpointMeta
from src.artifacts.cv_run import CvRun, fold_dir, write_cv, write_fold_predictions
from src.core import tracking
from src.core.cli import run_main
from src.core.errors import DataError
from src.core.fileio import atomic_write_json
from src.evaluate import main as evaluate_main
from src.evaluation.report import evaluate
from tests.train_helpers import make_tiny_store, tiny_params, write_params


@pytest.fixture(autouse=True)
def _own_tracking(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def fake_cv(tmp_path: Path, classes=("C1", "C3"), folds=3, n_per_class=12, seed=0):
    """Training outputs as src.train writes them, with fixed informative probabilities."""
    root = make_tiny_store(tmp_path / "s", n_per_class=n_per_class, folds=folds, classes=classes, images_per_patient=2)
    params = tiny_params(tmp_path, root)
    manifest = pd.read_csv(root / "manifest.csv", dtype={"patient": str})
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(len(manifest), len(classes))) + 1.2 * np.eye(len(classes))[manifest["label"]]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    out = Path(params.train.out)
    tracking.configure(params.mlflow)
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    exp = client.get_experiment_by_name(params.mlflow.experiment)
    parent = client.create_run(exp.experiment_id, run_name="fake-cv").info.run_id
    for k in range(folds):
        rows = manifest[manifest["fold"] == k]
        frame = rows[["index", "file", "patient", "fold", "label"]].copy()
        for c, name in enumerate(classes):
            frame[f"prob_{name}"] = probs[rows.index, c]
        write_fold_predictions(fold_dir(out, k), frame)
        # evaluate hashes each fold's checkpoint (metrics provenance); its weights are never loaded.
        (fold_dir(out, k) / "model.pt").write_bytes(f"fold {k} weights of {parent}".encode())
        atomic_write_json(fold_dir(out, k) / "meta.json",
                          CheckpointMeta(model="test_efficientnet", classes=list(classes), positive_class=classes[-1],
                                         fold=k).to_dict())
    write_cv(out, CvRun(parent_run_id=parent, folds=folds))
    return params, manifest, probs, parent


def test_binary_metrics_files_plots_and_mlflow(tmp_path):
    params, manifest, probs, parent = fake_cv(tmp_path)
    metrics = evaluate(params)
    out = Path(params.evaluate.out)

    y = manifest["label"].to_numpy()
    assert metrics["oof_roc_auc"] == pytest.approx(roc_auc_score(y, probs[:, 1]))
    assert metrics["oof_sensitivity"] == pytest.approx(recall_score(y, probs[:, 1] >= 0.5))
    assert metrics["oof_roc_auc_ci_low"] < metrics["oof_roc_auc"] < metrics["oof_roc_auc_ci_high"]
    fold_aucs = [roc_auc_score(y[manifest["fold"] == k], probs[manifest["fold"] == k, 1]) for k in range(3)]
    assert metrics["fold_mean_roc_auc"] == pytest.approx(np.mean(fold_aucs))
    assert metrics["fold_std_roc_auc"] == pytest.approx(np.std(fold_aucs, ddof=1))
    assert metrics["n_images"] == 48 and metrics["n_patients"] == 24 and metrics["n_folds"] == 3
    assert json.loads((out / "metrics.json").read_text()) == metrics

    oof = pd.read_csv(out / "oof_predictions.csv")
    assert list(oof.columns) == ["index", "file", "patient", "fold", "label", "prob_C1", "prob_C3"]
    assert list(oof["index"]) == list(range(48))
    folds = pd.read_csv(out / "fold_metrics.csv")
    assert list(folds["fold"]) == [0, 1, 2] and folds["roc_auc"].to_numpy() == pytest.approx(fold_aucs)

    plots = out / "plots"
    roc = pd.read_csv(plots / "roc.csv")
    assert {"fpr", "tpr"} <= set(roc.columns) and roc["fpr"].is_monotonic_increasing
    assert np.trapezoid(roc["tpr"], roc["fpr"]) == pytest.approx(metrics["oof_roc_auc"], abs=1e-9)
    assert {"recall", "precision"} <= set(pd.read_csv(plots / "pr.csv").columns)
    confusion = pd.read_csv(plots / "confusion.csv")
    assert len(confusion) == 48 and set(confusion["actual"]) == {"C1", "C3"}
    calib = pd.read_csv(plots / "calibration.csv")
    assert calib["count"].sum() == 48
    for name in ("roc", "pr", "confusion", "calibration"):
        assert (plots / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=params.mlflow.tracking_uri)
    run = client.get_run(parent)
    assert run.data.metrics["oof/roc_auc"] == pytest.approx(metrics["oof_roc_auc"])  # grouped in the UI
    assert run.data.metrics["oof/sensitivity"] == pytest.approx(metrics["oof_sensitivity"])
    logged = {a.path for a in client.list_artifacts(parent, "plots")}
    assert logged == {f"plots/{n}.png" for n in ("roc", "pr", "confusion", "calibration")}
    assert "evaluation/metrics.json" in {a.path for a in client.list_artifacts(parent, "evaluation")}


def test_headline_file_holds_the_compared_figures_of_metrics_json(tmp_path):
    """headline.json (the DVC metrics of `make exp`): the 9 figures people compare, under short
    names, rounded (the chain's AUC null without the locate stage's crops: every run has the same
    columns); metrics.json keeps every figure and stays out of it (and headline out of MLflow)."""
    from mlflow.tracking import MlflowClient

    params, _, _, parent = fake_cv(tmp_path)
    metrics = evaluate(params)
    out = Path(params.evaluate.out)
    headline = json.loads((out / "headline.json").read_text())
    assert list(headline) == ["auc", "auc_lo", "auc_hi", "sens", "spec", "bal_acc", "brier", "ece", "chain_auc"]
    keys = ["oof_roc_auc", "oof_roc_auc_ci_low", "oof_roc_auc_ci_high", "oof_sensitivity", "oof_specificity",
            "oof_balanced_accuracy", "oof_brier", "oof_ece"]
    assert list(headline.values())[:-1] == [round(metrics[k], 3) for k in keys] and headline["chain_auc"] is None
    assert headline["auc_lo"] < headline["auc"] < headline["auc_hi"]
    assert json.loads((out / "metrics.json").read_text()) == metrics and len(metrics) > 40
    assert not any(p.name.startswith(".headline") for p in out.iterdir())  # no temporary left
    client = MlflowClient(tracking_uri=params.mlflow.tracking_uri)
    logged = {a.path for a in client.list_artifacts(parent, "evaluation")}
    assert "evaluation/metrics.json" in logged and "evaluation/headline.json" not in logged


def test_same_metric_names_every_run(tmp_path):
    a, *_ = fake_cv(tmp_path / "a", seed=0)
    b, *_ = fake_cv(tmp_path / "b", seed=1)
    assert set(evaluate(a)) == set(evaluate(b))


def test_three_classes_macro_auc_and_per_class_table(tmp_path):
    classes = ("C1", "C2", "C3")
    params, manifest, probs, _ = fake_cv(tmp_path, classes=classes, n_per_class=8)
    metrics = evaluate(params)
    y = manifest["label"].to_numpy()
    assert metrics["oof_roc_auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert metrics["oof_sensitivity"] == pytest.approx(recall_score(y == 2, probs.argmax(axis=1) == 2))
    table = pd.read_csv(Path(params.evaluate.out) / "per_class_metrics.csv")
    assert list(table["class"]) == list(classes)
    assert table["roc_auc"].to_numpy() == pytest.approx([roc_auc_score(y == c, probs[:, c]) for c in range(3)])
    assert metrics["class_C2_roc_auc"] == pytest.approx(table["roc_auc"][1])
    per_class_roc = pd.read_csv(Path(params.evaluate.out) / "plots" / "roc_per_class.csv")
    assert set(per_class_roc["class"]) == set(classes)


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    params, *_ = fake_cv(tmp_path)
    out = Path(params.train.out)
    # A fold predicting an image that another fold also predicts is a leak, not a result.
    f0 = pd.read_csv(out / "fold_0" / "test_predictions.csv")
    f1 = pd.read_csv(out / "fold_1" / "test_predictions.csv")
    pd.concat([f1, f0.head(1)]).to_csv(out / "fold_1" / "test_predictions.csv", index=False)
    with pytest.raises(DataError, match="predicted by more than one fold"):
        evaluate(params)
    (out / "cv.json").unlink()
    pfile = write_params(params, tmp_path / "params.yaml")
    capsys.readouterr()  # drop MLflow's set-up chatter from fake_cv
    assert run_main(evaluate_main, ["--params", str(pfile)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {out / 'cv.json'}: not found; run `python -m src.train` first"]


def test_a_collapsed_fold_is_flagged_in_metrics_and_on_the_console(tmp_path, capsys):
    params, manifest, probs, parent = fake_cv(tmp_path)
    path = fold_dir(params.train.out, 0) / "test_predictions.csv"
    frame = pd.read_csv(path)
    frame["prob_C3"] = 0.5 + 0.001 * np.linspace(-1, 1, len(frame))  # one answer for everyone
    frame["prob_C1"] = 1.0 - frame["prob_C3"]
    frame.to_csv(path, index=False)
    assert run_main(evaluate_main, ["--params", write_params(params, tmp_path / "params.yaml")]) == 0
    metrics = json.loads((Path(params.evaluate.out) / "metrics.json").read_text())
    assert metrics["n_collapsed_folds"] == 1 and metrics["fold_min_prob_spread"] == pytest.approx(0.002)
    assert "fold 0's test probabilities of C3 span only 0.0020 (< evaluate.collapse_spread 0.05)" in capsys.readouterr().err
    folds = pd.read_csv(Path(params.evaluate.out) / "fold_metrics.csv")
    assert folds["prob_spread"].iloc[0] == pytest.approx(0.002) and (folds["prob_spread"].iloc[1:] > 0.05).all()
