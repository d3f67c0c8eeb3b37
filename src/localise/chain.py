"""The whole chain, out of fold: the classifier's AUC on crops cut at the boxes the localiser
found, next to its AUC on the annotated boxes (evaluate reports both).

Each image is classified by the fold model that never saw it, on crops cut at the box found by
the fold localiser that never saw it (the same patient-grouped folds), so neither network has
met the image.  Radiographs on which no cortex was found (confidence below
locate.min_confidence) get no prediction, as in predict: they are counted, not scored.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from src.artifacts.checkpoint import read_meta
from src.artifacts.cv_run import CvRun, fold_checkpoint_dirs
from src.core.config import Params
from src.core.errors import DataError
from src.evaluation.metrics import METRIC_KEYS, bootstrap_auc_ci, classification_metrics
from src.localise.files import CROPS_FILE, OOF_FILE

log = logging.getLogger(__name__)


def located_predictions(params: Params, cv: CvRun, oof: pd.DataFrame) -> pd.DataFrame | None:
    """Per OOF row: the fold model's probabilities on the best-side crop, the other side's and
    their mean, with the localiser's confidences; None when locate.out holds no boxes (full mode,
    or locate never ran)."""
    out = Path(params.locate.out)
    dirs = fold_checkpoint_dirs(params.train.out, cv)
    if read_meta(dirs[0]).mode != "crop":
        return None  # full mode: the classifier needs no box, there is no chain to score
    if not (out / CROPS_FILE).is_file() or not (out / OOF_FILE).is_file():
        log.info("evaluate: %s has no found boxes (run `python -m src.locate`): the chain is not scored", out)
        return None
    boxes = pd.read_csv(out / OOF_FILE, dtype={"file": str})
    crops = np.load(out / CROPS_FILE, mmap_mode="r")
    if not len(boxes):
        return None
    if len(crops) != len(boxes):
        raise DataError(f"{out / CROPS_FILE}: {len(crops)} crops for {len(boxes)} rows of {OOF_FILE}; "
                        "rerun `python -m src.locate`")
    idx = oof["index"].to_numpy(dtype=np.int64)
    if idx.max(initial=-1) >= len(boxes) or not (boxes["file"].to_numpy()[idx] == oof["file"].to_numpy()).all() \
            or not (boxes["fold"].to_numpy()[idx] == oof["fold"].to_numpy()).all():
        raise DataError(f"{out / OOF_FILE}: its images or folds differ from the CV in {params.train.out}; "
                        "locate and train read different prepared stores: rerun `python -m src.locate`")
    # torch only when there are crops to classify: evaluate stays light in full mode
    from src.model.factory import load_checkpoint, predict_proba

    rows = []
    for directory in dirs:
        model, meta = load_checkpoint(directory)
        part = oof[oof["fold"] == meta.fold]
        i = part["index"].to_numpy(dtype=np.int64)
        best = predict_proba(model, np.asarray(crops[i, 0]), meta)
        other = predict_proba(model, np.asarray(crops[i, 1]), meta)
        frame = pd.DataFrame({"row": part.index.to_numpy(), "confidence": boxes["confidence"].to_numpy()[i],
                              "other_confidence": boxes["other_confidence"].to_numpy()[i]})
        for j, c in enumerate(meta.classes):
            frame[f"best_prob_{c}"] = best[:, j]
            frame[f"other_prob_{c}"] = other[:, j]
        rows.append(frame)
    return pd.concat(rows).set_index("row").loc[oof.index]


def chain_metrics(params: Params, cv: CvRun, oof: pd.DataFrame, classes: list[str], positive: str,
                  annotated_auc: float | None) -> dict[str, Any]:
    """chain_* figures (empty when there are no found boxes)."""
    pred = located_predictions(params, cv, oof)
    if pred is None:
        return {}
    cfg, both_sides = params.evaluate, params.locate.both_sides
    threshold = params.locate.min_confidence
    found = pred["confidence"].to_numpy() >= threshold
    other_ok = pred["other_confidence"].to_numpy() >= threshold
    best = pred[[f"best_prob_{c}" for c in classes]].to_numpy(np.float64)
    other = pred[[f"other_prob_{c}" for c in classes]].to_numpy(np.float64)
    both = np.where(other_ok[:, None], (best + other) / 2, best)
    y = oof["label"].to_numpy(dtype=int)
    patients = oof["patient"].to_numpy()
    pos = classes.index(positive)
    out: dict[str, Any] = {"chain_n_not_found": int((~found).sum()), "chain_n_scored": int(found.sum()),
                           "chain_both_sides_used": int((found & other_ok).sum())}
    for name, probs in (("best_side", best), ("both_sides", both)):
        m = classification_metrics(y[found], probs[found], pos, cfg.threshold, cfg.calibration_bins)
        out[f"chain_{name}_oof_roc_auc"] = m["roc_auc"]
    chosen = both if both_sides else best
    m = classification_metrics(y[found], chosen[found], pos, cfg.threshold, cfg.calibration_bins)
    out.update({f"chain_oof_{k}": m[k] for k in METRIC_KEYS})
    binary = len(classes) == 2
    ci = bootstrap_auc_ci((y[found] == pos).astype(int) if binary else y[found],
                          chosen[found, pos] if binary else chosen[found], patients[found],
                          n=cfg.bootstrap, ci=cfg.ci, seed=cfg.seed)
    out["chain_oof_roc_auc_ci_low"], out["chain_oof_roc_auc_ci_high"] = ci.low, ci.high
    out["chain_sides"] = "both averaged" if both_sides else "best peak"
    if annotated_auc is not None and out["chain_oof_roc_auc"] is not None:
        out["chain_auc_gap"] = float(annotated_auc) - float(out["chain_oof_roc_auc"])
    return out
