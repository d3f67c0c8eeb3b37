"""The checkpoint folders behind a model reference: an MLflow model URI (`models:/name@alias`,
`runs:/...`), a downloaded MLflow model folder, a `train.out` folder, or one checkpoint folder.

A registered model carries its fold checkpoints as pyfunc artifacts named CHECKPOINT_PREFIX +
fold (`fold_0` .. `fold_{K-1}`, or `fold_refit`), and a crop-mode model the locate stage's fold
localisers as LOCALISER_PREFIX + fold (`localiser_0` ..); this module is the one reader of that
layout (register writes it), for predict and Grad-CAM's single-image mode.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import yaml

from src.artifacts.checkpoint import META_FILE
from src.artifacts.cv_run import FOLD_PREFIX
from src.core.errors import BoneHealthError

# Artifact keys are the fold folders' names: fold_0..fold_{K-1}, or fold_refit.
CHECKPOINT_PREFIX = FOLD_PREFIX
# The localisers' keys: a prefix that CHECKPOINT_PREFIX does not match, so neither reader picks
# up the other's folders.
LOCALISER_PREFIX = "localiser_"


def _sorted_keys(keys: Iterable[str], prefix: str) -> list[str]:
    chosen = [k for k in keys if k.startswith(prefix)]
    suffix = lambda k: k[len(prefix):]  # noqa: E731
    return sorted(chosen, key=lambda k: (not suffix(k).isdigit(), int(suffix(k)) if suffix(k).isdigit() else 0, k))


def sorted_checkpoint_keys(keys: Iterable[str]) -> list[str]:
    """fold_0, fold_1, ..., fold_10 in numeric order (then any non-numeric, e.g. fold_refit)."""
    return _sorted_keys(keys, CHECKPOINT_PREFIX)


def sorted_localiser_keys(keys: Iterable[str]) -> list[str]:
    """localiser_0, localiser_1, ... in numeric order."""
    return _sorted_keys(keys, LOCALISER_PREFIX)


@dataclass(frozen=True)
class ModelFolders:
    checkpoints: list[Path]
    # The localisers a registered model bundles ([] for none); None when the reference is no
    # MLflow model (a train.out or checkpoint folder), so the caller decides where to look.
    localisers: list[Path] | None


def checkpoint_dirs(model: str | Path, dst: str | Path | None = None) -> list[Path]:
    """Checkpoint folders behind a model reference, for predict --cam and Grad-CAM's single image
    (see `model_folders`)."""
    return model_folders(model, dst).checkpoints


def model_folders(model: str | Path, dst: str | Path | None = None) -> ModelFolders:
    """Checkpoint (and bundled localiser) folders behind a model reference.

    `model` may be a `models:/name@alias` (or any MLflow model URI: runs:/, models:/name/3, a
    logged-model id), a downloaded MLflow model folder (with MLmodel), a `train.out` folder with
    fold_<k>/ sub-folders, or one checkpoint folder.  MLflow URIs are downloaded (to `dst`, or a
    temporary folder) with the tracking/registry URI already configured by the caller.
    """
    path = Path(str(model))
    if path.exists():
        return _local_folders(path)
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
    return _local_folders(Path(local))


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


def _local_folders(path: Path) -> ModelFolders:
    if path.is_file():
        path = path.parent
    if (path / "MLmodel").is_file():
        return ModelFolders(_mlmodel_checkpoint_dirs(path), localiser_dirs(path))
    if (path / META_FILE).is_file():
        return ModelFolders([path], None)
    folds = {p.name: p for p in path.glob(f"{CHECKPOINT_PREFIX}*") if (p / META_FILE).is_file()}
    if folds:
        return ModelFolders([folds[k] for k in sorted_checkpoint_keys(folds)], None)
    raise BoneHealthError(
        f"{path}: no checkpoints found (expected MLmodel, meta.json, or fold_<k>/meta.json folders)"
    )


def _mlmodel_artifacts(path: Path) -> dict:
    conf = yaml.safe_load((path / "MLmodel").read_text()) or {}
    return (conf.get("flavors", {}).get("python_function", {}) or {}).get("artifacts") or {}


def _mlmodel_checkpoint_dirs(path: Path) -> list[Path]:
    artifacts = _mlmodel_artifacts(path)
    keys = sorted_checkpoint_keys(artifacts)
    if not keys:
        raise BoneHealthError(f"{path}/MLmodel: not a bone-health model (no {CHECKPOINT_PREFIX}<k> artifacts)")
    return [path / artifacts[k]["path"] for k in keys]


def localiser_dirs(model_folder: str | Path) -> list[Path]:
    """The localiser folders a downloaded MLflow model bundles (artifacts localiser_<k>); [] for none."""
    path = Path(model_folder)
    if not (path / "MLmodel").is_file():
        raise BoneHealthError(f"{path}: no MLmodel file; expected a downloaded MLflow model folder")
    artifacts = _mlmodel_artifacts(path)
    return [path / artifacts[k]["path"] for k in sorted_localiser_keys(artifacts)]
