"""Register stage: the latest cross-validation becomes a version of `register.name` with alias
`challenger` (`python -m src.register`, the last DVC stage).

The version is an MLflow pyfunc (src/pyfunc_model.py) that carries the fold checkpoints as
plain artifacts (state_dict + meta.json, so Grad-CAM can still hook the network) and the
`src` package as code, so `mlflow models serve` and `mlflow.pyfunc.load_model` need no
checkout.  It is logged in a "register" run nested under the CV parent run, with the CV
metrics, the params and the model card; the version itself carries the tags that the
promotion gate reads (`metric.<name>`), so promote never needs the files of an old run.
"""
from __future__ import annotations

import argparse
import base64
import getpass
import io
import json
import shutil
import statistics
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from src.cli import run_main
from src.config import Params, add_params_args, flatten, params_from_args
from src.errors import BoneHealthError
from src.fileio import atomic_write_json, atomic_write_text, sha256_file
from src.models import CHECKPOINT_FILE, META_FILE, read_meta
from src.pyfunc_model import (BOX_COLUMNS, CARD_KEY, CHECKPOINT_PREFIX, IMAGE_COLUMN, PREDICTED_COLUMN,
                              prepare_settings, prob_column)

CV_FILE = "cv.json"
METRICS_FILE = "metrics.json"
CARD_FILE = "model_card.md"
CARD_METADATA_FILE = "metadata.json"  # its name in the run, as in a MONAI bundle
LOCAL_METADATA_FILE = "model_card.json"  # its name in register.out, beside evaluate's files
RESULT_FILE = "registered.json"
METRIC_TAG_PREFIX = "metric."
MODEL_ARTIFACT_NAME = "model"
SRC_DIR = Path(__file__).resolve().parent
PYFUNC_ENTRY = "pyfunc_entry.py"  # models-from-code: the model is built by running this file
# What the pyfunc imports at load time (src/imaging, preprocess, models, config): pinned to the
# versions that built it.  Explicit requirements also spare log_model ~20 s of inference.
RUNTIME_DISTRIBUTIONS = ["mlflow", "torch", "timm", "numpy", "pandas", "pillow", "pydicom",
                         "opencv-python-headless", "scikit-image", "pydantic", "pyyaml"]


@dataclass
class Registered:
    name: str
    version: str
    run_id: str
    model_uri: str
    alias: str
    tags: dict[str, str] = field(default_factory=dict)


# ----------------------------------------------------------------------------- inputs
def read_json(path: Path, what: str, hint: str = "") -> dict[str, Any]:
    if not path.is_file():
        raise BoneHealthError(f"{path}: {what} not found" + (f"; {hint}" if hint else ""))
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BoneHealthError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise BoneHealthError(f"{path}: expected a JSON object")
    return data


def load_cv(train_out: Path) -> dict[str, Any]:
    cv = read_json(train_out / CV_FILE, "cross-validation summary", "run `python -m src.train` first")
    if not cv.get("parent_run_id"):
        raise BoneHealthError(f"{train_out / CV_FILE}: no 'parent_run_id'; expected the CV parent MLflow run id")
    status = cv.get("status")
    if status is not None and str(status).upper() != "FINISHED":
        raise BoneHealthError(f"{train_out / CV_FILE}: status {status!r}; register needs a finished cross-validation")
    return cv


def fold_dirs(train_out: Path, cv: dict[str, Any]) -> list[Path]:
    """The K fold checkpoints named by cv.json (all of them: a partial ensemble is not the CV's model)."""
    n = cv.get("folds")
    if isinstance(n, list):
        folds = [int(k) for k in n]
    elif isinstance(n, int):
        folds = list(range(n))
    else:
        folds = sorted(int(k) for k in (cv.get("fold_run_ids") or {}))
    if not folds:
        raise BoneHealthError(f"{train_out / CV_FILE}: no folds listed ('folds' or 'fold_run_ids' expected)")
    dirs = [train_out / f"{CHECKPOINT_PREFIX}{k}" for k in folds]
    for d in dirs:
        for name in (CHECKPOINT_FILE, META_FILE):
            if not (d / name).is_file():
                raise BoneHealthError(f"{d / name}: fold checkpoint missing; rerun `python -m src.train`")
    return dirs


def numeric_metrics(metrics: dict[str, Any]) -> dict[str, float | int]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[key] = value  # counts stay ints: "n_images 22", not "22.0000"
    return out


def gate_metrics_present(metrics: dict[str, Any], params: Params, path: Path) -> None:
    """The gate compares these later; a version without them could never be judged."""
    for key in (params.register.gate.metric, params.register.gate.sensitivity_metric):
        if key not in metrics:
            raise BoneHealthError(
                f"{path}: metric {key!r} (register.gate) is missing; have {', '.join(sorted(metrics)) or 'none'}"
            )


def store_info(params: Params, meta: dict[str, Any]) -> dict[str, Any]:
    """Data provenance: the manifest hash the checkpoints were trained on, and counts from the
    prepared store when it still holds that same data."""
    from src.train import dataset_name

    trained_on = (meta.get("preprocessing") or {}).get("manifest_sha256")
    info: dict[str, Any] = {"name": dataset_name(params), "root": params.data.root, "manifest_sha256": trained_on}
    store = Path(params.prepare.out)
    store_meta_path = store / "meta.json"
    if not store_meta_path.is_file():
        info["note"] = f"prepared store {store_meta_path} not found; counts unavailable"
    else:
        store_meta = read_json(store_meta_path, "prepared store meta")
        manifest = store / "manifest.csv"
        current = store_meta.get("manifest_sha256") or (sha256_file(manifest) if manifest.is_file() else None)
        if trained_on and current and current != trained_on:
            info["note"] = f"prepared store {store} changed since training (manifest {current[:12]}...); counts omitted"
        else:
            info["manifest_sha256"] = trained_on or current
            info["root"] = store_meta.get("data_root", info["root"])
            info["n_images"] = store_meta.get("n_images")
            if manifest.is_file():
                frame = pd.read_csv(manifest, usecols=lambda c: c in ("class", "patient"), dtype=str)
                if "class" in frame:
                    counts = frame["class"].value_counts().sort_index()
                    info["images_per_class"] = {str(k): int(v) for k, v in counts.items()}
                if "patient" in frame:
                    info["patients"] = int(frame["patient"].nunique())
    phantom = Path(params.phantom.out).resolve()
    root = Path(str(info["root"])).resolve()
    info["synthetic_phantom"] = root == phantom or phantom in root.parents
    info["manifest_sha256"] = info["manifest_sha256"] or "unknown"
    return info


# ------------------------------------------------------------------------ model pieces
def stage_checkpoints(dirs: list[Path], dst: Path) -> dict[str, str]:
    """Copy only model.pt + meta.json per fold: test_predictions.csv names patients and files,
    which have no business inside a model that gets shared or served."""
    artifacts = {}
    for d in dirs:
        key = d.name if d.name.startswith(CHECKPOINT_PREFIX) else f"{CHECKPOINT_PREFIX}{d.name}"
        target = dst / key
        target.mkdir(parents=True)
        for name in (CHECKPOINT_FILE, META_FILE):
            shutil.copy2(d / name, target / name)
        artifacts[key] = str(target)
    return artifacts


def model_signature(classes: list[str]):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    inputs = Schema([ColSpec("string", IMAGE_COLUMN)] + [ColSpec("double", c, required=False) for c in BOX_COLUMNS])
    outputs = Schema([ColSpec("double", prob_column(c)) for c in classes] + [ColSpec("string", PREDICTED_COLUMN)])
    return ModelSignature(inputs=inputs, outputs=outputs)


def example_image_png(height: int, width: int) -> bytes:
    """A smooth synthetic grey image: the input example must never be a patient's radiograph."""
    from PIL import Image

    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = 0.5 + 0.25 * np.sin(xx / max(width, 1) * 6.0) * np.cos(yy / max(height, 1) * 3.0)
    buf = io.BytesIO()
    Image.fromarray(np.rint(img * 255).astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def input_example(params: Params, prep: dict[str, Any]) -> pd.DataFrame:
    h, w = params.register.example_size
    frame = pd.DataFrame({IMAGE_COLUMN: [base64.b64encode(example_image_png(h, w)).decode("ascii")]})
    if prep.get("mode") == "crop":  # a crop model needs its box; centre a small one
        side = max(2.0, min(h, w) / 8.0)
        for col, value in zip(BOX_COLUMNS, (w / 2 - side / 2, h / 2 - side / 2, side, side)):
            frame[col] = [float(value)]
    return frame


def installed_versions(names: list[str]) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = importlib_metadata.version(name).split("+")[0]  # drop local tags like +cu128
        except importlib_metadata.PackageNotFoundError:
            continue
    return out


def pip_requirements() -> list[str]:
    return [f"{name}=={version}" for name, version in installed_versions(RUNTIME_DISTRIBUTIONS).items()]


def version_tags(*, params: Params, cv: dict[str, Any], metrics: dict[str, float], data: dict[str, Any],
                 git: str, strategy: str, n_models: int, meta: dict[str, Any]) -> dict[str, str]:
    tags = {f"{METRIC_TAG_PREFIX}{k}": repr(v) for k, v in metrics.items()}
    tags.update({
        "cv_parent_run_id": str(cv["parent_run_id"]),
        "fold_run_ids": json.dumps(cv.get("fold_run_ids") or {}, sort_keys=True),
        "git_commit": git,
        "manifest_sha256": str(data["manifest_sha256"]),
        "dataset": str(data["name"]),
        "strategy": strategy,
        "n_models": str(n_models),
        "model": str(meta.get("model")),
        "classes": json.dumps(list(meta["classes"])),
        "positive_class": str(meta.get("positive_class")),
        "params": json.dumps(flatten(params), sort_keys=True, default=str),
        "registered_by": current_user(),
        "registered_at": utc_now(),
    })
    return tags


def current_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------ strategies
def refit_checkpoint(params: Params, cv: dict[str, Any], dirs: list[Path], work: Path) -> Path:
    """One model trained on every prepared image with the CV's settings, for the median of the
    folds' best epochs (the upper median for an even K): the CV chose how long to train."""
    from src.store import PreparedStore
    from src.trainer import train_all

    store = PreparedStore.open(params.prepare.out)
    trained_on = (read_meta(dirs[0]).get("preprocessing") or {}).get("manifest_sha256")
    if trained_on and store.meta.get("manifest_sha256") != trained_on:
        raise BoneHealthError(
            f"{store.root / 'meta.json'}: manifest_sha256 differs from the one the CV folds were trained on; "
            "the data changed since the CV, rerun it (dvc repro) before a refit"
        )
    epochs = statistics.median_high(int(read_meta(d).get("best_epoch") or params.train.epochs) for d in dirs)
    refit = params.model_copy(deep=True)
    refit.train.epochs = epochs
    out = work / f"{CHECKPOINT_PREFIX}refit"
    train_all(refit, store, out, extra_meta={"refit_epochs": epochs, "cv_parent_run_id": cv["parent_run_id"]})
    return out


# ---------------------------------------------------------------------------- register
def register(params: Params, *, strategy: str | None = None) -> Registered:
    """Log the pyfunc in a run under the CV parent, register it, tag it, alias it `challenger`."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from src.model_card import build_metadata, render_markdown
    from src.tracking import configure, git_commit, log_params_flat

    cfg = params.register
    strategy = strategy or cfg.strategy
    train_out = Path(params.train.out)
    cv = load_cv(train_out)
    dirs = fold_dirs(train_out, cv)
    meta = read_meta(dirs[0])
    metrics_path = Path(params.evaluate.out) / METRICS_FILE
    metrics = numeric_metrics(read_json(metrics_path, "evaluation metrics", "run `python -m src.evaluate` first"))
    gate_metrics_present(metrics, params, metrics_path)
    gradcam_path = Path(params.gradcam.out) / METRICS_FILE
    gradcam = numeric_metrics(read_json(gradcam_path, "Grad-CAM metrics")) if gradcam_path.is_file() else None
    data = store_info(params, meta)
    git = git_commit()

    configure(params.mlflow)
    client = MlflowClient()
    try:
        parent = client.get_run(cv["parent_run_id"])
    except MlflowException:
        raise BoneHealthError(
            f"{train_out / CV_FILE}: parent run {cv['parent_run_id']} is not in the tracking store "
            f"{mlflow.get_tracking_uri()} (was mlflow.tracking_uri changed since training?)"
        ) from None

    with tempfile.TemporaryDirectory(prefix="register-") as tmp:
        work = Path(tmp)
        members = [refit_checkpoint(params, cv, dirs, work)] if strategy == "refit" else dirs
        meta = read_meta(members[0])
        artifacts = stage_checkpoints(members, work / "checkpoints")
        example = input_example(params, prepare_settings(meta))
        versions = installed_versions(RUNTIME_DISTRIBUTIONS)
        provenance = {"strategy": strategy, "model": meta.get("model"), "n_models": len(members),
                      "best_epochs": ", ".join(str(read_meta(d).get("best_epoch", "?")) for d in members),
                      "git_commit": git, "cv_parent_run_id": cv["parent_run_id"], "registered_at": utc_now()}
        card_meta = build_metadata(name=cfg.name, version=None, strategy=strategy, meta=meta, n_models=len(members),
                                   cv_metrics=metrics, gradcam_metrics=gradcam, data=data, provenance=provenance,
                                   versions=versions)
        tags = version_tags(params=params, cv=cv, metrics=metrics, data=data, git=git, strategy=strategy,
                            n_models=len(members), meta=meta)

        with mlflow.start_run(run_name=f"register-{strategy}", experiment_id=parent.info.experiment_id,
                              tags={"mlflow.parentRunId": parent.info.run_id, "stage": "register",
                                    "git_commit": git, "manifest_sha256": str(data["manifest_sha256"])}) as run:
            log_params_flat(flatten(params))
            mlflow.log_metrics(metrics)
            info = mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT_NAME,
                python_model=str(SRC_DIR / PYFUNC_ENTRY),
                artifacts=artifacts,
                code_paths=[str(SRC_DIR)],
                signature=model_signature(list(meta["classes"])),
                input_example=example,
                pip_requirements=pip_requirements(),
                model_config={"batch_size": cfg.batch_size},
            )
            version = mlflow.register_model(info.model_uri, cfg.name, tags=tags)
            # The version number is only known now: the card names it, then goes in three places:
            # the run's artifacts (the "artifact of the version"), the version's
            # description, and register.out for DVC.
            card_meta["version"] = str(version.version)
            card = render_markdown(card_meta)
            mlflow.log_text(card, f"{CARD_KEY}/{CARD_FILE}")
            mlflow.log_dict(card_meta, f"{CARD_KEY}/{CARD_METADATA_FILE}")
            mlflow.set_tags({"registered_model": cfg.name, "registered_version": str(version.version)})
            run_id = run.info.run_id

    client.set_model_version_tag(cfg.name, version.version, "model_card", f"runs:/{run_id}/{CARD_KEY}/{CARD_FILE}")
    client.update_model_version(cfg.name, version.version, description=_summary(cfg.name, version.version, metrics, params))
    client.set_registered_model_alias(cfg.name, cfg.challenger_alias, version.version)
    client.set_model_version_tag(cfg.name, version.version, "challenger_since", utc_now())

    result = Registered(name=cfg.name, version=str(version.version), run_id=run_id,
                        model_uri=f"models:/{cfg.name}@{cfg.challenger_alias}", alias=cfg.challenger_alias, tags=tags)
    out = Path(cfg.out)
    atomic_write_text(out / CARD_FILE, card)
    atomic_write_json(out / LOCAL_METADATA_FILE, card_meta)
    atomic_write_json(out / RESULT_FILE, {k: v for k, v in asdict(result).items() if k != "tags"})
    return result


def _summary(name: str, version: str, metrics: dict[str, float], params: Params) -> str:
    key = params.register.gate.metric
    lo, hi = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
    ci = f" (CI {lo:.3f}-{hi:.3f})" if lo is not None and hi is not None else ""
    return (f"{name} v{version}: research screening aid, not a diagnosis. "
            f"{key} {metrics[key]:.4f}{ci}; see the model card artifact.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m src.register", description=__doc__.splitlines()[0])
    add_params_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    params = params_from_args(args)
    result = register(params)
    gate = params.register.gate.metric
    print(f"registered {result.name} version {result.version} (alias {result.alias}) from run {result.run_id}")
    print(f"  {gate} = {result.tags.get(METRIC_TAG_PREFIX + gate)}; model card: {Path(params.register.out) / CARD_FILE}")
    print("  promote with: python -m src.promote")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
