"""The checkpoint folders behind a model reference: an MLflow model URI (`models:/name@alias`,
`runs:/...`), a downloaded MLflow model folder, a `train.out` folder, or one checkpoint folder.

A registered model carries its fold checkpoints as pyfunc artifacts named CHECKPOINT_PREFIX +
fold (`fold_0` .. `fold_{K-1}`, or `fold_refit`); this module is the one reader of that layout
(register writes it), for predict --cam and Grad-CAM's single-image mode.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import yaml

from src.artifacts.checkpoint import META_FILE
from src.artifacts.cv_run import FOLD_PREFIX
from src.core.errors import BoneHealthError

# Artifact keys are the fold folders' names: fold_0..fold_{K-1}, or fold_refit.
CHECKPOINT_PREFIX = FOLD_PREFIX


def sorted_checkpoint_keys(keys: Iterable[str]) -> list[str]:
    """fold_0, fold_1, ..., fold_10 in numeric order (then any non-numeric, e.g. fold_refit)."""
    chosen = [k for k in keys if k.startswith(CHECKPOINT_PREFIX)]
    suffix = lambda k: k[len(CHECKPOINT_PREFIX):]  # noqa: E731
    return sorted(chosen, key=lambda k: (not suffix(k).isdigit(), int(suffix(k)) if suffix(k).isdigit() else 0, k))


def checkpoint_dirs(model: str | Path, dst: str | Path | None = None) -> list[Path]:
    """Checkpoint folders behind a model reference, for predict --cam and Grad-CAM's single image.

    `model` may be a `models:/name@alias` (or any MLflow model URI: runs:/, models:/name/3, a
    logged-model id), a downloaded MLflow model folder (with MLmodel), a `train.out` folder with
    fold_<k>/ sub-folders, or one checkpoint folder.  MLflow URIs are downloaded (to `dst`, or a
    temporary folder) with the tracking/registry URI already configured by the caller.
    """
    path = Path(str(model))
    if path.exists():
        return _local_checkpoint_dirs(path)
    text = str(model)
    if "://" not in text and not text.startswith(("models:", "runs:", "m-")):
        raise BoneHealthError(
            f"--model {text!r}: not an existing folder nor an MLflow model URI (e.g. models:/bone-health@champion)"
        )
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=text, dst_path=None if dst is None else str(dst))
    except MlflowException as exc:
        hint = _alias_hint(text)
        raise BoneHealthError(hint or f"--model {text!r}: cannot load from MLflow ({exc.message.splitlines()[0]})") \
            from None
    return _local_checkpoint_dirs(Path(local))


def _alias_hint(uri: str) -> str | None:
    """For `models:/name@alias` with no such alias (typically @champion before the first
    promote): the aliases and versions that do exist, and how to promote."""
    if not uri.startswith("models:/") or "@" not in uri:
        return None
    name, _, alias = uri.removeprefix("models:/").partition("@")
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        model = MlflowClient().get_registered_model(name)
    except MlflowException:
        return f"--model {uri!r}: no registered model {name!r} in this MLflow store; run `python -m src.register` first"
    if alias in (model.aliases or {}):
        return None
    aliases = ", ".join(f"@{a} -> v{v}" for a, v in sorted((model.aliases or {}).items())) or "none"
    return (f"--model {uri!r}: no version of {name!r} has the alias @{alias} yet (aliases: {aliases}); promote one "
            f"with `python -m src.promote`, or pick one: --model models:/{name}@<alias> or models:/{name}/<version>")


def _local_checkpoint_dirs(path: Path) -> list[Path]:
    if path.is_file():
        path = path.parent
    if (path / "MLmodel").is_file():
        return _mlmodel_checkpoint_dirs(path)
    if (path / META_FILE).is_file():
        return [path]
    folds = {p.name: p for p in path.glob(f"{CHECKPOINT_PREFIX}*") if (p / META_FILE).is_file()}
    if folds:
        return [folds[k] for k in sorted_checkpoint_keys(folds)]
    raise BoneHealthError(
        f"{path}: no checkpoints found (expected MLmodel, meta.json, or fold_<k>/meta.json folders)"
    )


def _mlmodel_checkpoint_dirs(path: Path) -> list[Path]:
    conf = yaml.safe_load((path / "MLmodel").read_text()) or {}
    artifacts = (conf.get("flavors", {}).get("python_function", {}) or {}).get("artifacts") or {}
    keys = sorted_checkpoint_keys(artifacts)
    if not keys:
        raise BoneHealthError(f"{path}/MLmodel: not a bone-health model (no {CHECKPOINT_PREFIX}<k> artifacts)")
    return [path / artifacts[k]["path"] for k in keys]
