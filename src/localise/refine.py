"""Refining each peak's centre on a finer view (a coarse-to-fine cascade).

The overview's heat-map cells are 4 overview pixels, ~6 mm on a phantom radiograph, and the box
sits under the mental foramen, a ~2 mm dark dot that the overview barely resolves: out of fold the
coarse peak is 1.8 mm off at the median, and on a phantom with more pose and exposure than it was
trained on, 2.6 mm, with one box in eight missed (IoU < 0.5).  A second network of the same kind
sees a small window of a finer view of the radiograph around each peak and finds the centre in
it; out of fold the median error falls to 1.2 mm and the misses to 1 in 100 (bench_locate.py).

The refiner moves the centre only: the box size stays the overview network's, whose size head
sees the whole jaw (with the refiner's own size the hits fell from 99% to 90% out of fold).
The confidence stays the overview network's too: it says whether there is a cortex at all.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from src.localise.fit import Batch, find_centres, predict_maps, train_heatmap
from src.localise.heatmap import Peak, decode
from src.localise.network import STRIDE, Localiser
from src.localise.overview import augment

MAX_JITTER = 0.4  # of the window's side: the true centre always lies inside the training window


@dataclass(frozen=True)
class FineView:
    """Where the refiner looks: windows of `window` pixels cut from the radiograph shrunk to `size`,
    placed `jitter` (sd, a fraction of the window's side) off the true centre in training."""
    size: tuple[int, int]    # [h, w] of the finer view
    window: tuple[int, int]  # [h, w] of the window around a peak
    jitter: float

    @classmethod
    def of(cls, refine_cfg) -> FineView:
        return cls(tuple(refine_cfg.size), tuple(refine_cfg.window), float(refine_cfg.jitter))

    def as_meta(self) -> dict:
        return {"size": list(self.size), "window": list(self.window), "jitter": self.jitter}

    def prior(self) -> np.ndarray:
        """(h/4, w/4) weights of the refiner's cells: the training offsets' Gaussian around the
        window centre.  The refiner never saw the centre near a window edge; without the prior
        a few peaks jumped there from a good coarse peak (3 of 217 out of fold, 11-15 mm off; with
        it none of the best peaks is more than 4.5 mm off)."""
        h, w = self.window
        ys = (np.arange(h // STRIDE) + 0.5) * STRIDE - h / 2
        xs = (np.arange(w // STRIDE) + 0.5) * STRIDE - w / 2
        if self.jitter <= 0:
            return np.ones((len(ys), len(xs)))
        return np.exp(-0.5 * ((ys[:, None] / (self.jitter * h)) ** 2 + (xs[None, :] / (self.jitter * w)) ** 2))


def cut_window(fine: np.ndarray, centre: tuple[float, float], window: tuple[int, int]
               ) -> tuple[np.ndarray, tuple[int, int]]:
    """The (h, w) window of a finer view around centre (x, y), edge pixels repeated beyond the
    image (a peak near a border still gets a whole window), and its top-left corner."""
    h, w = window
    x0, y0 = round(centre[0] - w / 2), round(centre[1] - h / 2)
    rows = np.clip(np.arange(y0, y0 + h), 0, fine.shape[0] - 1)
    cols = np.clip(np.arange(x0, x0 + w), 0, fine.shape[1] - 1)
    return fine[np.ix_(rows, cols)], (x0, y0)


def train_refiner(fines: np.ndarray, centres: np.ndarray, sizes: np.ndarray, cfg, seed: int,
                  label: str = "refiner", epoch_callback: Callable[[int, dict], None] | None = None) -> Localiser:
    """Train on windows of `fines` (N, H, W) uint8 around the true centres (N, 2: x, y in fine
    pixels) moved by a random offset, so the network learns to find the centre wherever a coarse
    peak put the window; with the locate section `cfg` (its refine part for view and epochs)."""
    view = FineView.of(cfg.refine)
    wh = np.array(view.window[::-1], dtype=np.float64)

    def batch(idx: np.ndarray, rng: np.random.Generator) -> Batch:
        views, pts, box = [], [], []
        for i in idx:
            shift = np.clip(rng.normal(0.0, cfg.refine.jitter, 2), -MAX_JITTER, MAX_JITTER) * wh
            win, (x0, y0) = cut_window(fines[i], tuple(centres[i] + shift), view.window)
            img, point, scale = augment(win, (centres[i][0] - x0, centres[i][1] - y0), rng, cfg.augment)
            views.append(img)
            pts.append(point)
            box.append(sizes[i] * scale)
        return np.stack(views), np.asarray(pts, dtype=np.float32), np.asarray(box, dtype=np.float32)

    return train_heatmap(len(fines), view.window, batch, cfg, cfg.refine.epochs, seed, label, epoch_callback)


def refine_peaks(refiners: Sequence[Localiser], fines: np.ndarray, peaks: list[tuple[Peak, Peak]],
                 overview_size: tuple[int, int], view: FineView, own_size: bool = False) -> list[tuple[Peak, Peak]]:
    """Both peaks of each image (overview pixels) with their centres re-found by `refiners`
    (averaged, with the test-time flip; their probabilities weighted by the view's prior) in a
    window of the image's finer view; with `own_size` the refiner's box size too (bench_locate.py's
    ablation)."""
    if not peaks:
        return []
    to_fine = np.array([view.size[1] / overview_size[1], view.size[0] / overview_size[0]])
    windows, corners = [], []
    for fine, pair in zip(fines, peaks):
        for p in pair:
            win, corner = cut_window(fine, tuple(np.array([p.x, p.y]) * to_fine), view.window)
            windows.append(win)
            corners.append(corner)
    maps = predict_maps(refiners, np.stack(windows))
    maps[:, 0] *= view.prior()
    found = []
    for out, corner, p in zip(maps, corners, (p for pair in peaks for p in pair)):
        best, _ = decode(out, STRIDE)
        x, y = (np.array([best.x, best.y]) + corner) / to_fine
        size = {"w": best.w / to_fine[0], "h": best.h / to_fine[1]} if own_size else {}
        found.append(replace(p, x=float(x), y=float(y), **size))
    return [(found[2 * i], found[2 * i + 1]) for i in range(len(peaks))]


def find_peaks(models: Sequence[Localiser], refiners: Sequence[Localiser], overviews: np.ndarray,
               fines: np.ndarray | None, view: FineView | None) -> list[tuple[Peak, Peak]]:
    """Per image: (best peak, best peak on the other side) in overview pixels, their centres
    refined when there are refiners (then `fines` holds each image's finer view)."""
    peaks = find_centres(models, overviews)
    if not refiners:
        return peaks
    return refine_peaks(refiners, fines, peaks, overviews.shape[1:], view)
