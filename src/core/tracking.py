"""MLflow wiring shared by every stage: SQLite backend, artifacts on disk, common tags."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from src.core.config import MlflowParams
from src.core.redact import redact_params

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
    """MLFLOW_TRACKING_URI wins (a shared server); otherwise the params' SQLite file."""
    uri = _user_tracking_env() or cfg.tracking_uri
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        db.parent.mkdir(parents=True, exist_ok=True)
    return uri


def configure(cfg: MlflowParams) -> str:
    """Point MLflow at our store and make sure the experiment exists; returns its id."""
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


def log_params_flat(flat: dict[str, Any]) -> None:
    """MLflow params are strings of at most 6000 chars, logged in batches of 100; URL passwords
    (tune.storage, mlflow.tracking_uri) are masked: params are stored and shown in plain text."""
    import mlflow

    items = {k: ("" if v is None else str(v))[:6000] for k, v in redact_params(flat).items()}
    keys = list(items)
    for i in range(0, len(keys), 100):
        mlflow.log_params({k: items[k] for k in keys[i:i + 100]})
