"""The prepared store (`prepare.out`): its layout, its writer's pieces and its reader.

    images.npy    (N, H, W) uint8/uint16, opened as a memmap; row i is manifest row i
    manifest.csv  MANIFEST_COLUMNS: file, class, label, patient, fold, source size, box, crop, sha256
    meta.json     mode, size, dtype, classes, positive_class, folds, fold_seed, preprocessing
                  (the prepare section), data_root, n_images, manifest_sha256
    report.json   the validation report

Training, evaluation, Grad-CAM and tuning read batches from here, never from image files.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

from src.core.diskspace import reserve
from src.core.errors import DataError
from src.core.fileio import json_default, read_json_object

IMAGES_FILE = "images.npy"
MANIFEST_FILE = "manifest.csv"
META_FILE = "meta.json"
REPORT_FILE = "report.json"
MANIFEST_COLUMNS = [
    "index", "file", "class", "label", "patient", "fold", "src_height", "src_width",
    "box_x", "box_y", "box_w", "box_h", "crop_x0", "crop_y0", "crop_side", "sha256",
]
COMPACT_CHUNK = 256  # rows copied at a time when dropping skipped images from the store


# ----------------------------------------------------------------------------- writing
def images_bytes(dtype: str, shape: tuple[int, ...]) -> int:
    """Size of images.npy's pixels (its header adds a few hundred bytes)."""
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def _open_reserved(path: Path, dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A writable memmap whose disk blocks are allocated up front: a memmap page the disk
    cannot back is a SIGBUS that kills the process, so a full disk must fail here instead."""
    images = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    reserve(path, images.offset + images_bytes(str(images.dtype), shape))
    return images


def open_images(path: Path, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """A writable memmapped images.npy: rows are filled as they are decoded (flat memory)."""
    return _open_reserved(path, dtype, shape)


def compact_images(path: Path, keep: list[int]) -> None:
    """Drop skipped rows: copy the kept ones into a new memmap chunk by chunk (flat memory)."""
    full = np.load(path, mmap_mode="r")
    tmp = path.with_name(f".compact.{path.name}")
    try:
        out = _open_reserved(tmp, full.dtype, (len(keep), *full.shape[1:]))
    except OSError as exc:  # named as the user will know it: the copy replaces images.npy
        exc.filename = str(path)
        raise
    for start in range(0, len(keep), COMPACT_CHUNK):
        rows = keep[start:start + COMPACT_CHUNK]
        out[start:start + len(rows)] = full[rows]
    out.flush()
    del out, full
    os.replace(tmp, path)


def write_manifest(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """manifest.csv in MANIFEST_COLUMNS order; a missing value is an empty cell."""
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(MANIFEST_COLUMNS)
        for row in rows:
            writer.writerow(["" if row.get(c) is None else row[c] for c in MANIFEST_COLUMNS])


def write_store_json(path: Path, obj: Mapping[str, Any]) -> None:
    """meta.json / report.json inside the store folder being built (swapped in whole later)."""
    path.write_text(json.dumps(obj, indent=2, default=_as_json) + "\n")


def _as_json(obj: Any) -> Any:
    try:
        return json_default(obj)
    except TypeError:  # a report names odd things (exceptions, sets): their text is what a reader wants
        return str(obj)


# ----------------------------------------------------------------------------- reading
def read_report(root: str | Path) -> dict[str, Any]:
    return read_json_object(Path(root) / REPORT_FILE, "validation report not found; run `python -m src.prepare`",
                            DataError)




@dataclass
class PreparedStore:
    root: Path
    images: np.ndarray  # (N, H, W) memmap, uint8 or uint16
    manifest: pd.DataFrame
    meta: dict[str, Any]

    @classmethod
    def open(cls, root: str | Path) -> "PreparedStore":
        root = Path(root)
        for name in (IMAGES_FILE, MANIFEST_FILE, META_FILE):
            if not (root / name).is_file():
                raise DataError(f"{root / name}: prepared store incomplete; run `python -m src.prepare` first")
        meta = read_json_object(root / META_FILE, "prepared store incomplete; run `python -m src.prepare` first", DataError)
        manifest = pd.read_csv(root / MANIFEST_FILE, dtype={"patient": str, "file": str, "class": str})
        images = np.load(root / IMAGES_FILE, mmap_mode="r")
        if len(images) != len(manifest):
            raise DataError(f"{root}: {len(images)} stored images but {len(manifest)} manifest rows")
        return cls(root=root, images=images, manifest=manifest, meta=meta)

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def positive_class(self) -> str:
        return self.meta["positive_class"]

    @property
    def labels(self) -> np.ndarray:
        return self.manifest["label"].to_numpy(dtype=np.int64)

    @property
    def folds(self) -> np.ndarray:
        return self.manifest["fold"].to_numpy(dtype=np.int64)

    @property
    def patients(self) -> np.ndarray:
        return self.manifest["patient"].to_numpy(dtype=str)

    @property
    def n_folds(self) -> int:
        return int(self.meta["folds"])

    def indices_of_fold(self, fold: int) -> np.ndarray:
        return np.flatnonzero(self.folds == fold)

    def indices_not_in_fold(self, fold: int) -> np.ndarray:
        return np.flatnonzero(self.folds != fold)
