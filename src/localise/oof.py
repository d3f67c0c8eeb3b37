"""Out-of-fold localisation on a prepared store: every image's centre found by the localiser
trained on the other folds (the classifier's folds, so no patient is in both parts)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from src.artifacts.store import PreparedStore
from src.core.config import LocateParams
from src.core.errors import DataError
from src.data.imaging import read_image
from src.localise.fit import find_centres, train_localiser
from src.localise.heatmap import Peak
from src.localise.network import Localiser
from src.localise.overview import overview


@dataclass
class Annotated:
    """The store's images as the localiser sees them, with their boxes."""
    overviews: np.ndarray   # (N, h, w) uint8
    src_hw: np.ndarray      # (N, 2) source height, width
    boxes: np.ndarray       # (N, 4) x, y, w, h in source pixels

    def scale(self) -> np.ndarray:
        """(N, 2) overview pixels per source pixel, (x, y)."""
        h, w = self.overviews.shape[1:]
        return np.array([w, h], dtype=np.float64) / self.src_hw[:, ::-1]

    @property
    def centres(self) -> np.ndarray:
        return (self.boxes[:, :2] + self.boxes[:, 2:] / 2) * self.scale()

    @property
    def sizes(self) -> np.ndarray:
        return self.boxes[:, 2:] * self.scale()


def annotated(store: PreparedStore, data_root: str | Path, size: tuple[int, int]) -> Annotated:
    m = store.manifest
    missing = [c for c in ("box_x", "box_y", "box_w", "box_h") if c not in m]
    if missing or m[["box_x", "box_y", "box_w", "box_h"]].isna().any().any():
        raise DataError(f"{store.root}: the localiser learns from boxes; this store has images without one "
                        "(prepare.mode crop needs a box for every image)")
    root = Path(data_root)
    views = np.stack([overview(read_image(root / f), size) for f in m["file"]])
    return Annotated(views, m[["src_height", "src_width"]].to_numpy(np.float64),
                     m[["box_x", "box_y", "box_w", "box_h"]].to_numpy(np.float64))


def to_source(peaks: list[Peak], scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(centres, sizes) in source pixels from peaks in overview pixels; `scale` as Annotated.scale."""
    centres = np.array([[p.x, p.y] for p in peaks], dtype=np.float64).reshape(-1, 2) / scale
    sizes = np.array([[p.w, p.h] for p in peaks], dtype=np.float64).reshape(-1, 2) / scale
    return centres, sizes


def oof_localise(store: PreparedStore, data: Annotated, cfg: LocateParams, seed: int = 0
                 ) -> tuple[list[tuple[Peak, Peak]], list[Localiser]]:
    """Per image (store order): its (best, other-side) peaks from the fold model that never saw
    it; and the fold models (an ensemble for new radiographs)."""
    peaks: list[tuple[Peak, Peak] | None] = [None] * len(data.overviews)
    models = []
    for k in range(store.n_folds):
        train, test = store.indices_not_in_fold(k), store.indices_of_fold(k)
        model = train_localiser(data.overviews[train], data.centres[train], data.sizes[train], cfg, seed + k,
                                label=f"localiser fold {k}")
        for i, p in zip(test, find_centres([model], data.overviews[test])):
            peaks[i] = p
        models.append(model)
    return peaks, models
