"""MLflow wiring shared by every stage: SQLite backend, artifacts on disk, common tags."""
from __future__ import annotations

import logging
import math
import numbers
import os
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

from src.core.config import MlflowParams
from src.core.errors import BoneHealthError
from src.core.redact import redact_params, redact_url

log = logging.getLogger(__name__)
T = TypeVar("T")

TRACKING_ENV = "MLFLOW_TRACKING_URI"


def _user_tracking_env() -> str | None:
    """The user's MLFLOW_TRACKING_URI (a shared server), not the copy MLflow exports itself.

    mlflow.set_tracking_uri also writes the variable (for subprocesses); a value equal to the
    URI set in this process came from there, whoever called it, and must not pin later stores.
    """
    from mlflow.tracking._tracking_service import utils as tracking_utils

    env = os.environ.get(TRACKING_ENV)
    set_here = getattr(tracking_utils, "_tracking_uri", None)
    return env if env and env != set_here else None


def tracking_uri(cfg: MlflowParams) -> str:
    """The URI to connect to (current_uri), with the folder of a SQLite file made."""
    uri = current_uri(cfg)
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        db.parent.mkdir(parents=True, exist_ok=True)
    return uri


class TrackingUnavailable(BoneHealthError):
    """The tracking store did not answer, or refused, a request whose answer a stage needs."""


# Answers that are final: asking again gives the same.  Anything else (a refused connection,
# a 5xx, a locked SQLite file, a timeout) may pass and is tried again.
_FINAL_CODES = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "PERMISSION_DENIED",
                "UNAUTHENTICATED", "CUSTOMER_UNAUTHORIZED", "RESOURCE_ALREADY_EXISTS"}


def _error_code(exc: BaseException) -> str | None:
    return getattr(exc, "error_code", None)


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return redact_url(text if len(text) <= limit else text[:limit] + "...")


def with_retries(what: str, call: Callable[[], T], cfg: MlflowParams) -> T:
    """`call()`, tried again with doubling waits while the error may be transient; then one line.

    A final answer from the store (not found, invalid, forbidden) is raised at once as it is: the
    caller decides what it means.  Over HTTP MLflow also retries each request itself
    (MLFLOW_HTTP_REQUEST_MAX_RETRIES, 7 by default, about 4 minutes)."""
    wait = cfg.retry_wait_s
    for attempt in range(cfg.retries + 1):
        try:
            return call()
        except BoneHealthError:
            raise
        except Exception as exc:  # noqa: BLE001 - classified below; nothing unclassified is ignored
            if _error_code(exc) in _FINAL_CODES:
                raise
            if attempt == cfg.retries:
                raise TrackingUnavailable(
                    f"mlflow.tracking_uri {redact_url(current_uri(cfg))}: {what} failed after "
                    f"{cfg.retries + 1} tries ({_first_line(exc)}); nothing was deleted, rerun when the "
                    f"tracking store answers (mlflow.retries, mlflow.retry_wait_s)") from None
            log.warning("tracking: %s failed (%s); retrying in %.1f s (try %d of %d)",
                        what, _first_line(exc, 160), wait, attempt + 2, cfg.retries + 1)
            time.sleep(wait)
            wait *= 2
    raise AssertionError("unreachable")


def current_uri(cfg: MlflowParams) -> str:
    """MLFLOW_TRACKING_URI wins (a shared server); otherwise the params' SQLite file."""
    return _user_tracking_env() or cfg.tracking_uri


RunState = Literal["active", "deleted", "missing"]


def find_run(client, run_id: str, cfg: MlflowParams):
    """The run, or None only when the store answers that it does not exist; an unreachable
    or refusing store is an error, never taken for a run that is gone."""
    try:
        return with_retries(f"looking up run {run_id}", lambda: client.get_run(run_id), cfg)
    except BoneHealthError:
        raise
    except Exception as exc:  # noqa: BLE001 - with_retries let only final answers through
        if _error_code(exc) == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise TrackingUnavailable(f"mlflow.tracking_uri {redact_url(current_uri(cfg))}: looking up run "
                                  f"{run_id} was refused ({_first_line(exc)})") from None


def run_state(client, run_id: str, cfg: MlflowParams) -> RunState:
    """Whether a run is there to resume (see find_run)."""
    run = find_run(client, run_id, cfg)
    if run is None:
        return "missing"
    return "active" if run.info.lifecycle_stage == "active" else "deleted"


def configure(cfg: MlflowParams) -> str:
    """Point MLflow at our store and make sure the experiment exists; returns its id."""
    return with_retries(f"opening experiment {cfg.experiment!r}", lambda: _configure(cfg), cfg)


def _configure(cfg: MlflowParams) -> str:
    import mlflow

    from_user = _user_tracking_env() is not None
    mlflow.set_tracking_uri(tracking_uri(cfg))
    exp = mlflow.get_experiment_by_name(cfg.experiment)
    if exp is None:
        location = None
        if not from_user:  # a server chooses its own artifact root
            root = Path(cfg.artifact_root).resolve()
            root.mkdir(parents=True, exist_ok=True)
            location = root.as_uri()
        exp_id = mlflow.create_experiment(cfg.experiment, artifact_location=location)
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def git_commit(cwd: str | Path = ".") -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        sha = out.stdout.strip() if out.returncode == 0 else "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10)
        if sha != "unknown" and dirty.stdout.strip():
            sha += "-dirty"
        return sha
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


# MLflow's UI groups charts by the part of a metric name before "/", sections in alphabetical
# order: a fold run shows its learning curves first (epoch/), then its one-value figures (fold/,
# test/); the CV parent has cv/, evaluate's oof/, fold_mean/ ..., Grad-CAM's gradcam/.
# Files (metrics.json, cv.json) keep their flat names: the gate and DVC read those.
METRIC_GROUPS = ("test", "cv", "oof", "fold_mean", "fold_std", "class", "gradcam", "fold")
RENAMED_METRICS = {
    "train_loss": "epoch/train_loss", "val_loss": "epoch/val_loss", "val_auc": "epoch/val_auc", "lr": "epoch/lr",
    "images_per_s": "epoch/images_per_s", "best_val_auc": "fold/best_val_auc", "best_epoch": "fold/best_epoch",
    "epochs_run": "fold/epochs_run", "fold_seconds": "fold/seconds",
}


def metric_name(key: str) -> str:
    """The MLflow name of a metric: `train_loss` -> `epoch/train_loss`, `oof_roc_auc` -> `oof/roc_auc`."""
    if key in RENAMED_METRICS:
        return RENAMED_METRICS[key]
    for group in sorted(METRIC_GROUPS, key=len, reverse=True):  # fold_mean before fold
        if key.startswith(group + "_") and len(key) > len(group) + 1:
            return f"{group}/{key[len(group) + 1:]}"
    return key


def mlflow_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Finite numbers only (numpy's too), under their MLflow names: MLflow takes NaN, but a metric
    that is undefined (one-class split) reads better absent; strings (provenance, warnings) and
    bools are no metrics."""
    return {metric_name(k): float(v) for k, v in metrics.items()
            if isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))}


def log_params_flat(flat: dict[str, Any]) -> None:
    """MLflow params are strings of at most 6000 chars, logged in batches of 100; URL passwords
    (tune.storage, mlflow.tracking_uri) are masked: params are stored and shown in plain text."""
    import mlflow

    items = {k: ("" if v is None else str(v))[:6000] for k, v in redact_params(flat).items()}
    keys = list(items)
    for i in range(0, len(keys), 100):
        mlflow.log_params({k: items[k] for k in keys[i:i + 100]})
