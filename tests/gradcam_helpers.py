"""Inputs of the Grad-CAM stage built by hand, per docs/ARCHITECTURE.md: source radiographs
with ground-truth masks, a crop-mode prepared store cut from them, fold checkpoints of timm's
tiny `test_efficientnet`, and a cv.json pointing at an MLflow parent run in tmp_path.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from src.artifacts.checkpoint import CheckpointMeta, save_checkpoint
from src.artifacts.cv_run import CvRun, write_cv, write_fold_predictions
from src.core.config import Params, params_from_dict
from src.core.fileio import sha256_file
from src.data.preprocess import crop_geometry, resize, square_crop, to_dtype
from src.model.factory import create_model

TINY_MODEL = "test_efficientnet"
SRC_H, SRC_W = 96, 160  # source radiographs
SIZE = 64  # stored crops: test_efficientnet has stride 32, so a 2x2 final feature map
CROP = {"side": 80, "reference_width": None, "size": SIZE}
CLASSES = ["C1", "C3"]


def make_cam_inputs(root: str | Path, n_per_class: int = 4, folds: int = 2, seed: int = 0) -> dict[str, Path]:
    """Sources + masks + crop store + fold checkpoints + cv.json (no MLflow yet)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    images_dir, masks_dir, store_dir = root / "images", root / "masks", root / "prepared"
    stored, rows = [], []
    for label, cls in enumerate(CLASSES):
        (images_dir / cls).mkdir(parents=True, exist_ok=True)
        (masks_dir / cls).mkdir(parents=True, exist_ok=True)
        for p in range(n_per_class):
            name = f"P{label}{p:03d}_v1.png"
            src = rng.normal(0.3, 0.05, (SRC_H, SRC_W))
            mask = np.zeros((SRC_H, SRC_W), dtype=np.uint8)
            top = 50 + int(rng.integers(0, 6))
            thick = 6 + 4 * label
            mask[top:top + thick, 30:130] = 255
            src[mask > 0] += 0.5
            src8 = to_dtype(np.clip(src, 0, 1), "uint8")
            Image.fromarray(src8).save(images_dir / cls / name)
            Image.fromarray(mask).save(masks_dir / cls / name)
            # The box centre sits above the band, so the region is off-centre in the crop.
            box = (60.0, float(top - 24), 40.0, float(thick))
            x0, y0, side = crop_geometry((SRC_H, SRC_W), box, CROP["side"], CROP["reference_width"])
            crop = resize(square_crop(src8.astype(np.float32) / 255.0, x0, y0, side), (SIZE, SIZE))
            stored.append(to_dtype(crop, "uint8"))
            rows.append({"file": f"{cls}/{name}", "class": cls, "label": label, "patient": f"P{label}{p:03d}",
                         "src_height": SRC_H, "src_width": SRC_W, "box_x": box[0], "box_y": box[1],
                         "box_w": box[2], "box_h": box[3], "crop_x0": x0, "crop_y0": y0, "crop_side": side})
    manifest = pd.DataFrame(rows)
    manifest.insert(0, "index", np.arange(len(manifest)))
    # Alternate folds within each class: every fold holds both classes.
    manifest.insert(5, "fold", manifest.groupby("label").cumcount() % folds)
    manifest["sha256"] = [f"{i:064x}" for i in range(len(manifest))]
    store_dir.mkdir(parents=True, exist_ok=True)
    np.save(store_dir / "images.npy", np.stack(stored))
    manifest.to_csv(store_dir / "manifest.csv", index=False)
    prep = {"mode": "crop", "crop": CROP, "dtype": "uint8"}
    meta = {"mode": "crop", "size": [SIZE, SIZE], "dtype": "uint8", "classes": CLASSES, "positive_class": "C3",
            "folds": folds, "fold_seed": 42, "preprocessing": prep, "data_root": str(images_dir),
            "n_images": len(manifest), "manifest_sha256": sha256_file(store_dir / "manifest.csv")}
    (store_dir / "meta.json").write_text(json.dumps(meta, indent=2))
    models_dir = root / "models"
    for k in range(folds):
        write_fold_checkpoint(models_dir / f"fold_{k}", k, meta, manifest)
    return {"root": root, "images": images_dir, "masks": masks_dir, "store": store_dir, "models": models_dir}


def checkpoint_meta(store_meta: dict[str, Any], fold: int) -> CheckpointMeta:
    keep = ("mode", "size", "dtype", "preprocessing", "data_root", "manifest_sha256")
    return CheckpointMeta(model=TINY_MODEL, classes=store_meta["classes"], positive_class=store_meta["positive_class"],
                          input_size=store_meta["size"], preprocessing={k: store_meta[k] for k in keep}, fold=fold)


def write_fold_checkpoint(directory: Path, fold: int, store_meta: dict[str, Any], manifest: pd.DataFrame) -> None:
    """Random but fold-specific weights (seeded by fold), plus the fold's test predictions file."""
    torch.manual_seed(1000 + fold)
    model = create_model(TINY_MODEL, num_classes=len(store_meta["classes"]), in_chans=1)
    # Random BN statistics make each fold's model distinct and its outputs far from 50/50.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    save_checkpoint(directory, model.state_dict(), checkpoint_meta(store_meta, fold))
    test = manifest[manifest["fold"] == fold]
    write_fold_predictions(directory, test[["index", "file", "patient", "fold", "label"]])


def cam_params(tmp_path: str | Path, paths: dict[str, Path], **gradcam: Any) -> Params:
    tmp_path = Path(tmp_path)
    cfg = {"out": str(tmp_path / "reports" / "gradcam"), "per_class": 3, "seed": 0, "masks": str(paths["masks"]),
           "road_percentiles": [30, 70]}
    cfg.update(gradcam)
    return params_from_dict({
        "data": {"root": str(paths["images"]), "positive_class": "C3"},
        "prepare": {"out": str(paths["store"]), "mode": "crop", "crop": CROP, "folds": 2},
        "train": {"out": str(paths["models"]), "model": TINY_MODEL, "device": "cpu"},
        "gradcam": cfg,
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}",
                   "artifact_root": str(tmp_path / "mlruns" / "artifacts"), "experiment": "cam-test"},
    })


def make_parent_run(params: Params, models_dir: Path) -> str:
    """An MLflow CV parent run, finished like train's, and the cv.json that names it."""
    import mlflow

    from src.core.tracking import configure

    configure(params.mlflow)
    with mlflow.start_run(run_name="cv-parent") as run:
        mlflow.log_metric("oof_roc_auc", 0.5)
    run_id = run.info.run_id
    folds = sorted(int(p.name.split("_")[1]) for p in models_dir.glob("fold_*"))
    write_cv(models_dir, CvRun(parent_run_id=run_id, folds=len(folds)))
    return run_id
