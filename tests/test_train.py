"""Training: honest splits, seeded reproducibility, checkpoints, MLflow structure, resume after a kill."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from src.artifacts.cv_run import CV_FILE, STATE_FILE
from src.artifacts.store import PreparedStore
from src.core.cli import run_main
from src.core.config import AugmentParams, with_values
from src.core.errors import BoneHealthError
from src.core.runtime import select_device
from src.core.tracking import metric_name
from src.data.augment import augment_batch, build_augment
from src.data.splits import fold_split
from src.model.cross_validation import run_cv
from src.model.engine import build_engine, ema_decay_for
from src.model.factory import load_checkpoint, predict_proba
from src.model.fit import checkpoint_meta, first_checkpoint_epoch, train_all, train_fold
from src.train import main as train_main
from tests.train_helpers import make_tiny_store, tiny_params, write_params

REPO = Path(__file__).resolve().parents[1]
EPOCH_METRICS = ("train_loss", "val_loss", "val_auc", "lr", "images_per_s")


@pytest.fixture(autouse=True)
def _own_tracking(monkeypatch):
    # Each test tracks into its own SQLite file from tiny_params, never a shared server.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)



# ----------------------------------------------------------------------------- splits
def test_no_leak_between_test_fold_and_training_parts(tmp_path):
    store = PreparedStore.open(make_tiny_store(tmp_path / "s", n_per_class=15, folds=5, images_per_patient=3))
    patients = store.patients
    seen_test = []
    for k in range(store.n_folds):
        split = fold_split(store, k, val_fraction=0.2, seed=0)
        test_p, train_p, val_p = (set(patients[s]) for s in (split.test, split.train, split.val))
        assert not set(split.test) & (set(split.train) | set(split.val))
        assert not test_p & (train_p | val_p), f"fold {k}: a test patient is in training/validation"
        assert not train_p & val_p, f"fold {k}: the inner split is not grouped by patient"
        assert sorted(np.concatenate([split.train, split.val, split.test])) == list(range(len(patients)))
        assert set(store.labels[split.val]) == {0, 1}  # stratified: both classes validate
        assert 0.1 < len(split.val) / (len(split.val) + len(split.train)) < 0.35
        seen_test.extend(split.test)
    assert sorted(seen_test) == list(range(len(patients)))  # every image tested exactly once


# ----------------------------------------------------------------------------- augmentation
def test_augment_strength_knob_and_seeding():
    assert build_augment(AugmentParams(strength=0.0)) is None
    assert build_augment(AugmentParams(enabled=False)) is None
    strong = build_augment(AugmentParams(strength=3.0), seed=1)
    assert all(0.0 <= t.p <= 1.0 for t in strong.transforms)
    images = np.tile(np.linspace(0, 255, 32, dtype=np.uint8), (4, 32, 1))
    a = augment_batch(build_augment(AugmentParams(), seed=5), images)
    b = augment_batch(build_augment(AugmentParams(), seed=5), images)
    assert a.dtype == np.uint8 and a.shape == images.shape
    assert np.array_equal(a, b) and not np.array_equal(a, images)
    wide = images.astype(np.uint16) * 257
    out = augment_batch(build_augment(AugmentParams(), seed=5), wide)
    assert out.dtype == np.float32 and 0.0 <= out.min() and out.max() <= 1.0


# ----------------------------------------------------------------------------- one fold
def test_train_fold_outputs_checkpoint_and_is_seeded(tmp_path):
    root = make_tiny_store(tmp_path / "s", n_per_class=8, folds=3, images_per_patient=2)
    store = PreparedStore.open(root)
    params = tiny_params(tmp_path, root, epochs=2)
    calls = []
    res = train_fold(params, store, 1, tmp_path / "a", epoch_callback=lambda e, r: calls.append((e, r)))

    assert [e for e, _ in calls] == [1, 2]
    assert all(set(EPOCH_METRICS) <= set(r) for _, r in calls)
    assert [h["epoch"] for h in res.history] == [1, 2] and 1 <= res.best_epoch <= 2
    assert res.best_val_auc == max(h["val_auc"] for h in res.history)
    preds = res.test_predictions
    assert list(preds.columns) == ["index", "file", "patient", "fold", "label", "prob_C1", "prob_C3"]
    assert set(preds["fold"]) == {1} and sorted(preds["index"]) == sorted(store.indices_of_fold(1))
    assert np.allclose(preds[["prob_C1", "prob_C3"]].sum(axis=1), 1.0)
    on_disk = pd.read_csv(tmp_path / "a" / "test_predictions.csv")
    assert np.allclose(on_disk["prob_C3"], preds["prob_C3"])

    # The checkpoint rebuilds through the shared inference path and gives the same predictions.
    model, meta = load_checkpoint(tmp_path / "a")
    assert meta.classes == ["C1", "C3"] and meta.fold == 1 and meta.best_epoch == res.best_epoch
    assert meta.input_size == [32, 32] and meta.mode == "crop"
    again = predict_proba(model, np.asarray(store.images[preds["index"].to_numpy()]), meta)
    assert np.allclose(again, preds[["prob_C1", "prob_C3"]].to_numpy(), atol=1e-5)

    # Same seed -> same predictions (augmentation on); another seed -> different ones.
    same = train_fold(params, store, 1, tmp_path / "b")
    assert np.array_equal(same.test_predictions["prob_C3"].to_numpy(), preds["prob_C3"].to_numpy())
    other = train_fold(tiny_params(tmp_path, root, epochs=2, seed=1), store, 1, tmp_path / "c")
    assert not np.allclose(other.test_predictions["prob_C3"].to_numpy(), preds["prob_C3"].to_numpy())


def test_ema_weights_are_what_is_validated_saved_and_tested(tmp_path):
    root = make_tiny_store(tmp_path / "s", n_per_class=8, folds=2)
    store = PreparedStore.open(root)
    res = train_fold(tiny_params(tmp_path, root, epochs=2, ema_decay=0.9), store, 0, tmp_path / "ema")
    model, meta = load_checkpoint(tmp_path / "ema")
    rows = res.test_predictions["index"].to_numpy()
    again = predict_proba(model, np.asarray(store.images[rows]), meta)
    assert np.allclose(again[:, 1], res.test_predictions["prob_C3"], atol=1e-5)
    plain = train_fold(tiny_params(tmp_path, root, epochs=2, ema_decay=None), store, 0, tmp_path / "plain")
    assert not np.allclose(plain.test_predictions["prob_C3"], res.test_predictions["prob_C3"])


def test_ema_auto_spans_a_tenth_of_the_run_and_is_off_for_short_runs(tmp_path):
    root = make_tiny_store(tmp_path / "s", n_per_class=8, folds=2)
    cfg = tiny_params(tmp_path, root, ema_decay="auto").train
    assert ema_decay_for(cfg, 200) == pytest.approx(0.95)      # time constant 20 of 200 steps
    assert ema_decay_for(cfg, 2000) == pytest.approx(0.995)
    assert ema_decay_for(cfg, 49) is None and ema_decay_for(cfg, None) is None
    assert ema_decay_for(cfg.model_copy(update={"ema_decay": 0.99}), 10) == 0.99
    assert ema_decay_for(cfg.model_copy(update={"ema_decay": None}), 1000) is None
    store = PreparedStore.open(root)
    meta = checkpoint_meta(tiny_params(tmp_path, root), store, 0)
    engine = build_engine(cfg, meta, torch.device("cpu"), store.labels, total_steps=400)
    assert engine.ema is not None and engine.ema.decay == pytest.approx(0.975)
    assert build_engine(cfg, meta, torch.device("cpu"), store.labels, total_steps=20).ema is None


@pytest.mark.parametrize("criterion", ["val_auc", "val_loss"])
def test_checkpoint_from_keeps_no_epoch_of_the_first_share(tmp_path, criterion):
    root = make_tiny_store(tmp_path / "s", n_per_class=8, folds=2)
    store = PreparedStore.open(root)
    params = tiny_params(tmp_path, root, epochs=5, checkpoint=criterion, checkpoint_from=0.5, early_stopping_patience=1)
    assert first_checkpoint_epoch(params.train) == 3  # floor(0.5 * 5) + 1
    res = train_fold(params, store, 0, tmp_path / "m")
    history = pd.DataFrame(res.history)
    # patience 1 counts only from epoch 3: epochs 1-2 can be as stale as they like
    assert len(history) >= 4
    later = history[history["epoch"] >= 3]
    if criterion == "val_loss":
        expected = int(later.loc[later["val_loss"].idxmin(), "epoch"])
    else:
        expected = int(later[later["val_auc"] == later["val_auc"].max()].sort_values("val_loss").iloc[0]["epoch"])
    assert res.best_epoch == expected >= 3
    model, meta = load_checkpoint(tmp_path / "m")
    rows = res.test_predictions["index"].to_numpy()
    assert np.allclose(predict_proba(model, np.asarray(store.images[rows]), meta)[:, 1],
                       res.test_predictions["prob_C3"], atol=1e-5)
    assert first_checkpoint_epoch(params.train.model_copy(update={"checkpoint": "last"})) == 1
    assert first_checkpoint_epoch(params.train.model_copy(update={"checkpoint_from": 0.0})) == 1
    assert first_checkpoint_epoch(params.train.model_copy(update={"checkpoint_from": 0.99, "epochs": 18})) == 18


@pytest.mark.parametrize("criterion", ["val_auc", "val_loss", "last"])
def test_checkpoint_criterion_picks_the_epoch_it_names(tmp_path, criterion):
    root = make_tiny_store(tmp_path / "s", n_per_class=8, folds=2)
    store = PreparedStore.open(root)
    res = train_fold(tiny_params(tmp_path, root, epochs=4, checkpoint=criterion), store, 0, tmp_path / "m")
    history = pd.DataFrame(res.history)
    expected = {
        "last": 4,
        "val_loss": int(history.loc[history["val_loss"].idxmin(), "epoch"]),
        # ties in AUC (it saturates) go to the lower loss
        "val_auc": int(history[history["val_auc"] == history["val_auc"].max()]
                       .sort_values("val_loss").iloc[0]["epoch"]),
    }[criterion]
    assert res.best_epoch == expected
    assert res.best_val_auc == pytest.approx(history.loc[history["epoch"] == expected, "val_auc"].item())
    # the kept weights are that epoch's: the checkpoint reproduces the test predictions
    model, meta = load_checkpoint(tmp_path / "m")
    assert meta.best_epoch == expected
    rows = res.test_predictions["index"].to_numpy()
    assert np.allclose(predict_proba(model, np.asarray(store.images[rows]), meta)[:, 1],
                       res.test_predictions["prob_C3"], atol=1e-5)


def test_train_all_refits_on_every_image_for_fixed_epochs(tmp_path):
    root = make_tiny_store(tmp_path / "s", n_per_class=6, folds=2)
    params = tiny_params(tmp_path, root, epochs=2, early_stopping_patience=1)
    res = train_all(params, PreparedStore.open(root), tmp_path / "all")
    assert len(res.history) == 2 and res.best_epoch == 2  # no validation: the last epoch is kept
    assert res.split_sizes == {"train": 12, "val": 0, "test": 0} and res.test_predictions.empty
    model, meta = load_checkpoint(tmp_path / "all")
    assert meta.fold is None and meta.extra["trained_on"] == "all" and meta.best_epoch == 2


def test_epoch_callback_exception_stops_and_writes_nothing(tmp_path):
    root = make_tiny_store(tmp_path / "s", n_per_class=8, folds=2)
    params = tiny_params(tmp_path, root, epochs=3)

    class Pruned(Exception):
        pass

    def prune(epoch, record):
        raise Pruned(f"pruned at {epoch}")

    with pytest.raises(Pruned, match="pruned at 1"):
        train_fold(params, PreparedStore.open(root), 0, tmp_path / "f", epoch_callback=prune)
    assert not (tmp_path / "f" / "meta.json").exists()


def test_too_small_inner_split_is_a_one_line_data_error(tmp_path):
    from src.core.errors import DataError

    store = PreparedStore.open(make_tiny_store(tmp_path / "s", n_per_class=3, folds=3))
    with pytest.raises(DataError, match=r"train.val_fraction=0.25: .*too small"):
        fold_split(store, 0, val_fraction=0.25, seed=0)


def test_device_selection():
    assert select_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert select_device("auto").type == "cuda"
    else:
        assert select_device("auto").type in ("cpu", "mps")
        with pytest.raises(BoneHealthError, match="train.device: 'cuda' requested"):
            select_device("cuda")


def test_fold_count_is_the_stores_and_the_old_key_says_where_it_went(tmp_path, capsys):
    root = make_tiny_store(tmp_path / "s", n_per_class=6, folds=2)
    pfile = write_params(tiny_params(tmp_path, root), tmp_path / "params.yaml")
    assert run_main(train_main, ["--params", str(pfile), "--set", "train.folds=4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'train.folds'" in err[0] and "moved to prepare.folds" in err[0]


# ----------------------------------------------------------------------------- CV + MLflow
@pytest.fixture(scope="module")
def binary_cv(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cv")
    root = make_tiny_store(tmp / "s", n_per_class=10, folds=3, images_per_patient=2)
    params = tiny_params(tmp, root, epochs=2)
    saved = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        cv = run_cv(params)
    finally:
        if saved is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved
    return tmp, params, cv


def test_mlflow_structure_one_parent_k_children(binary_cv):
    import mlflow
    from mlflow.tracking import MlflowClient

    tmp, params, cv = binary_cv
    mlflow.set_tracking_uri(params.mlflow.tracking_uri)
    runs = mlflow.search_runs(experiment_names=["tiny"], output_format="pandas")
    parent = runs[runs["run_id"] == cv.parent_run_id].iloc[0]
    children = runs[runs["tags.mlflow.parentRunId"] == cv.parent_run_id]
    assert len(runs) == 4 and len(children) == 3
    assert set(children["status"]) == {"FINISHED"} and parent["status"] == "FINISHED"
    # the lab's name, then a hash of the training settings that differ from the defaults
    assert parent["tags.mlflow.runName"].startswith("test_efficientnet_tiny_crop32_b8_e2-")
    assert "train.lr=0.01" in parent["tags.bone_health.changed"]
    assert parent["tags.mlflow.user"] and parent["tags.mlflow.source.name"]  # the UI's User/Source columns
    for tag in ("git_commit", "manifest_sha256", "dataset", "device"):
        assert parent[f"tags.{tag}"], tag
    assert parent["tags.manifest_sha256"] == json.loads((Path(params.prepare.out) / "meta.json").read_text())["manifest_sha256"]
    assert parent["params.train.lr"] == "0.01" and parent["params.train.augment.strength"] == "0.5"
    assert 0.0 <= parent["metrics.cv/oof_roc_auc"] <= 1.0 and parent["metrics.cv/folds_finished"] == 3
    dataset = MlflowClient().get_run(cv.parent_run_id).inputs.dataset_inputs[0].dataset
    assert dataset.name == "tiny" and dataset.digest == json.loads(
        (Path(params.prepare.out) / "meta.json").read_text())["manifest_sha256"][:8]

    client = MlflowClient()
    assert cv.status == "FINISHED" and cv.folds == 3
    assert set(cv.fold_run_ids) == {"0", "1", "2"} and set(cv.fold_run_ids.values()) == set(children["run_id"])
    for k, run_id in cv.fold_run_ids.items():
        for name in EPOCH_METRICS:  # grouped in the UI: epoch/train_loss, epoch/val_auc, ...
            assert [m.step for m in client.get_metric_history(run_id, metric_name(name))] == [1, 2], name
        run = client.get_run(run_id)
        assert {"test/roc_auc", "test/sensitivity", "test/specificity", "fold/best_val_auc"} <= set(run.data.metrics)
        assert run.data.params["train.lr"] == "0.01" and run.data.params["train.model"] == "test_efficientnet"
        assert {a.path for a in client.list_artifacts(run_id, "checkpoint")} == {"checkpoint/model.pt", "checkpoint/meta.json"}
        meta = json.loads((tmp / "models" / f"fold_{k}" / "meta.json").read_text())
        assert meta["mlflow_run_id"] == run_id
    # A rerun with nothing changed is a no-op returning the same CV.
    assert run_cv(params) == cv


def test_each_fold_writes_its_learning_curve_and_the_parent_run_gets_the_figure(binary_cv):
    """{train.out}/fold_<k>/history.csv (DVC plots) holds what the fold's MLflow run logged per
    epoch; the parent run holds every fold's curves in one PNG."""
    from mlflow.tracking import MlflowClient

    from src.artifacts.cv_run import HISTORY_COLUMNS

    tmp, params, cv = binary_cv
    client = MlflowClient(tracking_uri=params.mlflow.tracking_uri)
    for k, run_id in cv.fold_run_ids.items():
        history = pd.read_csv(tmp / "models" / f"fold_{k}" / "history.csv")
        assert list(history.columns) == ["epoch", "train_loss", "val_loss", "val_auc", "lr"] == list(HISTORY_COLUMNS)
        assert history["epoch"].tolist() == [1, 2]
        for name in HISTORY_COLUMNS[1:]:
            logged = [m.value for m in sorted(client.get_metric_history(run_id, metric_name(name)),
                                              key=lambda m: m.step)]
            assert history[name].to_numpy() == pytest.approx(logged), (k, name)
        best = json.loads((tmp / "models" / f"fold_{k}" / "meta.json").read_text())["best_epoch"]
        assert history.loc[history["epoch"] == best, "val_auc"].item() == pytest.approx(
            client.get_run(run_id).data.metrics["fold/best_val_auc"])
    assert [a.path for a in client.list_artifacts(cv.parent_run_id, "plots")] == ["plots/learning_curves.png"]
    local = client.download_artifacts(cv.parent_run_id, "plots/learning_curves.png", str(tmp / "downloaded"))
    assert Path(local).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_resume_after_kill_mid_fold(tmp_path):
    from mlflow.tracking import MlflowClient

    # Two folds: the kill lands in fold 1, so the rerun trains one fold and reuses fold 0.
    root = make_tiny_store(tmp_path / "s", n_per_class=8, folds=2)
    params = tiny_params(tmp_path, root, epochs=5)
    pfile = write_params(params, tmp_path / "params.yaml")
    out = Path(params.train.out)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    log = open(tmp_path / "train.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "src.train", "--params", str(pfile)], cwd=REPO, env=env,
                            stdout=log, stderr=log, start_new_session=True)
    state = None
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            try:
                state = json.loads((out / STATE_FILE).read_text())
            except (OSError, json.JSONDecodeError):
                state = None
            if state and "1" in (state.get("running") or {}):
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "train.log").read_text()[-2000:]
    assert (out / "fold_0" / "meta.json").is_file() and not (out / CV_FILE).exists()
    killed_run = state["running"]["1"]
    fold0_run = state["folds"]["0"]["run_id"]
    fold0_mtime = (out / "fold_0" / "model.pt").stat().st_mtime_ns

    cv = run_cv(params)  # the rerun

    client = MlflowClient(tracking_uri=params.mlflow.tracking_uri)
    assert cv.status == "FINISHED" and cv.parent_run_id == state["parent_run_id"]
    assert cv.fold_run_ids["0"] == fold0_run  # finished fold reused, not retrained
    assert (out / "fold_0" / "model.pt").stat().st_mtime_ns == fold0_mtime
    assert client.get_run(killed_run).info.status == "KILLED"
    assert killed_run not in cv.fold_run_ids.values()
    children = client.search_runs([client.get_run(cv.parent_run_id).info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{cv.parent_run_id}'")
    statuses = sorted(r.info.status for r in children)
    assert statuses == ["FINISHED", "FINISHED", "KILLED"]
    assert client.get_run(cv.parent_run_id).data.metrics["cv/folds_finished"] == 2
    assert all((out / f"fold_{k}" / "test_predictions.csv").is_file() for k in range(2))


def test_three_classes_end_to_end(tmp_path):
    from src.evaluation.report import evaluate

    root = make_tiny_store(tmp_path / "s", n_per_class=9, folds=3, classes=("C1", "C2", "C3"))
    params = tiny_params(tmp_path, root, epochs=2)
    cv = run_cv(params)
    preds = pd.read_csv(Path(params.train.out) / "fold_0" / "test_predictions.csv")
    assert [c for c in preds.columns if c.startswith("prob_")] == ["prob_C1", "prob_C2", "prob_C3"]
    metrics = evaluate(params)
    oof = pd.read_csv(Path(params.evaluate.out) / "oof_predictions.csv")
    from sklearn.metrics import roc_auc_score

    assert len(oof) == 27 and sorted(oof["index"]) == list(range(27))
    expected = roc_auc_score(oof["label"], oof[["prob_C1", "prob_C2", "prob_C3"]].to_numpy(), multi_class="ovr")
    assert metrics["oof_roc_auc"] == pytest.approx(expected)
    table = pd.read_csv(Path(params.evaluate.out) / "per_class_metrics.csv")
    assert list(table["class"]) == ["C1", "C2", "C3"]
    assert {"class_C1_roc_auc", "class_C3_roc_auc", "oof_sensitivity"} <= set(metrics)
    assert cv.status == "FINISHED"


def test_the_resume_fingerprint_covers_the_training_code(tmp_path):
    """`dvc repro` after a code change reruns train; finished folds of the old code must not be reused."""
    from src.core.code_hash import code_fingerprint
    from src.model.cross_validation import TRAINING_PACKAGES, fingerprint

    root = make_tiny_store(tmp_path / "s", n_per_class=6, folds=2)
    params = tiny_params(tmp_path, root)
    store = PreparedStore.open(root)
    assert fingerprint(params, store) == fingerprint(params, store)  # stable across calls
    # the CPU thread count changes the numbers (issue 19), so finished folds of another count are not reused
    one, two = (with_values(params, {"train.threads": n}) for n in (1, 2))
    assert fingerprint(one, store) != fingerprint(two, store)
    assert fingerprint(one, store, device_type="cuda") == fingerprint(two, store, device_type="cuda")
    # A copy of the packages: one changed byte in a trainer module changes the code fingerprint.
    src = Path(__file__).resolve().parents[1] / "src"
    copy = tmp_path / "src"
    for package in TRAINING_PACKAGES:
        shutil.copytree(src / package, copy / package, ignore=shutil.ignore_patterns("__pycache__"))
    assert code_fingerprint(copy, TRAINING_PACKAGES) == code_fingerprint(packages=TRAINING_PACKAGES)
    engine = copy / "model" / "engine.py"
    engine.write_text(engine.read_text() + "\n# a changed trainer\n")
    assert code_fingerprint(copy, TRAINING_PACKAGES) != code_fingerprint(packages=TRAINING_PACKAGES)
