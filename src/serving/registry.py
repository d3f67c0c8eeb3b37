"""Registering a finished CV as a model version (the register stage's work).

The version is an MLflow pyfunc (src/serving/pyfunc_model.py) that carries the fold
checkpoints as plain artifacts (state_dict + meta.json, so Grad-CAM can still hook the
network), for a crop-mode model the locate stage's fold localisers (which find the crop box
when the caller gives none), and the `src` package as code, so `mlflow models serve` and
`mlflow.pyfunc.load_model` need no checkout.  It is logged in a "register" run nested under
the CV parent run, with the CV metrics, the params and the model card; the version itself
carries the tags that the promotion gate reads (`metric.<name>`), so promote never needs the
files of an old run.
"""
from __future__ import annotations

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

from src.artifacts.checkpoint import (
    CHECKPOINT_FILE,
    META_FILE,
    CheckpointMeta,
    read_meta,
)
from src.artifacts.cv_run import (
    CV_FILE,
    CvRun,
    cv_provenance,
    fold_checkpoint_dirs,
    open_parent_run,
    read_cv,
)
from src.artifacts.metrics_file import (
    Provenance,
    check_provenance,
    metrics_path,
    numeric,
    read_metrics,
)
from src.artifacts.model_ref import CHECKPOINT_PREFIX, LOCALISER_PREFIX
from src.artifacts.source_data import is_within
from src.artifacts.store import MANIFEST_FILE, PreparedStore
from src.artifacts.store import META_FILE as STORE_META_FILE
from src.core.config import Params, flatten
from src.core.errors import BoneHealthError
from src.core.fileio import (
    atomic_write_json,
    atomic_write_text,
    read_json_object,
    sha256_file,
)
from src.core.redact import redact_params
from src.core.tracking import git_commit, log_params_flat, mlflow_metrics
from src.data.dataset import dataset_name
from src.localise.artifact import META_FILE as LOCALISER_META_FILE
from src.localise.artifact import WEIGHTS_FILE as LOCALISER_WEIGHTS_FILE
from src.localise.finder import BoxFinder
from src.model.fit import train_all
from src.serving.localisers import fold_localiser_dirs, fold_suffix
from src.serving.model_card import build_metadata, crop_box_line, render_markdown
from src.serving.pyfunc_model import (
    BOX_COLUMNS,
    BOX_CONFIDENCE_COLUMN,
    BOX_SOURCE_COLUMN,
    CARD_KEY,
    ERROR_COLUMN,
    IMAGE_COLUMN,
    PREDICTED_COLUMN,
    prob_column,
)

CARD_FILE = "model_card.md"
CARD_METADATA_FILE = "metadata.json"  # its name in the run, as in a MONAI bundle
LOCAL_METADATA_FILE = "model_card.json"  # its name in register.out, beside evaluate's files
RESULT_FILE = "registered.json"
METRIC_TAG_PREFIX = "metric."
# The figures people compare, as version tags (plus the gate's own keys); every metric is on the
# register run that logged the model, and in the model card.
TAGGED_METRICS = ("oof_roc_auc", "oof_roc_auc_ci_low", "oof_roc_auc_ci_high", "oof_sensitivity",
                  "oof_specificity", "oof_balanced_accuracy", "oof_brier", "oof_ece", "n_collapsed_folds")
# Where the version's metric.<name> tags came from (evaluate's metrics.json provenance), next to
# `cv_parent_run_id`/`checkpoints_sha256` (what was registered): promote checks they agree.
METRICS_CV_TAG = "metrics_cv_parent_run_id"
METRICS_CHECKPOINTS_TAG = "metrics_checkpoints_sha256"
CHECKPOINTS_TAG = "checkpoints_sha256"
LOCALISERS_TAG = "n_localisers"  # crop mode: the fold localisers bundled to find boxes
EVALUATE_CMD = "python -m src.evaluate"
LOCATE_HIT_RATE = "locate_oof_hit_rate"  # locate's metrics.json: the held-out share of boxes found
GRADCAM_CMD = "python -m src.gradcam"
MODEL_ARTIFACT_NAME = "model"
SRC_DIR = Path(__file__).resolve().parents[1]  # the `src` package: the model's code
PYFUNC_ENTRY = Path(__file__).resolve().parent / "pyfunc_entry.py"  # models-from-code: MLflow runs this file
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
def cv_metrics(params: Params, expected: Provenance) -> dict[str, float | int]:
    """Evaluate's numbers, refused unless computed from the CV being registered: after
    `train --set train.out=B` without evaluate, metrics.json still holds CV A's figures."""
    path = metrics_path(params.evaluate.out)
    raw = read_metrics(params.evaluate.out, "evaluation metrics", f"run `{EVALUATE_CMD}` first")
    check_provenance(raw, path, expected, Path(params.train.out) / CV_FILE, EVALUATE_CMD)
    metrics = numeric(raw)
    gate_metrics_present(metrics, params, path)
    return metrics


def gradcam_metrics(params: Params, expected: Provenance) -> dict[str, float | int] | None:
    """Grad-CAM's numbers for the model card, held to the same rule; None when the stage has not run."""
    path = metrics_path(params.gradcam.out)
    if not path.is_file():
        return None
    raw = read_metrics(params.gradcam.out, "Grad-CAM metrics")
    check_provenance(raw, path, expected, Path(params.train.out) / CV_FILE, GRADCAM_CMD)
    return numeric(raw)


def gate_metrics_present(metrics: dict[str, Any], params: Params, path: Path) -> None:
    """The gate compares these later; a version without them could never be judged."""
    for key in (params.register.gate.metric, params.register.gate.sensitivity_metric):
        if key not in metrics:
            raise BoneHealthError(
                f"{path}: metric {key!r} (register.gate) is missing; have {', '.join(sorted(metrics)) or 'none'}"
            )


def store_info(params: Params, meta: CheckpointMeta) -> dict[str, Any]:
    """Data provenance: the manifest hash the checkpoints were trained on, and counts from the
    prepared store when it still holds that same data."""
    trained_on = meta.manifest_sha256
    info: dict[str, Any] = {"name": dataset_name(params), "root": params.data.root, "manifest_sha256": trained_on}
    store = Path(params.prepare.out)
    store_meta_path = store / STORE_META_FILE
    if not store_meta_path.is_file():
        info["note"] = f"prepared store {store_meta_path} not found; counts unavailable"
    else:
        store_meta = read_json_object(store_meta_path, "prepared store meta not found")
        manifest = store / MANIFEST_FILE
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
    info["synthetic_phantom"] = is_within(str(info["root"]), params.phantom.out)
    # the model card's wording (model_card.wording)
    info.update({k: v for k, v in (("description", params.data.description),
                                   ("modality", params.data.modality)) if v})
    info["manifest_sha256"] = info["manifest_sha256"] or "unknown"
    return info


# ------------------------------------------------------------------------ model pieces
def stage_checkpoints(dirs: list[Path], dst: Path) -> dict[str, str]:
    """Copy only model.pt + meta.json per fold: test_predictions.csv names patients and files,
    which have no business inside a model that gets shared or served."""
    return _stage(dirs, dst, lambda d: d.name if d.name.startswith(CHECKPOINT_PREFIX) else f"{CHECKPOINT_PREFIX}{d.name}",
                  (CHECKPOINT_FILE, META_FILE))


def stage_localisers(dirs: list[Path], dst: Path) -> dict[str, str]:
    """Copy only localiser.pt + meta.json per fold, as artifacts localiser_<k> (k: the fold it never saw)."""
    return _stage(dirs, dst, lambda d: f"{LOCALISER_PREFIX}{fold_suffix(d)}", (LOCALISER_WEIGHTS_FILE, LOCALISER_META_FILE))


def _stage(dirs: list[Path], dst: Path, key_of, files: tuple[str, ...]) -> dict[str, str]:
    """{artifact key: folder} of copies of `files` from each of `dirs`, under dst/<key>."""
    artifacts = {}
    for d in dirs:
        key = key_of(d)
        target = dst / key
        target.mkdir(parents=True)
        for name in files:
            shutil.copy2(d / name, target / name)
        artifacts[key] = str(target)
    return artifacts


def localiser_hit_rate(params: Params, finder: BoxFinder) -> float | None:
    """The locate stage's held-out hit rate for the card; None when its metrics.json is absent or
    was written for other localisers than the bundled ones (a retrain since, say)."""
    path = metrics_path(params.locate.out)
    if not path.is_file():
        return None
    metrics = read_json_object(path, "locate metrics not found")
    written_for = metrics.get("locate_fingerprint")
    if written_for is not None and any(m.fingerprint != written_for for m in finder.metas):
        return None
    value = metrics.get(LOCATE_HIT_RATE)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def model_signature(classes: list[str], crop: bool = False):
    """Inputs: the image and an optional box.  Outputs: prob_<class> and predicted; crop mode adds
    the box used, its source and confidence, and the per-row error (optional: error rows lack some)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    inputs = Schema([ColSpec("string", IMAGE_COLUMN)] + [ColSpec("double", c, required=False) for c in BOX_COLUMNS])
    outputs = [ColSpec("double", prob_column(c)) for c in classes] + [ColSpec("string", PREDICTED_COLUMN)]
    if crop:
        outputs += [ColSpec("double", c, required=False) for c in BOX_COLUMNS]
        outputs += [ColSpec("string", BOX_SOURCE_COLUMN, required=False),
                    ColSpec("double", BOX_CONFIDENCE_COLUMN, required=False),
                    ColSpec("string", ERROR_COLUMN, required=False)]
    return ModelSignature(inputs=inputs, outputs=Schema(outputs))


def example_image_png(height: int, width: int) -> bytes:
    """A smooth synthetic grey image: the input example must never be a patient's radiograph."""
    from PIL import Image

    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = 0.5 + 0.25 * np.sin(xx / max(width, 1) * 6.0) * np.cos(yy / max(height, 1) * 3.0)
    buf = io.BytesIO()
    Image.fromarray(np.rint(img * 255).astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def input_example(params: Params, prep: dict[str, Any], located: bool = False) -> pd.DataFrame:
    """One synthetic image; a crop model without a localiser (`located`) needs its box, so it gets one."""
    h, w = params.register.example_size
    frame = pd.DataFrame({IMAGE_COLUMN: [base64.b64encode(example_image_png(h, w)).decode("ascii")]})
    if prep.get("mode") == "crop" and not located:  # centre a small box
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


def version_tags(*, params: Params, cv: CvRun, metrics: dict[str, float], provenance: Provenance,
                 data: dict[str, Any], git: str, strategy: str, n_models: int, meta: CheckpointMeta) -> dict[str, str]:
    gate = params.register.gate
    keep = {*TAGGED_METRICS, gate.metric, f"{gate.metric}_ci_low", f"{gate.metric}_ci_high", gate.sensitivity_metric}
    tags = {f"{METRIC_TAG_PREFIX}{k}": repr(v) for k, v in metrics.items() if k in keep}
    tags.update({
        "cv_parent_run_id": cv.parent_run_id,
        CHECKPOINTS_TAG: provenance.checkpoints_sha256,
        # register checked these equal the two above; promote checks again on the version itself.
        METRICS_CV_TAG: provenance.cv_parent_run_id,
        METRICS_CHECKPOINTS_TAG: provenance.checkpoints_sha256,
        "fold_run_ids": json.dumps(cv.fold_run_ids, sort_keys=True),
        "git_commit": git,
        "manifest_sha256": str(data["manifest_sha256"]),
        "dataset": str(data["name"]),
        "strategy": strategy,
        "n_models": str(n_models),
        "model": meta.model,
        "classes": json.dumps(list(meta.classes)),
        "positive_class": str(meta.positive_class),
        "params": json.dumps(redact_params(flatten(params)), sort_keys=True, default=str),
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
def refit_checkpoint(params: Params, cv: CvRun, dirs: list[Path], work: Path) -> Path:
    """One model trained on every prepared image with the CV's settings, for the median of the
    folds' best epochs (the upper median for an even K): the CV chose how long to train."""
    store = PreparedStore.open(params.prepare.out)
    trained_on = read_meta(dirs[0]).manifest_sha256
    if trained_on and store.meta.get("manifest_sha256") != trained_on:
        raise BoneHealthError(
            f"{store.root / STORE_META_FILE}: manifest_sha256 differs from the one the CV folds were trained on; "
            "the data changed since the CV, rerun it (dvc repro) before a refit"
        )
    epochs = statistics.median_high(int(read_meta(d).best_epoch or params.train.epochs) for d in dirs)
    refit = params.model_copy(deep=True)
    refit.train.epochs = epochs
    out = work / f"{CHECKPOINT_PREFIX}refit"
    train_all(refit, store, out, extra_meta={"refit_epochs": epochs, "cv_parent_run_id": cv.parent_run_id})
    return out


# ---------------------------------------------------------------------------- register
def register(params: Params, *, strategy: str | None = None) -> Registered:
    """Log the pyfunc in a run under the CV parent, register it, tag it, alias it `challenger`."""
    import mlflow

    cfg = params.register
    strategy = strategy or cfg.strategy
    train_out = Path(params.train.out)
    cv = read_cv(train_out)
    dirs = fold_checkpoint_dirs(train_out, cv)
    meta = read_meta(dirs[0])
    checked = cv_provenance(train_out, cv)  # what the metrics files must say they were computed from
    metrics = cv_metrics(params, checked)
    gradcam = gradcam_metrics(params, checked)
    data = store_info(params, meta)
    git = git_commit()
    client, parent = open_parent_run(params.mlflow, train_out, cv.parent_run_id)

    with tempfile.TemporaryDirectory(prefix="register-") as tmp:
        work = Path(tmp)
        members = [refit_checkpoint(params, cv, dirs, work)] if strategy == "refit" else dirs
        meta = read_meta(members[0])
        crop = meta.prepare_settings.get("mode") == "crop"
        artifacts = stage_checkpoints(members, work / "checkpoints")
        localisers = fold_localiser_dirs(params.locate.out) if crop else []
        # Loaded here so a broken or mixed set fails now rather than in every server that loads the model.
        finder = BoxFinder(localisers) if localisers else None
        artifacts.update(stage_localisers(localisers, work / "localisers"))
        example = input_example(params, meta.prepare_settings, located=finder is not None)
        versions = installed_versions(RUNTIME_DISTRIBUTIONS)
        provenance = {"strategy": strategy, "model": meta.model, "n_models": len(members),
                      "best_epochs": ", ".join(str(read_meta(d).best_epoch or "?") for d in members),
                      "git_commit": git, "cv_parent_run_id": cv.parent_run_id,
                      "checkpoints_sha256": checked.checkpoints_sha256, "registered_at": utc_now()}
        crop_box = crop_box_line(finder.describe() if finder else None,
                                 localiser_hit_rate(params, finder) if finder else None,
                                 str(metrics_path(params.locate.out))) if crop else None
        card_meta = build_metadata(name=cfg.name, version=None, strategy=strategy, meta=meta, n_models=len(members),
                                   cv_metrics=metrics, gradcam_metrics=gradcam, data=data, provenance=provenance,
                                   versions=versions, data_warnings=cv.warnings, crop_box=crop_box)
        tags = version_tags(params=params, cv=cv, metrics=metrics, provenance=checked, data=data, git=git,
                            strategy=strategy, n_models=len(members), meta=meta)
        if crop:  # 0: every request must carry its box
            tags[LOCALISERS_TAG] = str(len(localisers))

        with mlflow.start_run(run_name=f"register-{strategy}", experiment_id=parent.info.experiment_id,
                              tags={"mlflow.parentRunId": parent.info.run_id, "stage": "register",
                                    "git_commit": git, "manifest_sha256": str(data["manifest_sha256"])}) as run:
            log_params_flat(flatten(params))
            mlflow.log_metrics(mlflow_metrics(metrics))
            info = mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT_NAME,
                python_model=str(PYFUNC_ENTRY),
                artifacts=artifacts,
                code_paths=[str(SRC_DIR)],
                signature=model_signature(list(meta.classes), crop=crop),
                input_example=example,
                pip_requirements=pip_requirements(),
                model_config={"batch_size": cfg.batch_size, "max_pixels": params.data.max_pixels},
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
    client.update_registered_model(cfg.name, description=_model_description(cfg, card_meta))
    client.set_registered_model_alias(cfg.name, cfg.challenger_alias, version.version)
    client.set_model_version_tag(cfg.name, version.version, "challenger_since", utc_now())

    result = Registered(name=cfg.name, version=str(version.version), run_id=run_id,
                        model_uri=f"models:/{cfg.name}@{cfg.challenger_alias}", alias=cfg.challenger_alias, tags=tags)
    out = Path(cfg.out)
    atomic_write_text(out / CARD_FILE, card)
    atomic_write_json(out / LOCAL_METADATA_FILE, card_meta)
    atomic_write_json(out / RESULT_FILE, {k: v for k, v in asdict(result).items() if k != "tags"})
    return result


def _model_description(cfg, card_meta: dict[str, Any]) -> str:
    """The registered model's own description (the UI's model page): what it does and how its
    aliases move; each version's description and card hold its figures."""
    return (f"{card_meta['task']}. {card_meta['intended_use']}\n\n"
            f"Versions come from `python -m src.register` (a {card_meta['description']}); the newest is "
            f"@{cfg.challenger_alias}. `python -m src.promote` moves @{cfg.champion_alias} to it only when it passes "
            f"the gate on {cfg.gate.metric} ("
            + (f"its CI above {cfg.gate.floor}, and " if cfg.gate.floor is not None else "")
            + "better than the champion). "
            "Each version's model_card tag points at its card.")


def _summary(name: str, version: str, metrics: dict[str, float], params: Params) -> str:
    key = params.register.gate.metric
    lo, hi = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
    ci = f" (CI {lo:.3f}-{hi:.3f})" if lo is not None and hi is not None else ""
    return (f"{name} v{version}: research screening aid, not a diagnosis. "
            f"{key} {metrics[key]:.4f}{ci}; see the model card artifact.")
