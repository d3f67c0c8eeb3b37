"""The locate stage end to end on a tiny phantom (issue 16): real prepare, real MLflow on SQLite,
fold localisers on the store's patient-grouped folds, out-of-fold boxes and crops, resume, the
chain evaluate scores, and full mode (nothing to locate)."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from src import evaluate as evaluate_stage
from src import locate as locate_stage
from src import prepare as prepare_stage
from src import train as train_stage
from src.artifacts.store import PreparedStore
from src.core.config import params_from_dict
from src.core.errors import BoneHealthError
from src.data.imaging import read_image
from src.data.preprocess import preprocess_image
from src.localise.artifact import read_localiser_meta
from src.localise.files import CROPS_FILE, FOLDS_DIR, OOF_FILE
from src.localise.finder import BoxFinder, peak_box
from src.localise.fit import find_centres
from src.localise.overview import overview
from tests.train_helpers import TINY_MODEL, write_params

FOLDS = 2


def stage_params(tmp: Path, **locate) -> dict:
    raw = {
        "data": {"root": str(tmp / "phantom"), "name": "tiny-phantom"},
        "phantom": {"out": str(tmp / "phantom"), "masks_out": str(tmp / "masks"), "width": 512, "height": 256,
                    "patients_per_class": 10, "followup_fraction": 0.3, "max_images_per_patient": 2, "seed": 3},
        "prepare": {"out": str(tmp / "prepared"), "mode": "crop", "folds": FOLDS, "crop": {"size": 32}},
        "locate": {"out": str(tmp / "localiser"), "epochs": 3, "min_steps": 0, "threads": 1, "min_confidence": 1e-4,
                   "refine": {"epochs": 2},
                   "unseen_phantom": {"patients_per_class": 3}, **locate},
        "train": {"out": str(tmp / "models"), "model": TINY_MODEL, "epochs": 1, "batch_size": 8, "threads": 1,
                  "device": "cpu", "channels_last": False, "scheduler": "none", "ema_decay": None},
        "evaluate": {"out": str(tmp / "reports"), "bootstrap": 100},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}",
                   "artifact_root": str(tmp / "mlruns" / "artifacts"), "experiment": "locate"},
    }
    return raw


@pytest.fixture(scope="module")
def located(tmp_path_factory):
    """Phantom -> prepare -> locate, once for the module."""
    from src.synthetic.generator import generate

    tmp = tmp_path_factory.mktemp("locate")
    raw = stage_params(tmp)
    params = params_from_dict(raw)
    generate(params.phantom)
    path = write_params(params, tmp / "params.yaml")
    assert prepare_stage.main(["--params", path]) == 0
    assert locate_stage.main(["--params", path]) == 0
    return tmp, params, path


def fold_runs(params) -> list:
    mlflow.set_tracking_uri(params.mlflow.tracking_uri)
    exp = mlflow.get_experiment_by_name(params.mlflow.experiment)
    return MlflowClient().search_runs([exp.experiment_id], "tags.stage = 'locate'")


def test_locate_writes_fold_localisers_oof_boxes_crops_and_metrics(located):
    _, params, _ = located
    out = Path(params.locate.out)
    store = PreparedStore.open(params.prepare.out)
    for k in range(FOLDS):
        meta = read_localiser_meta(out / FOLDS_DIR / f"fold_{k}")
        assert meta.fold == k and meta.model == params.locate.model and meta.size == list(params.locate.size)
        assert meta.refine == {"size": list(params.locate.refine.size), "window": list(params.locate.refine.window),
                               "jitter": params.locate.refine.jitter}
    table = pd.read_csv(out / OOF_FILE)
    assert len(table) == len(store.images) and table["file"].tolist() == store.manifest["file"].tolist()
    assert (table["fold"] == store.folds).all() and table["iou"].between(0, 1).all()
    crops = np.load(out / CROPS_FILE)
    assert crops.shape == (len(table), 2, 32, 32) and crops.dtype == np.uint8
    # the crop of row 0 is what preprocess gives for its found box (the classifier's input)
    row = table.iloc[0]
    img = read_image(Path(params.data.root) / row["file"])
    want, _ = preprocess_image(img, store.meta, (row.found_x, row.found_y, row.found_w, row.found_h))
    np.testing.assert_array_equal(crops[0, 0], want)
    m = json.loads((out / "metrics.json").read_text())
    for key in ("locate_oof_hit_rate", "locate_oof_iou_mean", "locate_oof_centre_error_mm_median",
                "locate_annotated_side_hit_rate", "locate_fixed_box_hit_rate", "locate_unseen_hit_rate",
                "locate_unseen_centre_error_mm_median", "locate_confidence_min", "locate_foreign_confidence_max"):
        assert isinstance(m[key], float), key
    assert m["locate_other_side"] == "phantom masks" and m["locate_n_images"] == len(table)
    assert 0.0 <= m["locate_oof_hit_rate"] <= 1.0
    headline = json.loads((out / "headline.json").read_text())
    assert set(headline) >= {"hit", "iou", "mm", "fixed_hit", "unseen_hit"}
    assert (out / "examples.png").stat().st_size > 1000
    # MLflow: one parent run with the figures, one nested run per fold with its curve and weights
    runs = fold_runs(params)
    parents = [r for r in runs if "fold" not in r.data.tags]
    folds = [r for r in runs if "fold" in r.data.tags]
    assert len(parents) == 1 and len(folds) == FOLDS
    assert parents[0].data.metrics["oof/hit_rate"] == pytest.approx(m["locate_oof_hit_rate"])
    assert all(f.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for f in folds)
    client = MlflowClient()
    assert len(client.get_metric_history(folds[0].info.run_id, "epoch/train_loss")) == params.locate.epochs
    assert len(client.get_metric_history(folds[0].info.run_id, "epoch/refine_train_loss")) == \
        params.locate.refine.epochs
    assert {a.path for a in client.list_artifacts(folds[0].info.run_id, "localiser")} >= {
        "localiser/localiser.pt", "localiser/meta.json"}


def test_a_rerun_reuses_finished_folds_and_a_changed_setting_retrains(located):
    _, params, path = located
    out = Path(params.locate.out)
    weights = out / FOLDS_DIR / "fold_0" / "localiser.pt"
    before = (weights.read_bytes(), weights.stat().st_mtime_ns)
    runs_before = len(fold_runs(params))
    assert locate_stage.main(["--params", path]) == 0
    assert (weights.read_bytes(), weights.stat().st_mtime_ns) == before
    assert len(fold_runs(params)) == runs_before  # same parent run continued, no fold retrained
    # min_confidence is read at use: no retraining either
    assert locate_stage.main(["--params", path, "--set", "locate.min_confidence=0.5",
                              "--set", "locate.both_sides=true"]) == 0
    assert weights.stat().st_mtime_ns == before[1]
    meta = read_localiser_meta(out / FOLDS_DIR / "fold_0")            # what predict and serving read
    assert (meta.min_confidence, meta.both_sides) == (0.5, True)
    # killed while training fold 1: its meta.json (written last) missing, its MLflow run RUNNING
    (out / FOLDS_DIR / "fold_1" / "meta.json").unlink()
    parent = next(r for r in fold_runs(params) if "fold" not in r.data.tags)
    client = MlflowClient()
    orphan = client.create_run(parent.info.experiment_id, tags={"mlflow.parentRunId": parent.info.run_id,
                                                                "stage": "locate", "fold": "1"})
    assert locate_stage.main(["--params", path]) == 0
    assert weights.stat().st_mtime_ns == before[1]                     # fold 0 reused
    assert read_localiser_meta(out / FOLDS_DIR / "fold_1").fold == 1    # fold 1 trained again
    assert client.get_run(orphan.info.run_id).info.status == "KILLED"
    assert len(fold_runs(params)) == runs_before + 2                    # the orphan and the new fold 1


def test_boxfinder_from_the_fold_folders_finds_a_box_on_a_raw_radiograph(located):
    _, params, _ = located
    dirs = sorted((Path(params.locate.out) / FOLDS_DIR).glob("fold_*"))
    finder = BoxFinder(dirs)
    img = read_image(Path(params.data.root) / PreparedStore.open(params.prepare.out).manifest["file"][0])
    found = finder.locate(img)
    x, y, w, h = found.box
    assert 0 <= x + w / 2 < img.shape[1] and 0 <= y + h / 2 < img.shape[0] and w > 0 and h > 0
    assert found.confidence >= params.locate.min_confidence
    # the refiners moved the overview networks' centre and kept their size and confidence
    assert len(finder.refiners) == FOLDS and "centres refined in 64x96 windows of a 256x512 view" in finder.describe()
    (coarse, _), = find_centres(finder.models, overview(img, finder.size)[None])
    cx, cy, cw, ch = peak_box(coarse, (finder.size[1] / img.shape[1], finder.size[0] / img.shape[0]), img.shape[:2])
    assert (w, h, found.confidence) == pytest.approx((cw, ch, coarse.confidence))
    assert (x, y) != pytest.approx((cx, cy), abs=0.5)
    # the same radiograph scanned at another size: the same place, in its own pixels
    big = cv2.resize(img, (img.shape[1] * 3 // 2, img.shape[0] * 2), interpolation=cv2.INTER_LINEAR)
    bx, by, bw, bh = finder.locate(big).box
    centre = np.array([x + w / 2, y + h / 2]) * (1.5, 2.0)
    assert np.hypot(*(np.array([bx + bw / 2, by + bh / 2]) - centre)) < 0.02 * big.shape[1]


def test_localisers_no_better_than_a_fixed_box_are_flagged(located):
    """The module's localisers are trained 3 epochs with min_steps 0 on 20 images: they find
    fewer boxes than a fixed box, and the stage says so (metrics.json, the parent run's tag)."""
    _, params, _ = located
    m = json.loads((Path(params.locate.out) / "metrics.json").read_text())
    assert max(m["locate_oof_hit_rate"], m["locate_annotated_side_hit_rate"]) <= m["locate_fixed_box_hit_rate"]
    assert m["locate_warning"].startswith("the localisers find ") and "no more than a fixed box" in m["locate_warning"]
    parents = [r for r in fold_runs(params) if "fold" not in r.data.tags]
    assert parents and all(r.data.tags["bone_health.warnings"] == m["locate_warning"] for r in parents)


def test_a_small_set_trains_up_to_min_steps():
    from src.core.config import LocateParams
    from src.localise.fit import epochs_for

    cfg = LocateParams(batch_size=16, min_steps=160)
    assert epochs_for(16, 173, cfg) == 16          # the default phantom's folds: 11 steps x 16 = 176
    assert epochs_for(16, 52, cfg) == 40           # 4 steps per epoch
    assert epochs_for(16, 52, cfg.model_copy(update={"min_steps": 0})) == 16


def test_without_the_refiner_the_overview_networks_alone_find_the_box(tmp_path, located):
    _, params, path = located
    out = tmp_path / "coarse"
    assert locate_stage.main(["--params", path, "--set", f"locate.out={out}", "--set", "locate.refine.enabled=false",
                              "--set", "locate.unseen_phantom.enabled=false"]) == 0
    dirs = sorted((out / FOLDS_DIR).glob("fold_*"))
    assert [read_localiser_meta(d).refine for d in dirs] == [None] * FOLDS
    finder = BoxFinder(dirs)
    assert finder.refiners == [] and "refined" not in finder.describe()
    img = read_image(Path(params.data.root) / PreparedStore.open(params.prepare.out).manifest["file"][0])
    (coarse, _), = find_centres(finder.models, overview(img, finder.size)[None])
    box = peak_box(coarse, (finder.size[1] / img.shape[1], finder.size[0] / img.shape[0]), img.shape[:2])
    assert finder.locate(img).box == pytest.approx(box)
    table = pd.read_csv(out / OOF_FILE)
    assert len(table) == len(PreparedStore.open(params.prepare.out).images) and table["iou"].between(0, 1).all()


def test_evaluate_scores_the_chain_next_to_the_annotated_boxes(located):
    _, params, path = located
    assert train_stage.main(["--params", path]) == 0
    assert evaluate_stage.main(["--params", path]) == 0
    m = json.loads((Path(params.evaluate.out) / "metrics.json").read_text())
    for key in ("chain_oof_roc_auc", "chain_best_side_oof_roc_auc", "chain_both_sides_oof_roc_auc",
                "chain_oof_roc_auc_ci_low", "chain_oof_roc_auc_ci_high", "chain_auc_gap"):
        assert isinstance(m[key], float), key
    assert m["chain_auc_gap"] == pytest.approx(m["oof_roc_auc"] - m["chain_oof_roc_auc"])
    assert m["chain_n_scored"] + m["chain_n_not_found"] == m["n_images"]
    assert json.loads((Path(params.evaluate.out) / "headline.json").read_text())["chain_auc"] == \
        pytest.approx(m["chain_oof_roc_auc"], abs=1e-3)


def test_locate_refuses_a_store_it_cannot_learn_from_and_skips_full_mode(tmp_path, located):
    _, params, _ = located
    raw = stage_params(tmp_path)
    raw["data"]["root"] = params.data.root
    raw["phantom"].update(out=params.phantom.out, masks_out=params.phantom.masks_out)
    raw["prepare"].update(mode="full", full={"long_side": 64})
    path = write_params(params_from_dict(raw), tmp_path / "params.yaml")
    assert prepare_stage.main(["--params", path]) == 0
    with pytest.raises(BoneHealthError, match="locate.enabled true: .* full-mode store"):
        locate_stage.main(["--params", path, "--set", "locate.enabled=true"])
    assert locate_stage.main(["--params", path]) == 0
    m = json.loads((tmp_path / "localiser" / "metrics.json").read_text())
    assert m["locate_enabled"] is False and "full-mode" in m["locate_reason"]
    assert np.load(tmp_path / "localiser" / CROPS_FILE).shape[0] == 0
