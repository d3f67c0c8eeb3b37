"""A finished cross-validation on disk (`train.out`) and its MLflow parent run.

    cv.json                 CvRun: parent run, fold runs, K, status (present only when finished)
    cv_state.json           the train stage's resume state (src.model.cross_validation)
    fold_<k>/model.pt       the fold's checkpoint (src.artifacts.checkpoint)
    fold_<k>/meta.json
    fold_<k>/test_predictions.csv   index, file, patient, fold, label, prob_<class>... (test fold only)
    fold_<k>/history.csv    the learning curve: epoch, train_loss, val_loss, val_auc, lr (`dvc plots`)

One reader for each: evaluate, gradcam, register and predict all go through here.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from src.artifacts.checkpoint import (
    CHECKPOINT_FILE,
    META_FILE,
    CheckpointMeta,
    is_complete,
    read_meta,
)
from src.artifacts.metrics_file import Provenance
from src.core.config import MlflowParams
from src.core.errors import DataError
from src.core.fileio import (
    atomic_path,
    atomic_write_json,
    read_json_object,
    sha256_file,
)
from src.core.redact import redact_url
from src.core.tracking import configure, find_run, tracking_uri

CV_FILE = "cv.json"
STATE_FILE = "cv_state.json"
PREDICTIONS_FILE = "test_predictions.csv"
HISTORY_FILE = "history.csv"
# The learning curve's columns, in this order; an undefined value (a one-class inner validation
# part has no AUC) is an empty cell.  Speed (images/s) stays in MLflow: it is no result.
HISTORY_COLUMNS = ("epoch", "train_loss", "val_loss", "val_auc", "lr")
FOLD_PREFIX = "fold_"
FINISHED = "FINISHED"


def fold_dir(train_out: str | Path, fold: int | str) -> Path:
    return Path(train_out) / f"{FOLD_PREFIX}{fold}"


@dataclass
class CvRun:
    """cv.json: written by the train stage once every fold is finished."""
    parent_run_id: str
    folds: int
    fold_run_ids: dict[str, str] = field(default_factory=dict)
    status: str = FINISHED
    run_name: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # data too small for the settings (model.data_checks)
    fold_figures: dict[str, dict[str, Any]] = field(default_factory=dict)  # per fold: test AUC, best epoch, s

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def write_cv(train_out: str | Path, cv: CvRun) -> Path:
    return atomic_write_json(Path(train_out) / CV_FILE, cv.to_dict())


def _parse(data: dict[str, Any], path: Path) -> CvRun:
    if data.get("status") != FINISHED:
        raise DataError(f"{path}: status is {data.get('status')!r}, expected {FINISHED!r}; rerun `python -m src.train`")
    if not data.get("parent_run_id"):
        raise DataError(f"{path}: no 'parent_run_id'; expected the CV parent MLflow run id")
    folds = data.get("folds")
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 1:
        raise DataError(f"{path}: 'folds' must be the number of folds, got {folds!r}")
    return CvRun(parent_run_id=str(data["parent_run_id"]), folds=folds,
                 fold_run_ids={str(k): str(v) for k, v in (data.get("fold_run_ids") or {}).items()},
                 status=FINISHED, run_name=data.get("run_name"), metrics=dict(data.get("metrics") or {}),
                 warnings=[str(w) for w in data.get("warnings") or [] if isinstance(w, str)],
                 fold_figures={str(k): dict(v) for k, v in (data.get("fold_figures") or {}).items()
                               if isinstance(v, dict)})


def read_cv(train_out: str | Path) -> CvRun:
    """The finished CV in `train_out`; a missing, unfinished or malformed cv.json is a DataError."""
    path = Path(train_out) / CV_FILE
    return _parse(read_json_object(path, "not found; run `python -m src.train` first", DataError), path)


def peek_cv(train_out: str | Path) -> CvRun | None:
    """The finished CV in `train_out`, or None when there is none (resume decisions)."""
    try:
        return read_cv(train_out)
    except DataError:
        return None


def fold_complete(train_out: str | Path, fold: int) -> bool:
    d = fold_dir(train_out, fold)
    return is_complete(d) and (d / PREDICTIONS_FILE).is_file()


def fold_checkpoint_dirs(train_out: str | Path, cv: CvRun) -> list[Path]:
    """The K fold checkpoints of the CV (all of them: a partial ensemble is not the CV's model)."""
    dirs = [fold_dir(train_out, k) for k in range(cv.folds)]
    for d in dirs:
        if not is_complete(d):
            raise DataError(f"{d}: fold checkpoint incomplete (model.pt + meta.json); rerun `python -m src.train`")
    return dirs


def checkpoints_sha256(train_out: str | Path, cv: CvRun) -> str:
    """One content hash of the CV's K fold checkpoints (model.pt + meta.json of each): what
    evaluate and gradcam record beside their metrics and what register recomputes, so metrics
    of other checkpoints are caught even under the same parent run id.  Each file's hash is
    keyed by its fold folder, so swapping two folds changes the result."""
    lines = sorted(f"{d.name}/{name} {sha256_file(d / name)}"
                   for d in fold_checkpoint_dirs(train_out, cv) for name in (CHECKPOINT_FILE, META_FILE))
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


def cv_provenance(train_out: str | Path, cv: CvRun) -> Provenance:
    """What a metrics file computed from this CV records, and what register expects to find."""
    return Provenance(cv.parent_run_id, checkpoints_sha256(train_out, cv))


# ----------------------------------------------------------------------- predictions
def write_fold_predictions(directory: str | Path, predictions: pd.DataFrame) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / PREDICTIONS_FILE) as tmp:
        predictions.to_csv(tmp, index=False)
    return directory / PREDICTIONS_FILE


def read_fold_predictions(train_out: str | Path, fold: int) -> pd.DataFrame:
    path = fold_dir(train_out, fold) / PREDICTIONS_FILE
    if not path.is_file():
        raise DataError(f"{path}: fold {fold} predictions missing; rerun `python -m src.train`")
    return pd.read_csv(path, dtype={"patient": str, "file": str})


# ----------------------------------------------------------------------- learning curves
def write_fold_history(directory: str | Path, history: list[dict[str, Any]]) -> Path:
    """One row per epoch trained (HISTORY_COLUMNS), written atomically beside the checkpoint."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame([{c: row.get(c) for c in HISTORY_COLUMNS} for row in history], columns=list(HISTORY_COLUMNS))
    frame["epoch"] = frame["epoch"].astype(int)
    with atomic_path(directory / HISTORY_FILE) as tmp:
        frame.to_csv(tmp, index=False)
    return directory / HISTORY_FILE


def read_fold_histories(train_out: str | Path, folds: int) -> dict[int, pd.DataFrame]:
    """{fold: its history} for the folds that have one (a fold trained by an older version has none)."""
    out = {}
    for k in range(folds):
        path = fold_dir(train_out, k) / HISTORY_FILE
        if path.is_file():
            out[k] = pd.read_csv(path)
    return out


def load_oof(train_out: str | Path, cv: CvRun) -> tuple[pd.DataFrame, list[CheckpointMeta]]:
    """Pool the folds' test predictions: (frame sorted by image index, each fold's meta).
    Every image must be predicted exactly once, by folds that agree on the classes."""
    train_out = Path(train_out)
    frames = [read_fold_predictions(train_out, k) for k in range(cv.folds)]
    metas = [read_meta(fold_dir(train_out, k)) for k in range(cv.folds)]
    classes = metas[0].classes
    for k, meta in enumerate(metas):
        if meta.classes != classes:
            raise DataError(f"{fold_dir(train_out, k)}/meta.json: classes {meta.classes} differ from fold 0's {classes}")
    oof = pd.concat(frames, ignore_index=True).sort_values("index", kind="mergesort").reset_index(drop=True)
    dup = oof["index"][oof["index"].duplicated()]
    if len(dup):
        raise DataError(f"{train_out}: image index {int(dup.iloc[0])} is predicted by more than one fold")
    missing = [f"prob_{c}" for c in classes if f"prob_{c}" not in oof]
    if missing:
        raise DataError(f"{train_out}: prediction columns {missing} missing")
    return oof, metas


# ----------------------------------------------------------------------- MLflow
def open_parent_run(mlflow_cfg: MlflowParams, train_out: str | Path, run_id: str):
    """(client, run) of the CV's parent run in the configured store, or a one-line error when
    the store does not hold it (mlflow.tracking_uri changed since training, say)."""
    from mlflow.tracking import MlflowClient

    configure(mlflow_cfg)
    client = MlflowClient()
    run = find_run(client, run_id, mlflow_cfg)  # an unreachable store is its own error, not "missing"
    if run is None:
        raise DataError(f"{Path(train_out) / CV_FILE}: parent run {run_id} is not in the MLflow store "
                        f"{redact_url(tracking_uri(mlflow_cfg))}; rerun `python -m src.train` against this store")
    return client, run
