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
from src.localise.fit import train_localiser
from src.localise.heatmap import Peak
from src.localise.network import Localiser
from src.localise.overview import overview
from src.localise.refine import FineView, find_peaks, train_refiner


@dataclass
class Annotated:
    """The store's images as the localiser sees them, with their boxes."""
    overviews: np.ndarray   # (N, h, w) uint8
    src_hw: np.ndarray      # (N, 2) source height, width
    boxes: np.ndarray       # (N, 4) x, y, w, h in source pixels
    fines: np.ndarray | None = None  # (N, H, W) uint8: the refiner's finer views, when there is one

    def scale(self, views: np.ndarray | None = None) -> np.ndarray:
        """(N, 2) pixels of `views` (the overviews by default) per source pixel, (x, y)."""
        h, w = (self.overviews if views is None else views).shape[1:]
        return np.array([w, h], dtype=np.float64) / self.src_hw[:, ::-1]

    def boxes_in(self, views: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(centres, sizes), (N, 2) each, in pixels of `views` (the overviews by default)."""
        scale = self.scale(views)
        return (self.boxes[:, :2] + self.boxes[:, 2:] / 2) * scale, self.boxes[:, 2:] * scale

    @property
    def centres(self) -> np.ndarray:
        return self.boxes_in()[0]

    @property
    def sizes(self) -> np.ndarray:
        return self.boxes_in()[1]

    def subset(self, rows: np.ndarray) -> Annotated:
        return Annotated(self.overviews[rows], self.src_hw[rows], self.boxes[rows],
                         None if self.fines is None else self.fines[rows])


def views_of(images, cfg: LocateParams) -> tuple[np.ndarray, np.ndarray | None]:
    """(overviews, finer views or None) of decoded grey radiographs, for the locate section cfg."""
    images = list(images)
    overviews = np.stack([overview(im, tuple(cfg.size)) for im in images])
    fines = np.stack([overview(im, tuple(cfg.refine.size)) for im in images]) if cfg.refine.enabled else None
    return overviews, fines


def annotated(store: PreparedStore, data_root: str | Path, cfg: LocateParams) -> Annotated:
    m = store.manifest
    missing = [c for c in ("box_x", "box_y", "box_w", "box_h") if c not in m]
    if missing or m[["box_x", "box_y", "box_w", "box_h"]].isna().any().any():
        raise DataError(f"{store.root}: the localiser learns from boxes; this store has images without one "
                        "(prepare.mode crop needs a box for every image)")
    root = Path(data_root)
    overviews, fines = views_of((read_image(root / f) for f in m["file"]), cfg)
    return Annotated(overviews, m[["src_height", "src_width"]].to_numpy(np.float64),
                     m[["box_x", "box_y", "box_w", "box_h"]].to_numpy(np.float64), fines)


def train_fold(data: Annotated, rows: np.ndarray, cfg: LocateParams, seed: int, label: str,
               epoch_callback=None) -> tuple[Localiser, Localiser | None]:
    """(localiser, refiner or None) trained on `rows` of data."""
    part = data.subset(rows)
    model = train_localiser(part.overviews, part.centres, part.sizes, cfg, seed, label=label,
                            epoch_callback=epoch_callback)
    if part.fines is None:
        return model, None
    centres, sizes = part.boxes_in(part.fines)
    refiner = train_refiner(part.fines, centres, sizes, cfg, seed,
                            label=f"{label} refiner",
                            epoch_callback=None if epoch_callback is None else
                            (lambda epoch, record: epoch_callback(epoch, {f"refine_{k}": v for k, v in record.items()})))
    return model, refiner


def fold_peaks(models: list[Localiser], refiners: list[Localiser | None], data: Annotated, cfg: LocateParams
               ) -> list[tuple[Peak, Peak]]:
    """Each image's peaks from `models` averaged, refined by `refiners` (None: not refined)."""
    kept = [r for r in refiners if r is not None]
    return find_peaks(models, kept, data.overviews, data.fines, FineView.of(cfg.refine) if kept else None)


def to_source(peaks: list[Peak], scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(centres, sizes) in source pixels from peaks in overview pixels; `scale` as Annotated.scale."""
    centres = np.array([[p.x, p.y] for p in peaks], dtype=np.float64).reshape(-1, 2) / scale
    sizes = np.array([[p.w, p.h] for p in peaks], dtype=np.float64).reshape(-1, 2) / scale
    return centres, sizes


def oof_localise(store: PreparedStore, data: Annotated, cfg: LocateParams, seed: int = 0
                 ) -> tuple[list[tuple[Peak, Peak]], list[Localiser], list[Localiser | None]]:
    """Per image (store order): its (best, other-side) peaks from the fold model (and refiner)
    that never saw it; and the fold models and refiners (an ensemble for new radiographs)."""
    peaks: list[tuple[Peak, Peak] | None] = [None] * len(data.overviews)
    models, refiners = [], []
    for k in range(store.n_folds):
        train, test = store.indices_not_in_fold(k), store.indices_of_fold(k)
        model, refiner = train_fold(data, train, cfg, seed + k, f"localiser fold {k}")
        for i, p in zip(test, fold_peaks([model], [refiner], data.subset(test), cfg)):
            peaks[i] = p
        models.append(model)
        refiners.append(refiner)
    return peaks, models, refiners
