"""Tiny prepared stores and params for the training, evaluation, tuning and CAM tests.

`make_tiny_store` writes the prepared-store layout of docs/ARCHITECTURE.md (images.npy,
manifest.csv, meta.json) with a learnable signal: a bright horizontal band whose
thickness grows with the class index, on a noisy background.  Patients may have several
images; folds are patient-grouped and stratified, like src.prepare's.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from src.core.config import Params, params_from_dict
from src.core.fileio import sha256_file

TINY_MODEL = "test_efficientnet"


def make_tiny_store(
    root: str | Path,
    n_per_class: int = 12,
    size: int = 32,
    classes: Sequence[str] = ("C1", "C3"),
    folds: int = 3,
    *,
    images_per_patient: int = 1,
    positive_class: str | None = None,
    seed: int = 0,
    fold_seed: int = 42,
    noise: float = 20.0,
    dtype: str = "uint8",
) -> Path:
    """Write a store with `n_per_class` patients per class at `root`; returns `root`.

    Class c's image has a band of thickness 2 + 3c (scaled by size/32) at a jittered height.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    classes = list(classes)
    scale = size / 32.0
    maxval = 255 if dtype == "uint8" else 65535
    images, rows = [], []
    for label, name in enumerate(classes):
        for p in range(n_per_class):
            patient = f"P{label}{p:03d}"
            for k in range(images_per_patient):
                img = rng.normal(70, noise, (size, size))
                thick = max(1, round((2 + 3 * label) * scale))
                top = int(rng.integers(size // 4, max(size // 4 + 1, size // 2)))
                img[top:top + thick, :] += 120
                img = np.clip(img, 0, 255) / 255.0 * maxval
                images.append(img.astype(dtype))
                rows.append({"file": f"{name}/{patient}_{k}.png", "class": name, "label": label, "patient": patient})
    manifest = pd.DataFrame(rows)
    manifest.insert(0, "index", np.arange(len(manifest)))
    fold_of = np.zeros(len(manifest), dtype=int)
    sgkf = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=fold_seed)
    for k, (_, test) in enumerate(sgkf.split(np.zeros(len(manifest)), manifest["label"], manifest["patient"])):
        fold_of[test] = k
    manifest["fold"] = fold_of
    manifest["src_height"] = size
    manifest["src_width"] = size
    for col in ("box_x", "box_y", "box_w", "box_h", "crop_x0", "crop_y0", "crop_side"):
        manifest[col] = np.nan
    manifest["sha256"] = [f"{i:064x}" for i in range(len(manifest))]
    np.save(root / "images.npy", np.stack(images))
    manifest.to_csv(root / "manifest.csv", index=False)
    meta = {
        "mode": "crop", "size": [size, size], "dtype": dtype, "classes": classes,
        "positive_class": positive_class or classes[-1], "folds": folds, "fold_seed": fold_seed,
        "preprocessing": {"mode": "crop", "crop": {"size": size}}, "data_root": "tiny",
        "n_images": len(manifest), "manifest_sha256": sha256_file(root / "manifest.csv"),
    }
    (root / "meta.json").write_text(json.dumps(meta, indent=2))
    return root


def write_params(params: Params, path: str | Path) -> str:
    """The params as a YAML file for the CLIs' --params (and subprocesses); returns its path."""
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
    return str(path)


def tiny_params(tmp_path: str | Path, store: str | Path, **train: Any) -> Params:
    """Params for a fast CPU run of the tiny model on `store`, everything under tmp_path."""
    tmp_path = Path(tmp_path)
    store = Path(store)
    meta = json.loads((store / "meta.json").read_text())
    train_cfg = {
        "out": str(tmp_path / "models"), "model": TINY_MODEL, "epochs": 2,
        "batch_size": 8, "lr": 0.01, "scheduler": "none", "early_stopping_patience": 0,
        "channels_last": False, "device": "cpu", "val_fraction": 0.25, "drop_rate": 0.0,
        # One thread: the tiny model gains nothing from more, and on a shared CPU extra
        # OpenMP threads spin against other processes (several times slower).
        "threads": 1,
        # The tests of early stopping and best-epoch choice need a criterion; the shipped
        # default (last) is covered by test_checkpoint_criterion_picks_the_epoch_it_names.
        "checkpoint": "val_auc", "checkpoint_from": 0.0,
    }
    train_cfg.update(train)
    raw = {
        "data": {"positive_class": meta["positive_class"], "name": "tiny"},
        "prepare": {"out": str(store), "folds": meta["folds"]},
        "train": train_cfg,
        "evaluate": {"out": str(tmp_path / "reports"), "bootstrap": 200},
        "locate": {"out": str(tmp_path / "localiser")},   # never the checkout's own localiser/
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}",
                   "artifact_root": str(tmp_path / "mlruns" / "artifacts"), "experiment": "tiny"},
    }
    return params_from_dict(raw)
