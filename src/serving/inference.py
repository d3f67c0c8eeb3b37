"""Predicting raw radiograph files with a model (the predict command's work).

Uses the same `Ensemble` as the registered pyfunc (src/serving/pyfunc_model.py), so a file
predicted here gets the probabilities that `mlflow models serve` returns for its bytes.  Each
file is decoded and preprocessed on its own: an unreadable one, or one on which the localiser
finds no cortex, becomes an error row and the others are still predicted.

A crop-mode model takes each file's box from --boxes/--box, else finds it with the localisers
the registered model bundles, or, for a local train.out or checkpoint folder, with the locate
stage's `{locate.out}/folds/fold_<k>`.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from src.artifacts.model_ref import model_folders
from src.core.config import Params
from src.core.errors import BoneHealthError
from src.core.text_table import text_table
from src.core.tracking import configure
from src.data.imaging import read_image
from src.data.preprocess import Box
from src.explain.cam import explain_ensemble
from src.explain.figures import save_overlay
from src.localise.finder import NoCortexFound
from src.serving.localisers import fold_localiser_dirs
from src.serving.pyfunc_model import (
    BOX_COLUMNS,
    BOX_CONFIDENCE_COLUMN,
    BOX_SOURCE_COLUMN,
    ERROR_COLUMN,
    BoxChoice,
    Ensemble,
    Prepared,
    parse_box,
    prob_column,
)

FILE_COLUMN = "file"


@dataclass
class Prediction:
    file: str
    probs: dict[str, float] = field(default_factory=dict)
    predicted: str | None = None
    error: str | None = None
    cam: str | None = None
    box: BoxChoice | None = None  # crop mode: the box the (first) crop was centred on
    array: np.ndarray | None = field(default=None, repr=False, compare=False)  # prepared input, for --cam

    def row(self) -> dict[str, Any]:
        out: dict[str, Any] = {FILE_COLUMN: self.file, "predicted": self.predicted}
        out.update({prob_column(c): p for c, p in self.probs.items()})
        if self.box is not None:
            out.update(zip(BOX_COLUMNS, self.box.box))
            out[BOX_SOURCE_COLUMN] = self.box.source
            out[BOX_CONFIDENCE_COLUMN] = self.box.confidence
        if self.cam:
            out["cam"] = self.cam
        out[ERROR_COLUMN] = self.error
        return out


def default_model(params: Params) -> str:
    return f"models:/{params.register.name}@{params.register.champion_alias}"


def expand_inputs(paths: Iterable[str | Path], extensions: Iterable[str]) -> list[Path]:
    """Files as given (whatever their extension: the decoder judges them), folders walked
    recursively for the ingestion extensions, in a stable order; missing paths are kept so
    they are reported like any unreadable file."""
    exts = {e.lower() for e in extensions}
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            out.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in exts
                              and not p.name.startswith(".")))
        else:
            out.append(path)
    return out


def load_ensemble(params: Params, model: str | None = None, locate: bool = True) -> Ensemble:
    """Checkpoints behind `model` loaded into memory (a downloaded copy is removed afterwards),
    with the localisers that find crop boxes: those a registered model bundles, else (a local
    train.out or checkpoint folder) the locate stage's; none with `locate=False`."""
    ref = model or default_model(params)
    if not Path(ref).exists():
        configure(params.mlflow)
    with tempfile.TemporaryDirectory(prefix="predict-model-") as tmp:
        folders = model_folders(ref, dst=tmp)
        ensemble = Ensemble(folders.checkpoints, batch_size=params.register.batch_size,
                            max_pixels=params.data.max_pixels, localiser_dirs=folders.localisers if locate else None)
        # A registered model answers with its own localisers only (folders.localisers is [] when
        # it bundles none): a locate.out here may come from another run than the one it was
        # registered with.  Full-mode models never look, so a half-written locate.out cannot stop them.
        if locate and folders.localisers is None and ensemble.is_crop:
            ensemble.use_localisers(fold_localiser_dirs(params.locate.out))
        return ensemble


def read_boxes(path: str | Path) -> dict[str, Box]:
    """file -> box from a CSV with columns file, box_x, box_y, box_w, box_h (the ingestion
    manifest's format, so data.manifest itself can be passed)."""
    path = Path(path)
    if not path.is_file():
        raise BoneHealthError(f"--boxes {path}: file not found")
    try:
        frame = pd.read_csv(path, dtype={"file": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise BoneHealthError(f"--boxes {path}: not a readable CSV ({str(exc).splitlines()[0]})") from None
    missing = [c for c in ("file", *BOX_COLUMNS) if c not in frame.columns]
    if missing:
        raise BoneHealthError(f"--boxes {path}: missing column(s) {', '.join(missing)}; expected file, {', '.join(BOX_COLUMNS)}")
    out: dict[str, Box] = {}
    for line, row in enumerate(frame[["file", *BOX_COLUMNS]].itertuples(index=False, name=None), start=2):
        box = parse_box(row[1:], f"--boxes {path} line {line}")
        if box is not None:
            out[Path(row[0]).as_posix()] = box
    return out


def box_for(file: Path, boxes: dict[str, Box], default: Box | None) -> Box | None:
    """The file's own box (by its path as given, or as a path relative to some folder), else --box."""
    posix = Path(file).as_posix()
    if posix in boxes:
        return boxes[posix]
    for key, box in boxes.items():
        if posix.endswith("/" + key.lstrip("./")):
            return box
    return default


def predict_files(ensemble: Ensemble, files: list[Path], box: Box | None = None,
                  boxes: dict[str, Box] | None = None) -> list[Prediction]:
    """One Prediction per file, in order; decode/preprocess failures and radiographs on which
    the localiser finds no cortex become error rows."""
    results = [Prediction(file=str(f)) for f in files]
    ready: list[Prepared] = []
    ok: list[int] = []
    for i, path in enumerate(files):
        file_box = box_for(path, boxes or {}, box)
        if ensemble.is_crop and file_box is None and ensemble.finder is None:
            results[i].error = ("crop-mode model: this file needs its cortex box "
                                "(--box x,y,w,h, or --boxes CSV with file,box_x,box_y,box_w,box_h); "
                                "no localiser to find it (--no-locate, a registered model that bundles none, "
                                "or no {locate.out}/folds/fold_<k> beside a train.out folder)")
            continue
        try:
            ready.append(ensemble.prepare_input(read_image(path, ensemble.max_pixels), file_box, str(path)))
            ok.append(i)
        except NoCortexFound as exc:
            results[i].error = f"{_one_line(exc, path)} (--box x,y,w,h or --boxes CSV)"
        except BoneHealthError as exc:
            results[i].error = _one_line(exc, path)
        except (OSError, ValueError, MemoryError) as exc:  # decoders' own surprises: still per file
            results[i].error = f"{type(exc).__name__}: {exc}"
    probs = ensemble.predict_inputs(ready)
    classes = ensemble.classes
    for i, item, p in zip(ok, ready, probs):
        results[i].probs = {c: float(v) for c, v in zip(classes, p)}
        results[i].predicted = classes[int(np.argmax(p))]
        results[i].box = item.box
        results[i].array = item.arrays[0]  # --cam explains the first crop (the best peak's)
    return results


def _one_line(exc: Exception, path: Path) -> str:
    """The reason alone (the row already names the file): decoders prefix their messages with it."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text.removeprefix(f"{path}: ")


def write_cams(ensemble: Ensemble, results: list[Prediction], out_dir: Path, params: Params) -> None:
    """Grad-CAM overlay per predicted file: the mean of the fold models' maps for the class the
    ensemble predicted (as `python -m src.gradcam --image` does), written to out_dir/<name>_cam.png."""
    cfg = params.gradcam
    classes = ensemble.classes
    taken: set[str] = set()
    for res in results:
        arr = res.array
        if res.error or arr is None:
            continue
        if cfg.target == "positive" and ensemble.positive_class in classes:
            target = classes.index(ensemble.positive_class)
        else:  # "true" has no meaning for a new radiograph: explain the prediction
            target = classes.index(res.predicted)
        try:
            cam, _ = explain_ensemble(list(zip(ensemble.models, ensemble.metas)), arr, cfg.method,
                                      cfg.target_layer, target=target, batch_size=cfg.batch_size)
            name = _unique(Path(res.file).stem + "_cam.png", taken)
            path = save_overlay(out_dir / name, arr, cam, pred_class=res.predicted, prob=res.probs[res.predicted],
                                alpha=cfg.alpha, method=cfg.method,
                                note=f"{Path(res.file).name}, mean of {len(ensemble.models)} model(s)")
            res.cam = str(path)
        except BoneHealthError as exc:
            res.error = f"Grad-CAM failed: {str(exc).splitlines()[0]}"


def _unique(name: str, taken: set[str]) -> str:
    stem, suffix = name.rsplit(".", 1)
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{stem}_{n}.{suffix}"
    taken.add(candidate)
    return candidate


def results_frame(results: list[Prediction], classes: list[str], crop: bool = False) -> pd.DataFrame:
    """One row per file; `crop` (a crop-mode model) adds the box columns, its source and confidence."""
    columns = [FILE_COLUMN, "predicted", *[prob_column(c) for c in classes]]
    if crop:
        columns += [*BOX_COLUMNS, BOX_SOURCE_COLUMN, BOX_CONFIDENCE_COLUMN]
    if any(r.cam for r in results):
        columns.append("cam")
    columns.append(ERROR_COLUMN)
    return pd.DataFrame([r.row() for r in results], columns=columns)


def format_table(frame: pd.DataFrame) -> str:
    shown = frame.astype(object).where(frame.notna(), None)
    if shown[ERROR_COLUMN].isna().all():
        shown = shown.drop(columns=[ERROR_COLUMN])
    rows = [[_cell(col, v) for col, v in zip(shown.columns, row)] for row in shown.itertuples(index=False, name=None)]
    return text_table(list(shown.columns), rows)


def _cell(column: str, value: Any) -> Any:
    if value is None:
        return value
    if column.startswith("prob_"):
        return f"{value:.4f}"
    if column in BOX_COLUMNS:
        return f"{value:.1f}"
    if column == BOX_CONFIDENCE_COLUMN:
        return f"{value:.3f}"
    return value
