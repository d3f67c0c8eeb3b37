"""Finding the cortex box on one new radiograph with the fold localisers (predict, the served
model): their heat maps averaged, the best peak and the other side's, in source pixels.

A radiograph on which no cell reaches `min_confidence` (a knee, a chest, a blank frame) has no
cortex to crop: `NoCortexFound`, which callers turn into an error row instead of a crop taken
from wherever the arg-max happened to fall.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from src.core.errors import BoneHealthError, DataError
from src.data.preprocess import Box
from src.localise.artifact import LocaliserMeta, load_localiser
from src.localise.heatmap import Peak
from src.localise.overview import overview
from src.localise.refine import find_peaks


class NoCortexFound(DataError):
    """The localiser found no mandibular cortex on this image."""


@dataclass(frozen=True)
class Located:
    box: Box                    # x, y, w, h in source pixels: the best peak
    confidence: float
    other_box: Box | None       # the other side's peak, when it passes min_confidence
    other_confidence: float

    def boxes(self, both_sides: bool) -> list[Box]:
        return [self.box, self.other_box] if both_sides and self.other_box is not None else [self.box]


def peak_box(peak: Peak, scale_xy: tuple[float, float], src_hw: tuple[float, float]) -> Box:
    """A peak in overview pixels -> (x, y, w, h) in source pixels, its centre kept on the image:
    the offset head may put an edge cell's centre just outside, where no crop can be centred."""
    sx, sy = scale_xy
    w, h = peak.w / sx, peak.h / sy
    cx = float(np.clip(peak.x / sx, 0.0, src_hw[1] - 1))
    cy = float(np.clip(peak.y / sy, 0.0, src_hw[0] - 1))
    return (cx - w / 2, cy - h / 2, w, h)


class BoxFinder:
    """The fold localisers of one locate run, used together (their heat maps averaged)."""

    def __init__(self, directories: Sequence[str | Path]):
        if not directories:
            raise BoneHealthError("no localiser folders given")
        loaded = [load_localiser(d) for d in directories]
        self.models = [m for m, _, _ in loaded]
        self.refiners = [r for _, r, _ in loaded if r is not None]
        self.metas: list[LocaliserMeta] = [meta for _, _, meta in loaded]
        first = self.metas[0]
        for directory, meta in zip(directories[1:], self.metas[1:]):
            if (meta.model, list(meta.size), meta.refine) != (first.model, list(first.size), first.refine):
                raise BoneHealthError(f"{directory}: localiser {meta.model} at {meta.size} (refiner {meta.refine}) "
                                      f"differs from {directories[0]} ({first.model} at {first.size}, refiner "
                                      f"{first.refine}); expected one locate run")
        self.view = first.fine_view()

    @property
    def size(self) -> tuple[int, int]:
        return int(self.metas[0].size[0]), int(self.metas[0].size[1])

    @property
    def min_confidence(self) -> float:
        return float(self.metas[0].min_confidence)

    @property
    def both_sides(self) -> bool:
        return bool(self.metas[0].both_sides)

    def describe(self) -> str:
        m = self.metas[0]
        refined = "" if self.view is None else (
            f", centres refined in {self.view.window[0]}x{self.view.window[1]} windows of a "
            f"{self.view.size[0]}x{self.view.size[1]} view")
        return (f"{len(self.models)} fold localiser(s), {m.model} on {m.size[0]}x{m.size[1]} overviews{refined}, "
                f"min confidence {m.min_confidence:g}" + (", both sides averaged" if m.both_sides else ""))

    def locate(self, image: np.ndarray) -> Located:
        """The cortex box on a decoded grey radiograph in [0, 1]; NoCortexFound below min_confidence."""
        image = np.asarray(image)
        src_h, src_w = image.shape[:2]
        h, w = self.size
        fine = None if self.view is None else overview(image, self.view.size)[None]
        best, other = find_peaks(self.models, self.refiners, overview(image, (h, w))[None], fine, self.view)[0]
        if best.confidence < self.min_confidence:
            raise NoCortexFound(
                f"no mandibular cortex found: the localiser's best peak has confidence {best.confidence:.3f} "
                f"(< {self.min_confidence:g}, locate.min_confidence); is this a panoramic radiograph? "
                "give its cortex box (x, y, w, h) instead")
        scale = (w / src_w, h / src_h)
        other_ok = other.confidence >= self.min_confidence
        return Located(box=peak_box(best, scale, (src_h, src_w)), confidence=best.confidence,
                       other_box=peak_box(other, scale, (src_h, src_w)) if other_ok else None,
                       other_confidence=other.confidence)
