"""Explanations by out-of-fold models (the gradcam stage's work), and of single new radiographs.

Each stored image is explained by the fold model whose test fold holds it (never by a model
that trained on it); maps are scored for localisation against ground-truth masks when there
are some, and for faithfulness (ROAD) always.  Outputs: src/gradcam.py.
"""
from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from src.artifacts.checkpoint import CheckpointMeta, is_complete
from src.artifacts.cv_run import (
    PREDICTIONS_FILE,
    cv_provenance,
    fold_dir,
    open_parent_run,
    read_cv,
    read_fold_predictions,
)
from src.artifacts.metrics_file import (
    with_provenance,
    write_headline,
    write_metrics,
)
from src.artifacts.model_ref import checkpoint_dirs
from src.artifacts.source_data import AUTO, is_within, mm_per_pixel
from src.artifacts.store import MANIFEST_FILE, PreparedStore
from src.core.config import GradcamParams, Params
from src.core.errors import BoneHealthError, DataError
from src.core.fileio import atomic_dir, atomic_write_text
from src.core.runtime import select_device
from src.core.tracking import mlflow_metrics, tracking_uri
from src.data.imaging import read_image
from src.data.preprocess import preprocess_image, resize, square_crop
from src.explain.cam import (
    explain_ensemble,
    explain_tensor,
    resize_map,
    resolve_target_layers,
)
from src.explain.faithfulness import (
    ZERO_BASELINE,
    localisation,
    perturbation_score,
    random_map,
    ratios,
    summarise,
)
from src.explain.figures import SheetItem, caption, save_contact_sheet, save_overlay
from src.explain.sanity import CascadeStep, randomised_cascade, rank_similarity
from src.model.factory import load_checkpoint, to_input

log = logging.getLogger(__name__)

METRIC_PREFIX = "gradcam_"
ARTIFACT_PATH = "gradcam"
IMAGES_DIR = "images"
IMAGES_FILE = "images.csv"
EXAMPLE_FILE = "example.png"
# One contact sheet per class, `<class>.png`, in a folder of their own: dvc.yaml declares the
# folder as image plots whatever the classes are called.  Leading underscore: never a class.
SHEETS_DIR = "_contact_sheets"
LOCALISATION_KEYS = ("energy_inside", "pointing_hit", "pointing_inside", "area_fraction", "pointing_tolerance_px")
RANDOMIZATION_KEY = "randomization_similarity"
# Zhang et al.'s pointing tolerance, 15 px at 224 px, as a share of the image side: used where
# the pixel size in mm is unknown.
ZHANG_TOLERANCE = 15 / 224
# headline.json (the DVC metric; `make exp`): the localisation figures - the share of the maps'
# energy inside the ground-truth region beside what a map spread evenly would put there (the
# region's share of the image), and the pointing game - null without masks; and the sanity
# check's similarity to maps of randomised models (null when off).
HEADLINE = {"cam_in": METRIC_PREFIX + "energy_inside_all", "cam_chance": METRIC_PREFIX + "area_fraction_all",
            "cam_pointing": METRIC_PREFIX + "pointing_hit_all",
            "cam_random_sim": METRIC_PREFIX + RANDOMIZATION_KEY + "_all"}


# ------------------------------------------------------------------ selection and the OOF rule
def select_images(store: PreparedStore, per_class: int, seed: int) -> dict[str, np.ndarray]:
    """Store indices of `per_class` random images of each class (all of a smaller class), sorted.
    One image per patient comes first: a patient's second radiograph shows the network little that
    the first did not, so more images of one patient are taken only when the class runs out."""
    rng = np.random.default_rng(seed)
    patients = store.patients
    chosen: dict[str, np.ndarray] = {}
    for label, name in enumerate(store.classes):
        order = rng.permutation(np.flatnonzero(store.labels == label))
        seen: set[str] = set()
        first, again = [], []
        for row in order:
            (again if patients[row] in seen else first).append(int(row))
            seen.add(patients[row])
        chosen[name] = np.sort(np.array((first + again)[:per_class], dtype=np.int64))
    return chosen


@dataclass
class FoldModel:
    fold: int
    directory: Path
    model: torch.nn.Module
    meta: CheckpointMeta
    layer_names: list[str]           # empty for saliency
    test_indices: set[int] | None    # from test_predictions.csv when present
    cascade: list[CascadeStep] | None = None  # randomised copies, built on first use

    def layers(self, model: torch.nn.Module | None = None) -> list[torch.nn.Module] | None:
        """The target layers of `model` (this fold's, or a randomised copy of it)."""
        model = self.model if model is None else model
        return [model.get_submodule(n) for n in self.layer_names] or None


def load_fold_model(train_out: Path, fold: int, store: PreparedStore, cfg: GradcamParams, device) -> FoldModel:
    """fold_<k>'s checkpoint, checked to be the model whose TEST fold is k on this very store."""
    directory = fold_dir(train_out, fold)
    if not is_complete(directory):
        raise DataError(f"{directory}: fold checkpoint not found; run `python -m src.train` first")
    model, meta = load_checkpoint(directory, device=device)
    if meta.fold != int(fold):
        raise DataError(f"{directory / 'meta.json'}: fold is {meta.fold!r}, expected {fold}")
    if meta.classes != store.classes:
        raise DataError(f"{directory / 'meta.json'}: classes {meta.classes} differ from the store's {store.classes}")
    trained_on = meta.manifest_sha256
    if trained_on and store.meta.get("manifest_sha256") and trained_on != store.meta["manifest_sha256"]:
        # Another manifest may assign other folds: the OOF guarantee would not hold.
        raise DataError(f"{directory}: trained on a different prepared store (manifest sha256 {trained_on[:12]}... "
                        f"!= {store.meta['manifest_sha256'][:12]}...); retrain or point prepare.out at its store")
    test_indices = None
    if (directory / PREDICTIONS_FILE).is_file():
        test_indices = set(read_fold_predictions(train_out, fold)["index"].astype(int))
    return FoldModel(fold, directory, model, meta, target_layer_names(model, meta, store, cfg), test_indices)


def target_layer_names(model: torch.nn.Module, meta: CheckpointMeta, store: PreparedStore,
                       cfg: GradcamParams) -> list[str]:
    """The modules gradcam.target_layer names in this model at its input size; none for saliency."""
    if cfg.method == "saliency":
        return []
    shape = (1, meta.in_chans, *[int(v) for v in (meta.input_size or store.meta["size"])])
    return [name for name, _ in resolve_target_layers(model, cfg.target_layer, shape)]


def out_of_fold_model(models: dict[int, FoldModel], store: PreparedStore, row: int) -> FoldModel:
    """The model that never trained on store image `row`: the one whose test fold holds it."""
    fold = int(store.folds[row])
    fm = models.get(fold)
    if fm is None:
        raise DataError(f"image {store.manifest['file'].iat[row]}: no model for its test fold {fold}")
    index = int(store.manifest["index"].iat[row]) if "index" in store.manifest else row
    if fm.test_indices is not None and index not in fm.test_indices:
        raise DataError(f"image {store.manifest['file'].iat[row]} (index {index}) is not in {fm.directory / PREDICTIONS_FILE}: "
                        f"refusing to explain it with a model that may have trained on it")
    return fm


# ----------------------------------------------------------------------------- masks
def masks_folder(params: Params) -> Path | None:
    """gradcam.masks as a folder, or None: `auto` is the phantom's masks when data.root is the
    phantom (real data has no ground truth)."""
    setting = params.gradcam.masks
    if setting == AUTO:
        return Path(params.phantom.masks_out) if is_within(params.data.root, params.phantom.out) else None
    return Path(setting) if setting else None


def mask_path(masks_root: str | Path, file: str) -> Path:
    """Masks mirror the image tree under data.root, always as PNG."""
    return Path(masks_root) / Path(file).with_suffix(".png")


def mask_for(store: PreparedStore, row: int, masks_root: str | Path) -> np.ndarray:
    """The ground-truth region of store image `row` in stored-image pixels (bool (H, W)),
    cut and resized exactly like the image (src.data.preprocess geometry and padding)."""
    rec = store.manifest.iloc[row]
    path = mask_path(masks_root, rec["file"])
    if not path.is_file():
        raise DataError(f"{path}: mask not found for image {rec['file']} (gradcam.masks: null for data without masks)")
    mask = read_image(path)
    src_hw = (int(rec["src_height"]), int(rec["src_width"]))
    if mask.shape != src_hw:
        raise DataError(f"{path}: mask is {mask.shape[1]}x{mask.shape[0]}, its image {rec['file']} is {src_hw[1]}x{src_hw[0]}")
    size = tuple(int(v) for v in store.images.shape[1:3])
    if store.meta.get("mode") == "crop":
        if any(pd.isna(rec[c]) for c in ("crop_x0", "crop_y0", "crop_side")):
            raise DataError(f"{store.root / MANIFEST_FILE}: crop geometry missing for {rec['file']}")
        mask = square_crop(mask, int(rec["crop_x0"]), int(rec["crop_y0"]), int(rec["crop_side"]))
    # Area averaging then a 0.5 threshold: a stored pixel is "in" when most of it is.
    return resize(mask.astype(np.float32), size) >= 0.5


def stored_box(store: PreparedStore, row: int) -> tuple[float, float, float, float] | None:
    """The annotated cortex box of store image `row` in stored-image pixels (x, y, w, h), for
    figures of data without masks; None when the image has no box."""
    rec = store.manifest.iloc[row]
    if not all(c in rec and pd.notna(rec[c]) for c in ("box_x", "box_y", "box_w", "box_h")):
        return None
    height, width = (int(v) for v in store.images.shape[1:3])
    if store.meta.get("mode") == "crop":
        if any(pd.isna(rec.get(c)) for c in ("crop_x0", "crop_y0", "crop_side")):
            return None
        sx = sy = width / float(rec["crop_side"])
        x0, y0 = float(rec["crop_x0"]), float(rec["crop_y0"])
    else:
        sx, sy, x0, y0 = width / float(rec["src_width"]), height / float(rec["src_height"]), 0.0, 0.0
    return ((float(rec["box_x"]) - x0) * sx, (float(rec["box_y"]) - y0) * sy, float(rec["box_w"]) * sx,
            float(rec["box_h"]) * sy)


# ----------------------------------------------------------------------------- the stage
def _target_class(cfg: GradcamParams, store: PreparedStore, label: int) -> int | None:
    if cfg.target == "true":
        return int(label)
    if cfg.target == "positive":
        return store.classes.index(store.positive_class)
    return None  # the predicted class


def _output_name(file: str, cls: str, taken: set[str]) -> str:
    parts = Path(file).parts
    parts = parts[1:] if len(parts) > 1 and parts[0] == cls else parts
    name = "__".join(Path(*parts).with_suffix("").parts) + ".png"
    stem = name[:-4]
    k = 1
    while name in taken:
        name = f"{stem}_{k}.png"
        k += 1
    taken.add(name)
    return name


def pointing_tolerance_px(store: PreparedStore, row: int, tolerance_mm: float, mm_src: float | None) -> float:
    """gradcam.pointing_tolerance_mm in stored-image pixels of store image `row`; without a
    mm scale (real data), Zhang et al.'s 15 px at 224 px as a share of the image side."""
    size = tuple(int(v) for v in store.images.shape[1:3])
    if mm_src is None or not np.isfinite(mm_src) or mm_src <= 0:
        return ZHANG_TOLERANCE * max(size)
    rec = store.manifest.iloc[row]
    if store.meta.get("mode") == "crop":
        stored_per_src = size[1] / float(rec["crop_side"])
    else:
        stored_per_src = size[1] / float(rec["src_width"])
    return float(tolerance_mm * stored_per_src / mm_src)


def step_similarities(fm: FoldModel, x: torch.Tensor, cam_in: np.ndarray, target: int,
                      cfg: GradcamParams) -> list[tuple[str, float]]:
    """(deepest group randomised, |rank correlation| of the map with that step's map) for each
    step of the fold model's randomised cascade (src/explain/sanity.py), explaining the same
    class.  The cascade is built on first use, in gradcam.randomization_steps steps."""
    if fm.cascade is None:
        fm.cascade = randomised_cascade(fm.model, cfg.randomization_steps, seed=cfg.seed)
    out = []
    for step in fm.cascade:
        other, _, _ = explain_tensor(step.model, x, cfg.method, fm.layers(step.model), target=target,
                                     batch_size=cfg.batch_size)
        out.append((step.label, rank_similarity(cam_in, other)))
    return out


def randomization_similarity(fm: FoldModel, x: torch.Tensor, cam_in: np.ndarray, target: int,
                             cfg: GradcamParams) -> float:
    """The mean over the cascade's steps of `step_similarities`."""
    finite = [v for _, v in step_similarities(fm, x, cam_in, target, cfg) if np.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def summary_of(rows: list[dict[str, Any]], classes: list[str], cfg: GradcamParams, has_masks: bool,
               extra: tuple[str, ...] = ()) -> dict[str, float]:
    """The per-class and overall means of the table's scores, with energy over area."""
    keys = ["correct", *extra, *(LOCALISATION_KEYS if has_masks else ())]
    if cfg.perturbation != "none":
        keys += [cfg.perturbation] + ([] if cfg.perturbation in ZERO_BASELINE else [f"{cfg.perturbation}_random"])
    if cfg.randomization_steps:
        keys.append(RANDOMIZATION_KEY)
    summary = summarise(rows, classes, keys)
    summary.update(ratios(summary, [*classes, "all"]))
    return summary


def explain_row(fm: FoldModel, store: PreparedStore, row: int, cfg: GradcamParams, mask: np.ndarray | None,
                mm_src: float | None = None) -> tuple[dict, np.ndarray]:
    """One stored image through its OOF model: the table row and the map at stored size.
    mm_src: mm per source pixel when known (the pointing game's tolerance is set in mm)."""
    image = np.asarray(store.images[row])
    rec = store.manifest.iloc[row]
    device = next(fm.model.parameters()).device
    x = to_input(image, fm.meta, device=device)
    started = time.perf_counter()
    cam_in, probs, target = explain_tensor(fm.model, x, cfg.method, fm.layers(),
                                           target=_target_class(cfg, store, int(rec["label"])), batch_size=cfg.batch_size)
    seconds = time.perf_counter() - started
    cam = resize_map(cam_in, image.shape)
    pred = int(np.argmax(probs))
    out: dict[str, Any] = {
        "index": int(rec["index"]) if "index" in rec else row, "file": rec["file"], "class": rec["class"],
        "label": int(rec["label"]), "fold": fm.fold, "checkpoint": str(fm.directory),
        "predicted": store.classes[pred], "prob_predicted": float(probs[pred]),
        "explained": store.classes[target], "correct": float(pred == int(rec["label"])),
        "seconds_cam": seconds,
    }
    for c, name in enumerate(store.classes):
        out[f"prob_{name}"] = float(probs[c])
    if mask is not None:
        tolerance = pointing_tolerance_px(store, row, cfg.pointing_tolerance_mm, mm_src)
        out.update(localisation(cam, mask, tolerance), pointing_tolerance_px=tolerance)
    if cfg.perturbation != "none":
        # ROAD's imputer adds torch noise: seed it per image so reruns give the same numbers.
        torch.manual_seed(cfg.seed * 100_003 + out["index"])
        out[cfg.perturbation] = perturbation_score(fm.model, x, cam_in, target, cfg.perturbation, cfg.road_percentiles)
        if cfg.perturbation not in ZERO_BASELINE:
            rng = np.random.default_rng([cfg.seed, out["index"]])
            out[f"{cfg.perturbation}_random"] = perturbation_score(
                fm.model, x, random_map(cam_in.shape, rng), target, cfg.perturbation, cfg.road_percentiles)
    if cfg.randomization_steps:
        out[RANDOMIZATION_KEY] = randomization_similarity(fm, x, cam_in, target, cfg)
    return out, cam


def run_gradcam(params: Params, *, log_to_mlflow: bool = True) -> dict[str, float]:
    """The stage: explain, measure, write `gradcam.out` atomically, log to the CV parent run.
    Returns metrics.json's contents: the metrics plus their provenance (CV run, checkpoints' hash)."""
    cfg = params.gradcam
    store = PreparedStore.open(params.prepare.out)
    cv = read_cv(params.train.out)
    # The CV's whole ensemble (all K folds), not only the folds explained here: register
    # compares it with the checkpoints it registers.
    provenance = cv_provenance(params.train.out, cv)
    client = open_parent_run(params.mlflow, params.train.out, cv.parent_run_id)[0] if log_to_mlflow else None
    masks_root = masks_folder(params)
    if masks_root is not None and not masks_root.is_dir():
        raise DataError(f"gradcam.masks: folder {masks_root} not found (set gradcam.masks: null for data without masks)")
    device = select_device(params.train.device)
    chosen = select_images(store, cfg.per_class, cfg.seed)
    folds_needed = sorted({int(store.folds[r]) for rows in chosen.values() for r in rows})
    models = {k: load_fold_model(Path(params.train.out), k, store, cfg, device) for k in folds_needed}
    mm_src = mm_per_pixel(params.data.root, params.phantom.out, params.phantom.field_width_mm,
                          store.manifest["src_width"].to_numpy()) if masks_root is not None else None

    rows: list[dict[str, Any]] = []
    # The figures folder is swapped in whole; metrics.json is written last inside that block,
    # so a failure anywhere leaves the previous run's outputs as they were.
    with atomic_dir(Path(cfg.out) / IMAGES_DIR, "gradcam.out") as tmp:
        examples: list[SheetItem] = []
        done, total = 0, sum(len(v) for v in chosen.values())
        for cls, indices in chosen.items():
            (tmp / cls).mkdir(parents=True, exist_ok=True)
            sheet, taken = [], set()
            for row in indices:
                done += 1
                log.info("gradcam %d/%d: %s", done, total, store.manifest["file"].iloc[int(row)])
                fm = out_of_fold_model(models, store, int(row))
                mask = mask_for(store, int(row), masks_root) if masks_root is not None else None
                rec, cam = explain_row(fm, store, int(row), cfg, mask,
                                       None if mm_src is None else float(mm_src[int(row)]))
                box = None if mask is not None else stored_box(store, int(row))
                name = _output_name(rec["file"], cls, taken)
                rec["png"] = f"{cls}/{name}"
                note = _note(rec, cfg)
                save_overlay(tmp / cls / name, store.images[row], cam, pred_class=rec["predicted"],
                             prob=rec["prob_predicted"], true_class=cls, alpha=cfg.alpha, method=cfg.method,
                             mask=mask, box=box, note=note)
                label = f"{Path(rec['file']).stem}\n{caption(rec['predicted'], rec['prob_predicted'], cls)}"
                sheet.append(SheetItem(np.asarray(store.images[row]), cam, label, mask=mask, box=box))
                rows.append(rec)
            if sheet:
                save_contact_sheet(tmp / SHEETS_DIR / f"{cls}.png", sheet,
                                   f"{cls}: {len(sheet)} random images, {cfg.method}, each by its out-of-fold model",
                                   alpha=cfg.alpha)
                examples.append(sheet[0])
        if examples:
            save_contact_sheet(tmp / EXAMPLE_FILE, examples, f"{cfg.method}: one image per class", alpha=cfg.alpha)
        summary = summary_of(rows, store.classes, cfg, masks_root is not None)
        if masks_root is not None and mm_src is not None:
            summary["pointing_tolerance_mm"] = float(cfg.pointing_tolerance_mm)
        metrics = with_provenance({METRIC_PREFIX + k: v for k, v in summary.items()}, provenance)
        atomic_write_text(tmp / IMAGES_FILE, pd.DataFrame(rows).drop(columns=["seconds_cam"]).to_csv(index=False))
        seconds = float(np.mean([r["seconds_cam"] for r in rows])) if rows else math.nan
        if client is not None:
            _log_to_parent(client, cv.parent_run_id, tmp, metrics, cfg, models, seconds)
        write_headline(cfg.out, metrics, HEADLINE)
        write_metrics(cfg.out, metrics)
    _print_summary(metrics, cfg, seconds)
    return metrics


def _note(rec: dict[str, Any], cfg: GradcamParams) -> str:
    bits = [f"fold {rec['fold']} model (never trained on this image)"]
    if "energy_inside" in rec and np.isfinite(rec["energy_inside"]):
        bits.append(f"energy in region {rec['energy_inside']:.2f} (area {rec['area_fraction']:.2f})")
    if cfg.perturbation in rec:
        bits.append(f"{cfg.perturbation} {rec[cfg.perturbation]:+.3f}")
    return ", ".join(bits)


def _log_to_parent(client, run_id: str, folder: Path, metrics: dict[str, float], cfg: GradcamParams,
                   models: dict[int, FoldModel], seconds: float) -> None:
    from mlflow.entities import Metric, RunTag

    now = int(time.time() * 1000)
    # numbers only (not the provenance strings), the seconds when measured
    logged = mlflow_metrics({**metrics, METRIC_PREFIX + "seconds_per_image": seconds})
    layers = sorted({"+".join(fm.layer_names) or "input" for fm in models.values()})
    tags = {"gradcam.method": cfg.method, "gradcam.target_layer": ",".join(layers), "gradcam.target": cfg.target,
            "gradcam.perturbation": cfg.perturbation}
    client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in logged.items()],
                     tags=[RunTag(k, v) for k, v in tags.items()])
    client.log_artifacts(run_id, str(folder), artifact_path=ARTIFACT_PATH)
    with tempfile.TemporaryDirectory() as tmp:
        client.log_artifact(run_id, str(write_metrics(tmp, metrics)), artifact_path=ARTIFACT_PATH)


def _print_summary(metrics: dict[str, float], cfg: GradcamParams, seconds: float) -> None:
    log.info("Grad-CAM (%s): %.3f s per image map -> %s", cfg.method, seconds, cfg.out)
    for key in sorted(metrics):
        value = metrics[key]
        log.info(f"  {key:<40} {value:.4f}" if isinstance(value, float) else f"  {key:<40} {value}")


# ------------------------------------------------------------------------ single image
def checkpoint_dirs_for(params: Params, model_ref: str | None) -> list[Path]:
    """Checkpoint folders behind --model: a checkpoint folder, a train.out folder (all folds), or
    an MLflow model URI (models:/name@alias, runs:/...), which the registry's pyfunc resolves."""
    ref = model_ref or params.train.out
    if not Path(str(ref)).exists():
        import mlflow

        mlflow.set_tracking_uri(tracking_uri(params.mlflow))
    return checkpoint_dirs(ref)


def explain_file(params: Params, image_path: str | Path, out: str | Path, model_ref: str | None = None,
                 box: tuple[float, float, float, float] | None = None) -> dict[str, Any]:
    """A raw radiograph -> training preprocessing -> the mean map and probabilities of the
    model's checkpoints (one folder, or every fold of an ensemble) -> overlay PNG at `out`."""
    cfg = params.gradcam
    dirs = checkpoint_dirs_for(params, model_ref)
    device = select_device(params.train.device)
    members = [load_checkpoint(d, device=device) for d in dirs]
    meta0 = members[0][1]
    if meta0.mode == "crop" and box is None:
        raise BoneHealthError(f"{dirs[0]}: the model was trained on crops around the cortex box; pass --box x,y,w,h, "
                              "or let the localiser find it: python -m src.predict FILE --cam DIR")
    preps = {json.dumps(meta.preprocessing, sort_keys=True) for _, meta in members}
    if len(preps) != 1:
        raise BoneHealthError(f"{model_ref or params.train.out}: its checkpoints were trained on differently prepared images")
    image = preprocess_image(read_image(image_path, params.data.max_pixels), meta0.prepare_settings, box)[0]
    classes = list(meta0.classes)
    # "true" has no meaning for a new radiograph: explain the prediction unless asked for the positive class.
    target = meta0.positive_index if cfg.target == "positive" else None
    cam, probs = explain_ensemble(members, image, cfg.method, cfg.target_layer, target=target, batch_size=cfg.batch_size)
    pred = int(np.argmax(probs))
    explained = pred if target is None else target
    note = f"{Path(image_path).name}, " + (f"mean of {len(members)} models" if len(members) > 1 else Path(dirs[0]).name)
    save_overlay(out, image, cam, pred_class=classes[pred], prob=float(probs[pred]), alpha=cfg.alpha,
                 method=cfg.method, note=note)
    return {"file": str(image_path), "predicted": classes[pred], "probs": dict(zip(classes, map(float, probs))),
            "explained": classes[explained], "cam": cam, "image": image, "out": str(out), "models": [str(d) for d in dirs]}
