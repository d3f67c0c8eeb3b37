"""Inputs of the register stage built by hand: tiny fold checkpoints, untrained fold localisers,
a CV parent run in a tmp SQLite MLflow store, metrics.json, and small radiograph files (PNG, DICOM)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from src.artifacts.checkpoint import CheckpointMeta, save_checkpoint
from src.artifacts.cv_run import CvRun, cv_provenance, read_cv, write_cv
from src.core.config import Params, PrepareParams, params_from_dict
from src.model.factory import create_model

CLASSES = ["C1", "C3"]
MODEL = "test_efficientnet"
LOCALISER = "mobilenetv3_small_100"
LOCALISER_SIZE = [64, 128]
LOCALISER_REFINE = {"size": [128, 256], "window": [48, 64], "jitter": 0.13}  # a refiner in every fold, as locate writes by default
# An untrained localiser's peaks sit near its bias prior (~0.01): these thresholds make every
# radiograph "found" or "not found", deterministically.
FINDS_ALL, FINDS_NONE = 1e-6, 0.999
GOOD_METRICS = {
    "oof_roc_auc": 0.81, "oof_roc_auc_ci_low": 0.74, "oof_roc_auc_ci_high": 0.88,
    "oof_sensitivity": 0.78, "oof_specificity": 0.74, "oof_brier": 0.17, "oof_ece": 0.05,
    "fold_mean_roc_auc": 0.80, "fold_std_roc_auc": 0.04,
}


def make_params(tmp: Path, mode: str = "full", store: Path | None = None, **register) -> Params:
    """Every path of the pipeline inside `tmp`; a 32 px full-mode (or crop-mode) preprocessing.
    `store`: the MLflow folder (default tmp/mlruns); tests share one because creating an
    MLflow database costs seconds."""
    store = store or tmp / "mlruns"
    raw = {
        "data": {"root": str(tmp / "data" / "images"), "name": "toy"},
        "phantom": {"out": str(tmp / "data" / "phantom")},
        "prepare": {**prepare_section(mode), "out": str(tmp / "data" / "prepared")},
        "train": {"out": str(tmp / "models"), "model": MODEL},
        "evaluate": {"out": str(tmp / "reports")},
        "gradcam": {"out": str(tmp / "reports" / "gradcam")},
        "locate": {"out": str(tmp / "localiser")},
        "register": {"out": str(tmp / "reports" / "register"), "example_size": [48, 96], **register},
        "mlflow": {"tracking_uri": f"sqlite:///{store / 'mlflow.db'}",
                   "artifact_root": str(store / "artifacts"), "experiment": "test"},
    }
    return params_from_dict(raw)


def prepare_section(mode: str = "full") -> dict:
    return {"out": "unused", "mode": mode, "folds": 2, "full": {"downscale": None, "size": [32, 32]},
            "crop": {"side": 40, "reference_width": None, "size": 32}}


def checkpoint_meta(params: Params, fold: int, store_meta: dict | None = None) -> CheckpointMeta:
    """Meta as src.model.fit.checkpoint_meta writes it (store meta copied under 'preprocessing')."""
    prep = PrepareParams.model_validate(params.prepare.model_dump()).model_dump(mode="json")
    copied = {"mode": prep["mode"], "size": [32, 32], "dtype": "uint8", "preprocessing": prep,
              "data_root": params.data.root, "manifest_sha256": "ab" * 32}
    if store_meta is not None:
        keep = ("mode", "size", "dtype", "preprocessing", "data_root", "manifest_sha256")
        copied = {k: store_meta[k] for k in keep if k in store_meta}
    return CheckpointMeta(model=MODEL, classes=CLASSES, positive_class="C3", input_size=[32, 32],
                          preprocessing=copied, fold=fold, best_epoch=2 + fold, val_auc=0.8)


def make_checkpoints(params: Params, folds: int = 2, seed: int = 0, store_meta: dict | None = None) -> list[Path]:
    """`folds` differently initialised tiny EfficientNets saved like training does."""
    out = []
    for k in range(folds):
        torch.manual_seed(seed * 100 + k)
        model = create_model(MODEL, num_classes=len(CLASSES), in_chans=1)
        # Random BN statistics make the folds disagree visibly, so a wrong mean would show.
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
        d = Path(params.train.out) / f"fold_{k}"
        save_checkpoint(d, model.state_dict(), checkpoint_meta(params, k, store_meta))
        (d / "test_predictions.csv").write_text("index,file,patient\n0,secret/patient.png,P001\n")
        out.append(d)
    return out


def make_localisers(params: Params, folds: int = 2, min_confidence: float = FINDS_ALL,
                    both_sides: bool = False, refine: dict | None = LOCALISER_REFINE) -> list[Path]:
    """`folds` differently initialised, untrained localisers where the locate stage writes them
    ({locate.out}/folds/fold_<k>), each with a refiner unless `refine` is None, plus a stray
    file there as locate leaves its state.json."""
    from src.localise.artifact import LocaliserMeta, save_localiser
    from src.localise.network import Localiser

    root = Path(params.locate.out) / "folds"
    out = []
    for k in range(folds):
        torch.manual_seed(1000 + k)
        meta = LocaliserMeta(model=LOCALISER, size=list(LOCALISER_SIZE), min_confidence=min_confidence,
                             both_sides=both_sides, fold=k, refine=refine)
        refiner = None if refine is None else Localiser(LOCALISER).state_dict()
        out.append(save_localiser(root / f"fold_{k}", Localiser(LOCALISER).state_dict(), meta, refiner))
        (root / f"fold_{k}" / "history.csv").write_text("epoch,loss\n0,1.0\n")  # must stay out of the model
    (root / "state.json").write_text("{}")
    return out


def set_localiser_meta(dirs: list[Path], **changes) -> None:
    """Change the localisers' meta.json in place (min_confidence, both_sides)."""
    for d in dirs:
        meta = json.loads((d / "meta.json").read_text())
        meta.update(changes)
        (d / "meta.json").write_text(json.dumps(meta))


def make_cv_run(params: Params, folds: int = 2) -> str:
    """A finished CV parent run in the tmp store and the cv.json that points at it."""
    import mlflow

    from src.core.tracking import configure

    configure(params.mlflow)
    with mlflow.start_run(run_name="cv-parent") as run:
        mlflow.log_metric("oof_roc_auc", 0.8)
    Path(params.train.out).mkdir(parents=True, exist_ok=True)
    write_cv(params.train.out, CvRun(parent_run_id=run.info.run_id, folds=folds,
                                     fold_run_ids={str(k): f"run{k}" for k in range(folds)}))
    return run.info.run_id


def provenance(params: Params) -> dict[str, str]:
    """The provenance keys evaluate and gradcam write for the CV now in train.out."""
    return cv_provenance(params.train.out, read_cv(params.train.out)).to_dict()


def write_metrics(params: Params, **overrides: float) -> dict:
    """evaluate's metrics.json for the CV in train.out (so call it after make_cv_run); returns the numbers."""
    metrics = {**GOOD_METRICS, **overrides}
    write_metrics_file(Path(params.evaluate.out), {**metrics, **provenance(params)})
    return metrics


def write_gradcam_metrics(params: Params, metrics: dict) -> dict:
    """gradcam's metrics.json for the CV in train.out; returns the numbers."""
    write_metrics_file(Path(params.gradcam.out), {**metrics, **provenance(params)})
    return metrics


def write_metrics_file(out: Path, content: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(content))
    return out / "metrics.json"


def make_pipeline_outputs(params: Params, folds: int = 2, seed: int = 0, store_meta: dict | None = None,
                          **metrics: float) -> list[Path]:
    dirs = make_checkpoints(params, folds=folds, seed=seed, store_meta=store_meta)
    make_cv_run(params, folds=folds)
    write_metrics(params, **metrics)
    return dirs


def radiograph(height: int = 96, width: int = 160, seed: int = 0) -> np.ndarray:
    """A grey uint8 image with structure (so predictions depend on it), not a flat field."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    band = np.exp(-((yy - height * (0.6 + 0.1 * rng.random())) / (height * 0.08)) ** 2)
    img = 0.3 + 0.5 * band + 0.1 * np.sin(xx / (5 + 10 * rng.random())) + 0.05 * rng.standard_normal((height, width))
    return np.clip(img * 255, 0, 255).astype(np.uint8)


def write_png(path: Path, img: np.ndarray) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)
    return path


def write_dicom(path: Path, img16: np.ndarray) -> Path:
    """A minimal valid MONOCHROME2 16-bit DICOM (Secondary Capture) with pixel data."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import (
        ExplicitVRLittleEndian,
        SecondaryCaptureImageStorage,
        generate_uid,
    )

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "PX"
    ds.PatientID = "PHANTOM"
    ds.Rows, ds.Columns = img16.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(img16.astype(np.uint16)).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)
    return path


def expected_probs(dirs: list[Path], image: np.ndarray, box=None) -> np.ndarray:
    """The reference: each fold checkpoint on the training transform of `image`, averaged."""
    from src.data.preprocess import preprocess_image
    from src.model.factory import load_checkpoint, predict_proba

    probs = []
    for d in dirs:
        model, meta = load_checkpoint(d)
        prep = meta.prepare_settings
        arr, _ = preprocess_image(image, prep, box)
        probs.append(predict_proba(model, arr[None], meta)[0])
    return np.mean(probs, axis=0)


def expected_found(dirs: list[Path], localisers: list[Path], image: np.ndarray):
    """The reference for a radiograph without a box: the fold localisers' box (both sides when
    their meta says so), each crop through expected_probs, averaged; returns (probs, Located)."""
    from src.localise.finder import BoxFinder

    finder = BoxFinder(localisers)
    located = finder.locate(image)
    probs = np.mean([expected_probs(dirs, image, box) for box in located.boxes(finder.both_sides)], axis=0)
    return probs, located
