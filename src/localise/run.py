"""The locate stage's work: K fold localisers on the prepared store's patient-grouped folds,
each image's box found by the fold model that never saw it, crops cut from those boxes (the
chain evaluate scores), the held-out figures, and an MLflow parent run with a nested run per
fold (file list: src/locate.py).

Resume: a fold folder whose meta.json carries this run's fingerprint (settings, data, code,
threads) is reused, not retrained; `folds/state.json` names the parent run to continue.
"""
from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from src.artifacts.metrics_file import clean, write_headline, write_metrics
from src.artifacts.source_data import is_within, mm_per_pixel
from src.artifacts.store import PreparedStore
from src.core import tracking
from src.core.code_hash import code_fingerprint
from src.core.config import LocateParams, Params, flatten
from src.core.errors import DataError
from src.core.fileio import atomic_path, atomic_write_json, read_json_object
from src.core.runtime import set_threads
from src.data.dataset import dataset_name
from src.data.imaging import read_image
from src.data.preprocess import preprocess_crops
from src.localise.artifact import (
    LocaliserMeta,
    is_localiser,
    load_localiser,
    read_localiser_meta,
    save_localiser,
)
from src.localise.examples import plot_examples
from src.localise.files import (
    CROPS_FILE,
    EXAMPLES_FILE,
    FOLDS_DIR,
    HEADLINE,
    OOF_FILE,
    STATE_FILE,
)
from src.localise.finder import peak_box
from src.localise.foreign import foreign_confidences
from src.localise.heatmap import Peak
from src.localise.oof import (
    Annotated,
    annotated,
    fold_peaks,
    to_source,
    train_fold,
    views_of,
)
from src.localise.refine import FineView
from src.localise.scores import (
    anatomical_mirror_boxes,
    fixed_box,
    mirror_box,
    score_either,
    summary,
)
from src.synthetic.generator import generate

log = logging.getLogger(__name__)
# The code a localiser's weights depend on: an edit elsewhere (scoring, the chain, this file)
# rescores the reused folds instead of training them again.
TRAINING_MODULES = ("localise/network.py", "localise/heatmap.py", "localise/overview.py", "localise/fit.py",
                    "localise/refine.py", "localise/oof.py", "model/schedules.py")
# Settings that change neither the networks nor their scores (min_confidence and both_sides are
# read at use: changing them must not retrain).
RUN_ONLY_KEYS = ("out", "threads", "min_confidence", "both_sides", "unseen_phantom", "enabled")


def enabled(params: Params, store: PreparedStore) -> bool:
    setting = params.locate.enabled
    if setting == "auto":
        return store.meta.get("mode") == "crop"
    if setting and store.meta.get("mode") != "crop":
        raise DataError(f"locate.enabled true: {store.root} is a {store.meta.get('mode')}-mode store without boxes "
                        "to learn from (prepare.mode crop, or locate.enabled auto)")
    return bool(setting)


def fold_path(out: str | Path, fold: int) -> Path:
    return Path(out) / FOLDS_DIR / f"fold_{fold}"


def fingerprint(cfg: LocateParams, store: PreparedStore) -> str:
    import torch

    settings = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in RUN_ONLY_KEYS}
    payload = {"settings": settings, "threads": torch.get_num_threads(),
               "manifest": store.meta.get("manifest_sha256"), "code": code_fingerprint(modules=TRAINING_MODULES)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def other_side_boxes(params: Params, store: PreparedStore, boxes: np.ndarray) -> tuple[np.ndarray, str]:
    """The other side's box of each image: through the ground-truth masks on the phantom (it
    follows the pose), the image mirror elsewhere."""
    masks = Path(params.phantom.masks_out)
    if is_within(params.data.root, params.phantom.out) and masks.is_dir():
        files = [masks / Path(f).with_suffix(".png") for f in store.manifest["file"]]
        if all(f.is_file() for f in files):
            return anatomical_mirror_boxes(boxes, [read_image(f) > 0.5 for f in files]), "phantom masks"
    return mirror_box(boxes, store.manifest["src_width"].to_numpy(np.float64)), "image mirror"


def figures(prefix: str, scores: dict[str, np.ndarray], has_mm: bool) -> dict[str, float]:
    out = {f"{prefix}_{k}": v for k, v in summary(scores).items()}
    if not has_mm:
        out = {k: v for k, v in out.items() if "_mm_" not in k}
    return out


def score(data: Annotated, peaks: list[tuple[Peak, Peak]], mirrors: np.ndarray, mm: np.ndarray | None):
    """(best-peak scores against either side, best boxes, other-side boxes) in source pixels."""
    scale = data.scale()
    centres, sizes = to_source([p[0] for p in peaks], scale)
    mm_px = mm if mm is not None else np.ones(len(peaks))
    return score_either(centres, data.boxes, mirrors, sizes, mm_px)


# ----------------------------------------------------------------------------- training
def fold_models(params: Params, store: PreparedStore, data: Annotated, fp: str, resume: bool,
                mirrors: np.ndarray, mm: np.ndarray | None
                ) -> tuple[list, list, list[tuple[Peak, Peak]], dict[int, float]]:
    """(fold models, their refiners (None: not refined), each image's out-of-fold peaks, seconds
    per fold trained now)."""
    import mlflow

    cfg = params.locate
    peaks: list[tuple[Peak, Peak] | None] = [None] * len(data.overviews)
    models, refiners, seconds = [], [], {}
    for k in range(store.n_folds):
        train, test = store.indices_not_in_fold(k), store.indices_of_fold(k)
        directory = fold_path(cfg.out, k)
        if resume and is_localiser(directory) and read_localiser_meta(directory).fingerprint == fp:
            model, refiner, meta = load_localiser(directory)
            found = fold_peaks([model], [refiner], data.subset(test), cfg)
            log.info("locate: fold %d reused from %s", k, directory)
            if (meta.min_confidence, meta.both_sides) != (cfg.min_confidence, cfg.both_sides):
                # read at use (predict, the served model): the folder must carry today's values
                meta.min_confidence, meta.both_sides = cfg.min_confidence, cfg.both_sides
                atomic_write_json(directory / "meta.json", asdict(meta))
        else:
            started = time.perf_counter()
            with mlflow.start_run(run_name=f"locate_fold_{k}", nested=True) as run:
                mlflow.set_tags({"stage": "locate", "fold": str(k)})

                def on_epoch(epoch: int, record: dict) -> None:
                    mlflow.log_metrics({f"epoch/{key}": v for key, v in record.items()}, step=epoch)

                model, refiner = train_fold(data, train, cfg, cfg.seed + k, f"locate fold {k}", on_epoch)
                found = fold_peaks([model], [refiner], data.subset(test), cfg)
                fold_figs = figures("fold", score(data.subset(test), found, mirrors[test],
                                                  None if mm is None else mm[test]), mm is not None)
                fold_figs["fold_seconds"] = time.perf_counter() - started
                mlflow.log_metrics(tracking.mlflow_metrics(fold_figs))
                refine = FineView.of(cfg.refine).as_meta() if refiner is not None else None
                meta = LocaliserMeta(model=cfg.model, size=list(cfg.size), min_confidence=cfg.min_confidence,
                                     both_sides=cfg.both_sides, fold=k, fingerprint=fp,
                                     mlflow_run_id=run.info.run_id, figures=fold_figs, refine=refine)
                save_localiser(directory, model.state_dict(), meta,
                               None if refiner is None else refiner.state_dict())
                mlflow.log_artifacts(str(directory), artifact_path="localiser")
            seconds[k] = time.perf_counter() - started
        for i, p in zip(test, found):
            peaks[i] = p
        models.append(model)
        refiners.append(refiner)
    return models, refiners, peaks, seconds  # type: ignore[return-value]


def parent_run(params: Params, store: PreparedStore, fp: str, resume: bool):
    """The MLflow parent run: the one in state.json when it still matches, else a new one."""
    import mlflow
    from mlflow.tracking import MlflowClient

    cfg = params.locate
    tracking.configure(params.mlflow)
    state_path = Path(cfg.out) / FOLDS_DIR / STATE_FILE
    if resume and state_path.is_file():
        state = read_json_object(state_path, "locate state")
        run_id = state.get("parent_run_id")
        client = MlflowClient()
        if state.get("fingerprint") == fp and run_id and tracking.run_state(client, run_id, params.mlflow) == "active":
            log.info("locate: continuing MLflow run %s", run_id)
            _mark_killed(client, run_id)
            return mlflow.start_run(run_id=run_id)
    h, w = cfg.size
    run = mlflow.start_run(run_name=f"locate_{cfg.model}_{dataset_name(params)}_{h}x{w}_e{cfg.epochs}")
    mlflow.set_tags({"stage": "locate", "git_commit": tracking.git_commit(),
                     "mlflow.note.content": "Cortex localiser (heat-map centre + size heads) on the prepared "
                                            "store's patient-grouped folds; every image's box found by the fold "
                                            "model that never saw it. Figures: metrics.json."})
    tracking.log_params_flat({**flatten({"locate": cfg.model_dump(mode="json")}),
                              "prepare.out": params.prepare.out, "data.name": dataset_name(params)})
    atomic_write_json(state_path, {"fingerprint": fp, "parent_run_id": run.info.run_id})
    return run


def _mark_killed(client, parent_id: str) -> None:
    """Fold runs a killed locate left RUNNING: KILLED, so the UI does not show them as live."""
    parent = client.get_run(parent_id)
    for run in client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent_id}' and attributes.status = 'RUNNING'"):
        client.set_terminated(run.info.run_id, "KILLED")
        log.info("locate: fold run %s of an interrupted locate marked KILLED", run.info.run_id)


# ----------------------------------------------------------------------------- outputs
def oof_table(store: PreparedStore, data: Annotated, peaks, scores, mirrors: np.ndarray,
              min_confidence: float) -> pd.DataFrame:
    m = store.manifest
    scale = data.scale()
    best = np.array([peak_box(p[0], tuple(s), hw) for p, s, hw in zip(peaks, scale, data.src_hw)])
    other = np.array([peak_box(p[1], tuple(s), hw) for p, s, hw in zip(peaks, scale, data.src_hw)])
    conf = np.array([p[0].confidence for p in peaks])
    frame = pd.DataFrame({"index": np.arange(len(m)), "file": m["file"], "patient": m["patient"], "fold": m["fold"],
                          "label": m["label"]})
    for j, c in enumerate(("x", "y", "w", "h")):
        frame[f"box_{c}"] = data.boxes[:, j]
    for j, c in enumerate(("x", "y", "w", "h")):  # the annotated box on the other side (what "other" scores against)
        frame[f"mirror_{c}"] = mirrors[:, j]
    for j, c in enumerate(("x", "y", "w", "h")):
        frame[f"found_{c}"] = best[:, j]
    frame["confidence"] = conf
    for j, c in enumerate(("x", "y", "w", "h")):
        frame[f"other_{c}"] = other[:, j]
    frame["other_confidence"] = [p[1].confidence for p in peaks]
    frame["found"] = conf >= min_confidence
    frame["iou"] = scores["iou"]
    frame["side"] = scores["side"]
    frame["centre_error_px"] = scores["error_px"]
    return frame


def write_crops(out: Path, store: PreparedStore, table: pd.DataFrame) -> Path:
    """(N, 2, S, S) crops from the found boxes, best side then the other side, in store order:
    what the classifier sees when no box is given (evaluate scores the chain on them)."""
    root = Path(store.meta["data_root"])
    s = int(store.images.shape[1])
    crops = np.zeros((len(table), 2, s, s), dtype=store.images.dtype)
    for i, row in enumerate(table.itertuples(index=False)):
        boxes = [(row.found_x, row.found_y, row.found_w, row.found_h),
                 (row.other_x, row.other_y, row.other_w, row.other_h)]
        crops[i] = np.stack(preprocess_crops(read_image(root / row.file), store.meta, boxes))
    return save_array(out / CROPS_FILE, crops)


def save_array(path: Path, array: np.ndarray) -> Path:
    with atomic_path(path, array.nbytes + 4096) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array)
    return path


def unseen_phantom(params: Params, models: list, refiners: list) -> dict[str, float]:
    """The fold ensemble on a phantom it never saw (another seed, more nuisance)."""
    u = params.locate.unseen_phantom
    with tempfile.TemporaryDirectory(prefix="locate-unseen-") as tmp:
        p = params.phantom.model_copy(update={"out": f"{tmp}/phantom", "masks_out": f"{tmp}/masks", "seed": u.seed,
                                              "nuisance": u.nuisance, "patients_per_class": u.patients_per_class})
        generate(p)
        manifest = pd.read_csv(Path(p.out) / "manifest.csv")
        images = [read_image(Path(p.out) / f) for f in manifest["file"]]
        masks = [read_image(Path(p.masks_out) / Path(f).with_suffix(".png")) > 0.5 for f in manifest["file"]]
    src_hw = np.array([im.shape[:2] for im in images], dtype=np.float64)
    overviews, fines = views_of(images, params.locate)
    data = Annotated(overviews, src_hw, manifest[["box_x", "box_y", "box_w", "box_h"]].to_numpy(np.float64), fines)
    mirrors = anatomical_mirror_boxes(data.boxes, masks)
    mm = p.field_width_mm / src_hw[:, 1]
    peaks = fold_peaks(models, refiners, data, params.locate)
    every = np.arange(len(images))
    out = figures("locate_unseen", score(data, peaks, mirrors, mm), True)
    out.update(figures("locate_unseen_fixed_box", fixed_box(data.boxes, src_hw, every, every, mirrors, mm), True))
    out["locate_unseen_confidence_min"] = float(min(pk[0].confidence for pk in peaks))
    out["locate_unseen_n_images"] = len(images)
    return out


def run_locate(params: Params, resume: bool = True) -> dict[str, Any]:
    """Train or reuse the fold localisers, score them, write locate.out; returns metrics.json."""
    import mlflow

    cfg = params.locate
    out = Path(cfg.out)
    store = PreparedStore.open(params.prepare.out)
    if not enabled(params, store):
        return write_disabled(out, store)
    set_threads(cfg.threads)
    started = time.perf_counter()
    data = annotated(store, store.meta["data_root"], cfg)
    mirrors, other_side = other_side_boxes(params, store, data.boxes)
    mm = mm_per_pixel(params.data.root, params.phantom.out, params.phantom.field_width_mm, data.src_hw[:, 1])
    fp = fingerprint(cfg, store)
    with parent_run(params, store, fp, resume):
        models, refiners, peaks, seconds = fold_models(params, store, data, fp, resume, mirrors, mm)
        scores = score(data, peaks, mirrors, mm)
        metrics: dict[str, Any] = figures("locate_oof", scores, mm is not None)
        drawn = annotated_side(data, peaks, mm)
        metrics.update(figures("locate_annotated_side", drawn, mm is not None))
        base = [fixed_box(data.boxes, data.src_hw, store.indices_not_in_fold(k), store.indices_of_fold(k), mirrors,
                          mm if mm is not None else np.ones(len(data.boxes))) for k in range(store.n_folds)]
        pooled = {key: np.concatenate([b[key] for b in base]) for key in ("iou", "error_px", "error_mm")}
        metrics.update(figures("locate_fixed_box", pooled, mm is not None))
        conf = np.array([p[0].confidence for p in peaks])
        foreign = foreign_confidences(models, tuple(cfg.size))
        metrics.update({"locate_confidence_min": float(conf.min()), "locate_confidence_median": float(np.median(conf)),
                        "locate_foreign_confidence_max": float(max(foreign.values())),
                        "locate_min_confidence": cfg.min_confidence,
                        "locate_n_not_found": int((conf < cfg.min_confidence).sum()),
                        "locate_n_images": len(conf), "locate_n_folds": store.n_folds,
                        "locate_other_side": other_side,
                        # which localisers these figures are of: register quotes them only for these
                        "locate_fingerprint": fp})
        metrics.update({f"locate_foreign_confidence_{name}": v for name, v in foreign.items()})
        if seconds:
            metrics["locate_seconds_per_fold"] = float(np.mean(list(seconds.values())))
        warning = worse_than_fixed_box(metrics)
        if warning:
            log.warning("locate: %s", warning)
            metrics["locate_warning"] = warning
            mlflow.set_tag("bone_health.warnings", warning)
        if _unseen_enabled(params):
            metrics.update(unseen_phantom(params, models, refiners))
        table = oof_table(store, data, peaks, scores, mirrors, cfg.min_confidence)
        if mm is not None:
            table["centre_error_mm"] = scores["error_mm"]
        with atomic_path(out / OOF_FILE) as tmp:
            table.to_csv(tmp, index=False, float_format="%.3f")
        write_crops(out, store, table)
        metrics["locate_seconds"] = time.perf_counter() - started
        metrics = {k: clean(v) for k, v in metrics.items()}
        write_metrics(out, metrics)
        write_headline(out, metrics, HEADLINE)
        plot_examples(out / EXAMPLES_FILE, store, table, data)
        mlflow.log_metrics(tracking.mlflow_metrics({k.removeprefix("locate_"): v for k, v in metrics.items()}))
        for name in (OOF_FILE, "metrics.json", EXAMPLES_FILE):
            mlflow.log_artifact(str(out / name))
    return metrics


def worse_than_fixed_box(metrics: dict[str, Any]) -> str | None:
    """A warning when the localisers find no more boxes out of fold than a fixed box does (the
    peak on either side, and the peak on the annotated side, both at most the fixed box's hits):
    their boxes must not be served as if they were found."""
    found = max(metrics["locate_oof_hit_rate"], metrics["locate_annotated_side_hit_rate"])
    fixed = metrics["locate_fixed_box_hit_rate"]
    if found > fixed:
        return None
    return (f"the localisers find {found:.1%} of the boxes out of fold (IoU >= 0.5), no more than a fixed box "
            f"({fixed:.1%}): do not trust the boxes they find; annotate more images, or train longer "
            "(locate.min_steps, locate.epochs)")


def annotated_side(data: Annotated, peaks, mm: np.ndarray | None) -> dict[str, np.ndarray]:
    """Scores of the peak on the half the annotator drew (the best one if it is there, else the
    other side's) against the annotated box: how well the cortex is found where it was drawn."""
    scale = data.scale()
    c_best, s_best = to_source([p[0] for p in peaks], scale)
    c_other, s_other = to_source([p[1] for p in peaks], scale)
    half = data.src_hw[:, 1] / 2
    same = ((data.boxes[:, 0] + data.boxes[:, 2] / 2) < half) == (c_best[:, 0] < half)
    centres = np.where(same[:, None], c_best, c_other)
    sizes = np.where(same[:, None], s_best, s_other)
    return score_either(centres, data.boxes, data.boxes, sizes, mm if mm is not None else np.ones(len(peaks)))


def _unseen_enabled(params: Params) -> bool:
    setting = params.locate.unseen_phantom.enabled
    return is_within(params.data.root, params.phantom.out) if setting == "auto" else bool(setting)


def write_disabled(out: Path, store: PreparedStore) -> dict[str, Any]:
    """Full mode: nothing to locate; the stage's outputs say so (DVC needs them to exist)."""
    (out / FOLDS_DIR).mkdir(parents=True, exist_ok=True)
    with atomic_path(out / OOF_FILE) as tmp:
        pd.DataFrame(columns=["index", "file", "found"]).to_csv(tmp, index=False)
    save_array(out / CROPS_FILE, np.zeros((0, 2, 1, 1), dtype=np.uint8))
    metrics = {"locate_enabled": False, "locate_reason": f"{store.meta.get('mode')}-mode store: no box is needed"}
    write_metrics(out, metrics)
    write_headline(out, metrics, HEADLINE)
    plot_examples(out / EXAMPLES_FILE, store, None, None)
    log.info("locate: skipped (%s)", metrics["locate_reason"])
    return metrics

