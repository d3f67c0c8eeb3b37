"""Warnings about data too small for what the settings ask of it, said before training starts.

A user's first dataset is often a few dozen images.  Training still runs, but the figures it
gives then mean little, and the user should hear why before reading them: the inner validation
split that picks the checkpoint may hold a handful of images, and an EfficientNet trained from
scratch on fewer than ~100 images rarely beats chance.  The lines go to the console, the CV
parent run (tag `bone_health.warnings`), cv.json, and from there evaluate's metrics.json.
"""
from __future__ import annotations

import numpy as np

from src.artifacts.store import PreparedStore
from src.core.config import Params
from src.core.errors import DataError
from src.data.splits import fold_split

MIN_VAL_IMAGES = 10
MIN_VAL_PATIENTS_PER_CLASS = 3
MIN_IMAGES_FROM_SCRATCH = 100


def data_warnings(params: Params, store: PreparedStore) -> list[str]:
    cfg = params.train
    small_val: list[str] = []
    smallest_train = None
    for k in range(store.n_folds):
        try:
            split = fold_split(store, k, cfg.val_fraction, cfg.seed)
        except DataError:
            return []  # training stops on it with its own one-line error
        per_class = {c: len(np.unique(store.patients[split.val][store.labels[split.val] == i]))
                     for i, c in enumerate(store.classes)}
        if len(split.val) < MIN_VAL_IMAGES or min(per_class.values()) < MIN_VAL_PATIENTS_PER_CLASS:
            counts = ", ".join(f"{c} {n}" for c, n in per_class.items())
            small_val.append(f"fold {k}: {len(split.val)} images (patients per class: {counts})")
        smallest_train = len(split.train) if smallest_train is None else min(smallest_train, len(split.train))
    out = []
    if small_val:
        out.append(
            f"small inner validation split (train.val_fraction {cfg.val_fraction}; fewer than {MIN_VAL_IMAGES} images "
            f"or {MIN_VAL_PATIENTS_PER_CLASS} patients of a class) in {len(small_val)} of {store.n_folds} folds, e.g. "
            f"{small_val[0]}: the checkpoint is chosen on very few images, so val_auc is noisy and the chosen epoch "
            "close to arbitrary; add data, or lower prepare.folds / raise train.val_fraction")
    if smallest_train is not None and smallest_train < MIN_IMAGES_FROM_SCRATCH and not (cfg.pretrained or cfg.weights):
        out.append(
            f"training from scratch on {smallest_train} images (fewer than {MIN_IMAGES_FROM_SCRATCH}) in the smallest "
            "fold: expect an AUC near chance and folds that disagree; start from pretrained weights "
            "(train.weights: FILE, or train.pretrained: true with the weights in the local cache, see README)")
    return out
