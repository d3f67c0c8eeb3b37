"""Reader of the prepared store written by `src.prepare` (layout: docs/ARCHITECTURE.md).

Training, evaluation, Grad-CAM and tuning read batches from here, never from image files.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from src.errors import DataError

IMAGES_FILE = "images.npy"
MANIFEST_FILE = "manifest.csv"
META_FILE = "meta.json"
REPORT_FILE = "report.json"
MANIFEST_COLUMNS = [
    "index", "file", "class", "label", "patient", "fold", "src_height", "src_width",
    "box_x", "box_y", "box_w", "box_h", "crop_x0", "crop_y0", "crop_side", "sha256",
]


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
        meta = json.loads((root / META_FILE).read_text())
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
