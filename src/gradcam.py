"""Grad-CAM stage: N random images per class, each explained by the fold model that never
saw it, with measured faithfulness; plus a single-image mode for new radiographs.

    python -m src.gradcam [--params F] [--set gradcam.method=hirescam]
    python -m src.gradcam --image PATH [--model DIR_OR_MODEL_URI] [--box x,y,w,h] --out FILE.png

Stage outputs under `gradcam.out`, each also logged under `gradcam/` on the CV's MLflow
parent run: `images/` (the DVC output) with `<class>/<image>.png` (image | heat map |
overlay, true and predicted class and probability), `<class>/_contact_sheet.png`,
`example.png` (the first image of each class) and `images.csv` (one row per explained
image); `metrics.json` beside it (the DVC metrics file: flat keys, the same names in every
run, also logged as metrics on the parent run).
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from src.cam import explain_ensemble, explain_image, explain_tensor, resize_map, resolve_target_layer
from src.cam_faithfulness import ZERO_BASELINE, localisation, perturbation_score, random_map, summarise
from src.cam_figures import SheetItem, caption, save_contact_sheet, save_overlay
from src.cli import run_main
from src.config import GradcamParams, Params, add_params_args, params_from_args
from src.errors import BoneHealthError, DataError
from src.fileio import atomic_dir, atomic_write_json, atomic_write_text
from src.models import load_checkpoint, to_input
from src.store import PreparedStore

__all__ = ["explain_image", "explain_ensemble", "save_overlay", "run_gradcam", "explain_file", "select_images", "main"]

METRIC_PREFIX = "gradcam_"
ARTIFACT_PATH = "gradcam"
IMAGES_DIR = "images"
METRICS_FILE = "metrics.json"
IMAGES_FILE = "images.csv"
EXAMPLE_FILE = "example.png"
SHEET_FILE = "_contact_sheet.png"  # leading underscore: never a radiograph's own name
CV_FILE = "cv.json"
TEST_PREDICTIONS = "test_predictions.csv"
LOCALISATION_KEYS = ("energy_inside", "pointing_hit", "area_fraction")


# ------------------------------------------------------------------ selection and the OOF rule
def select_images(store: PreparedStore, per_class: int, seed: int) -> dict[str, np.ndarray]:
    """Store indices of `per_class` random images of each class (all of a smaller class), sorted."""
    rng = np.random.default_rng(seed)
    chosen: dict[str, np.ndarray] = {}
    for label, name in enumerate(store.classes):
        pool = np.flatnonzero(store.labels == label)
        take = min(per_class, len(pool))
        chosen[name] = np.sort(rng.choice(pool, size=take, replace=False)) if take else pool
    return chosen


@dataclass
class FoldModel:
    fold: int
    directory: Path
    model: torch.nn.Module
    meta: dict[str, Any]
    layer_name: str | None
    layer: torch.nn.Module | None
    test_indices: set[int] | None  # from test_predictions.csv when present


def load_fold_model(train_out: Path, fold: int, store: PreparedStore, cfg: GradcamParams, device) -> FoldModel:
    """fold_<k>'s checkpoint, checked to be the model whose TEST fold is k on this very store."""
    directory = Path(train_out) / f"fold_{fold}"
    if not (directory / "meta.json").is_file():
        raise DataError(f"{directory}: fold checkpoint not found; run `python -m src.train` first")
    model, meta = load_checkpoint(directory, device=device)
    if int(meta.get("fold", -1)) != int(fold):
        raise DataError(f"{directory / 'meta.json'}: fold is {meta.get('fold')!r}, expected {fold}")
    if list(meta.get("classes", [])) != store.classes:
        raise DataError(f"{directory / 'meta.json'}: classes {meta.get('classes')} differ from the store's {store.classes}")
    trained_on = (meta.get("preprocessing") or {}).get("manifest_sha256")
    if trained_on and store.meta.get("manifest_sha256") and trained_on != store.meta["manifest_sha256"]:
        # Another manifest may assign other folds: the OOF guarantee would not hold.
        raise DataError(f"{directory}: trained on a different prepared store (manifest sha256 {trained_on[:12]}... "
                        f"!= {store.meta['manifest_sha256'][:12]}...); retrain or point prepare.out at its store")
    test_indices = None
    if (directory / TEST_PREDICTIONS).is_file():
        test_indices = set(pd.read_csv(directory / TEST_PREDICTIONS, usecols=["index"])["index"].astype(int))
    layer_name, layer = None, None
    if cfg.method != "saliency":
        shape = (1, int(meta.get("in_chans", 1)), *[int(v) for v in (meta.get("input_size") or store.meta["size"])])
        layer_name, layer = resolve_target_layer(model, cfg.target_layer, shape)
    return FoldModel(fold, directory, model, meta, layer_name, layer, test_indices)


def out_of_fold_model(models: dict[int, FoldModel], store: PreparedStore, row: int) -> FoldModel:
    """The model that never trained on store image `row`: the one whose test fold holds it."""
    fold = int(store.folds[row])
    fm = models.get(fold)
    if fm is None:
        raise DataError(f"image {store.manifest['file'].iat[row]}: no model for its test fold {fold}")
    index = int(store.manifest["index"].iat[row]) if "index" in store.manifest else row
    if fm.test_indices is not None and index not in fm.test_indices:
        raise DataError(f"image {store.manifest['file'].iat[row]} (index {index}) is not in {fm.directory / TEST_PREDICTIONS}: "
                        f"refusing to explain it with a model that may have trained on it")
    return fm


# ----------------------------------------------------------------------------- masks
def mask_path(masks_root: str | Path, file: str) -> Path:
    """Masks mirror the image tree under data.root, always as PNG."""
    return Path(masks_root) / Path(file).with_suffix(".png")


def mask_for(store: PreparedStore, row: int, masks_root: str | Path) -> np.ndarray:
    """The ground-truth region of store image `row` in stored-image pixels (bool (H, W)),
    cut and resized exactly like the image (src.preprocess geometry and padding)."""
    from src.imaging import read_image
    from src.preprocess import resize, square_crop

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
            raise DataError(f"{store.root / 'manifest.csv'}: crop geometry missing for {rec['file']}")
        mask = square_crop(mask, int(rec["crop_x0"]), int(rec["crop_y0"]), int(rec["crop_side"]))
    # Area averaging then a 0.5 threshold: a stored pixel is "in" when most of it is.
    return resize(mask.astype(np.float32), size) >= 0.5


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


def explain_row(fm: FoldModel, store: PreparedStore, row: int, cfg: GradcamParams, mask: np.ndarray | None) -> tuple[dict, np.ndarray]:
    """One stored image through its OOF model: the table row and the map at stored size."""
    image = np.asarray(store.images[row])
    rec = store.manifest.iloc[row]
    device = next(fm.model.parameters()).device
    x = to_input(image, fm.meta, device=device)
    started = time.perf_counter()
    cam_in, probs, target = explain_tensor(fm.model, x, cfg.method, fm.layer,
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
        out.update(localisation(cam, mask))
    if cfg.perturbation != "none":
        # ROAD's imputer adds torch noise: seed it per image so reruns give the same numbers.
        torch.manual_seed(cfg.seed * 100_003 + out["index"])
        out[cfg.perturbation] = perturbation_score(fm.model, x, cam_in, target, cfg.perturbation, cfg.road_percentiles)
        if cfg.perturbation not in ZERO_BASELINE:
            rng = np.random.default_rng([cfg.seed, out["index"]])
            out[f"{cfg.perturbation}_random"] = perturbation_score(
                fm.model, x, random_map(cam_in.shape, rng), target, cfg.perturbation, cfg.road_percentiles)
    return out, cam


def read_cv(train_out: str | Path) -> dict[str, Any]:
    """A finished CV's cv.json (evaluate's reader) that names its MLflow parent run."""
    from src.evaluate import read_cv as read_finished_cv

    cv = read_finished_cv(train_out)
    if not cv.get("parent_run_id"):
        raise DataError(f"{Path(train_out) / CV_FILE}: no parent_run_id")
    return cv


def run_gradcam(params: Params, *, log_to_mlflow: bool = True) -> dict[str, float]:
    """The stage: explain, measure, write `gradcam.out` atomically, log to the CV parent run."""
    from src.trainer import select_device

    cfg = params.gradcam
    store = PreparedStore.open(params.prepare.out)
    cv = read_cv(params.train.out)
    client = _parent_run_client(params, cv["parent_run_id"]) if log_to_mlflow else None
    masks_root = Path(cfg.masks) if cfg.masks else None
    if masks_root is not None and not masks_root.is_dir():
        raise DataError(f"gradcam.masks: folder {masks_root} not found (set gradcam.masks: null for data without masks)")
    device = select_device(params.train.device)
    chosen = select_images(store, cfg.per_class, cfg.seed)
    folds_needed = sorted({int(store.folds[r]) for rows in chosen.values() for r in rows})
    models = {k: load_fold_model(Path(params.train.out), k, store, cfg, device) for k in folds_needed}

    rows: list[dict[str, Any]] = []
    # The figures folder is swapped in whole; metrics.json is written last inside that block,
    # so a failure anywhere leaves the previous run's outputs as they were.
    with atomic_dir(Path(cfg.out) / IMAGES_DIR) as tmp:
        examples: list[SheetItem] = []
        for cls, indices in chosen.items():
            (tmp / cls).mkdir(parents=True, exist_ok=True)
            sheet, taken = [], set()
            for row in indices:
                fm = out_of_fold_model(models, store, int(row))
                mask = mask_for(store, int(row), masks_root) if masks_root is not None else None
                rec, cam = explain_row(fm, store, int(row), cfg, mask)
                name = _output_name(rec["file"], cls, taken)
                rec["png"] = f"{cls}/{name}"
                note = _note(rec, cfg)
                save_overlay(tmp / cls / name, store.images[row], cam, pred_class=rec["predicted"],
                             prob=rec["prob_predicted"], true_class=cls, alpha=cfg.alpha, method=cfg.method,
                             mask=mask, note=note)
                label = f"{Path(rec['file']).stem}\n{caption(rec['predicted'], rec['prob_predicted'], cls)}"
                sheet.append(SheetItem(np.asarray(store.images[row]), cam, label))
                rows.append(rec)
            if sheet:
                save_contact_sheet(tmp / cls / SHEET_FILE, sheet, f"{cls}: {len(sheet)} random images, {cfg.method}, "
                                   f"each by its out-of-fold model", alpha=cfg.alpha)
                examples.append(sheet[0])
        if examples:
            save_contact_sheet(tmp / EXAMPLE_FILE, examples, f"{cfg.method}: one image per class", alpha=cfg.alpha)
        keys = ["correct", *(LOCALISATION_KEYS if masks_root is not None else ())]
        if cfg.perturbation != "none":
            keys += [cfg.perturbation] + ([] if cfg.perturbation in ZERO_BASELINE else [f"{cfg.perturbation}_random"])
        metrics = {METRIC_PREFIX + k: v for k, v in summarise(rows, store.classes, keys).items()}
        atomic_write_text(tmp / IMAGES_FILE, pd.DataFrame(rows).drop(columns=["seconds_cam"]).to_csv(index=False))
        seconds = float(np.mean([r["seconds_cam"] for r in rows])) if rows else math.nan
        if client is not None:
            _log_to_parent(client, cv["parent_run_id"], tmp, metrics, cfg, models, seconds)
        atomic_write_json(Path(cfg.out) / METRICS_FILE, metrics)
    _print_summary(metrics, cfg, seconds)
    return metrics


def _note(rec: dict[str, Any], cfg: GradcamParams) -> str:
    bits = [f"fold {rec['fold']} model (never trained on this image)"]
    if "energy_inside" in rec and np.isfinite(rec["energy_inside"]):
        bits.append(f"energy in region {rec['energy_inside']:.2f} (area {rec['area_fraction']:.2f})")
    if cfg.perturbation in rec:
        bits.append(f"{cfg.perturbation} {rec[cfg.perturbation]:+.3f}")
    return ", ".join(bits)


def _parent_run_client(params: Params, run_id: str):
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from src.tracking import configure

    configure(params.mlflow)
    client = MlflowClient()
    try:
        client.get_run(run_id)
    except MlflowException:
        raise DataError(f"{Path(params.train.out) / CV_FILE}: parent run {run_id} not found in the MLflow store "
                        f"{client.tracking_uri}") from None
    return client


def _log_to_parent(client, run_id: str, folder: Path, metrics: dict[str, float], cfg: GradcamParams,
                   models: dict[int, FoldModel], seconds: float) -> None:
    from mlflow.entities import Metric, RunTag

    now = int(time.time() * 1000)
    finite = {k: float(v) for k, v in metrics.items() if np.isfinite(v)}
    if np.isfinite(seconds):
        finite[METRIC_PREFIX + "seconds_per_image"] = seconds
    layers = sorted({fm.layer_name or "input" for fm in models.values()})
    tags = {"gradcam.method": cfg.method, "gradcam.target_layer": ",".join(layers), "gradcam.target": cfg.target,
            "gradcam.perturbation": cfg.perturbation}
    client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in finite.items()],
                     tags=[RunTag(k, v) for k, v in tags.items()])
    client.log_artifacts(run_id, str(folder), artifact_path=ARTIFACT_PATH)
    with tempfile.TemporaryDirectory() as tmp:
        atomic_write_json(Path(tmp) / METRICS_FILE, metrics)
        client.log_artifact(run_id, str(Path(tmp) / METRICS_FILE), artifact_path=ARTIFACT_PATH)


def _print_summary(metrics: dict[str, float], cfg: GradcamParams, seconds: float) -> None:
    print(f"Grad-CAM ({cfg.method}): {seconds:.3f} s per image map -> {cfg.out}")
    for key in sorted(metrics):
        value = metrics[key]
        print(f"  {key:<40} {value:.4f}" if isinstance(value, float) else f"  {key:<40} {value}")


# ------------------------------------------------------------------------ single image
def parse_box(text: str | None) -> tuple[float, float, float, float] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4 or not all(np.isfinite(values)) or values[2] <= 0 or values[3] <= 0:
        raise BoneHealthError(f"--box {text!r}: expected x,y,w,h in source pixels with w, h > 0")
    return values  # type: ignore[return-value]


def checkpoint_dirs_for(params: Params, model_ref: str | None) -> list[Path]:
    """Checkpoint folders behind --model: a checkpoint folder, a train.out folder (all folds), or
    an MLflow model URI (models:/name@alias, runs:/...), which the registry's pyfunc resolves."""
    from src.pyfunc_model import checkpoint_dirs

    ref = model_ref or params.train.out
    if not Path(str(ref)).exists():
        import mlflow

        from src.tracking import tracking_uri

        mlflow.set_tracking_uri(tracking_uri(params.mlflow))
    return checkpoint_dirs(ref)


def _crop_mode(meta: dict[str, Any]) -> bool:
    prep = meta.get("preprocessing") or {}
    return (prep.get("mode") or (prep.get("preprocessing") or {}).get("mode")) == "crop"


def explain_file(params: Params, image_path: str | Path, out: str | Path, model_ref: str | None = None,
                 box: tuple[float, float, float, float] | None = None) -> dict[str, Any]:
    """A raw radiograph -> training preprocessing -> the mean map and probabilities of the
    model's checkpoints (one folder, or every fold of an ensemble) -> overlay PNG at `out`."""
    from src.imaging import read_image
    from src.preprocess import preprocess_image
    from src.trainer import select_device

    cfg = params.gradcam
    dirs = checkpoint_dirs_for(params, model_ref)
    device = select_device(params.train.device)
    members = [load_checkpoint(d, device=device) for d in dirs]
    meta0 = members[0][1]
    if _crop_mode(meta0) and box is None:
        raise BoneHealthError(f"{dirs[0]}: the model was trained on crops around the cortex box; pass --box x,y,w,h")
    preps = {json.dumps(meta.get("preprocessing"), sort_keys=True) for _, meta in members}
    if len(preps) != 1:
        raise BoneHealthError(f"{model_ref or params.train.out}: its checkpoints were trained on differently prepared images")
    image = preprocess_image(read_image(image_path), meta0.get("preprocessing") or {}, box)[0]
    classes = list(meta0["classes"])
    # "true" has no meaning for a new radiograph: explain the prediction unless asked for the positive class.
    target = classes.index(meta0["positive_class"]) if cfg.target == "positive" else None
    cam, probs = explain_ensemble(members, image, cfg.method, cfg.target_layer, target=target, batch_size=cfg.batch_size)
    pred = int(np.argmax(probs))
    explained = pred if target is None else target
    note = f"{Path(image_path).name}, " + (f"mean of {len(members)} models" if len(members) > 1 else Path(dirs[0]).name)
    save_overlay(out, image, cam, pred_class=classes[pred], prob=float(probs[pred]), alpha=cfg.alpha,
                 method=cfg.method, note=note)
    return {"file": str(image_path), "predicted": classes[pred], "probs": dict(zip(classes, map(float, probs))),
            "explained": classes[explained], "cam": cam, "image": image, "out": str(out), "models": [str(d) for d in dirs]}


# ----------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    parser = add_params_args(argparse.ArgumentParser(prog="python -m src.gradcam", description=__doc__,
                                                     formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument("--image", help="single-image mode: a radiograph file (PNG, JPEG, TIFF, DICOM...)")
    parser.add_argument("--model", help="checkpoint folder, train.out folder, or MLflow model URI "
                                        "(default: train.out, the mean of all folds)")
    parser.add_argument("--box", help="cortex box x,y,w,h in source pixels (needed by crop-mode models)")
    parser.add_argument("--out", help="single-image mode: the overlay PNG to write")
    args = parser.parse_args(argv)
    params = params_from_args(args)
    if args.image is None:
        if args.model or args.box or args.out:
            raise BoneHealthError("--model, --box and --out belong to single-image mode: add --image PATH")
        run_gradcam(params)
        return 0
    if not args.out:
        raise BoneHealthError("--image needs --out FILE.png")
    result = explain_file(params, args.image, args.out, args.model, parse_box(args.box))
    probs = ", ".join(f"{c} {p:.3f}" for c, p in result["probs"].items())
    print(f"{result['file']}: predicted {result['predicted']} ({probs}); {params.gradcam.method} map -> {result['out']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
