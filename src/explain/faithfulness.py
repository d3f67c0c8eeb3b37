"""How far a heat map can be trusted: localisation against ground-truth regions and a
perturbation score that needs no ground truth.

Each localisation score is reported next to what a map carrying no information scores:
a uniform (or uniformly random) map puts `area_fraction` of its energy inside the region
and its peak lands there with probability `area_fraction`.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np
import torch

from src.core.errors import BoneHealthError

PEAK_ATOL = 1e-6  # map values this close to the maximum count as the peak (plateaus)
RANDOM_MAP_GRID = 8  # random baseline maps: uniform noise on an 8x8 grid, bilinear upsampled
# Scores whose value for a random map is 0 in expectation, so no baseline run is needed:
# ROAD's LeRF on a map R removes what MoRF removes on 1 - R, so road(1 - R) = -road(R), and a
# random map is as likely as its complement.
ZERO_BASELINE = frozenset({"road"})


def _check(cam: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    cam = np.asarray(cam, dtype=np.float64)
    mask = np.asarray(mask).astype(bool)
    if cam.shape != mask.shape:
        raise BoneHealthError(f"heat map shape {cam.shape} differs from mask shape {mask.shape}")
    if cam.size and float(cam.min()) < 0:
        raise BoneHealthError("heat map has negative values; expected a map in [0, 1]")
    return cam, mask


def area_fraction(mask: np.ndarray) -> float:
    """Share of the image inside the region: the score of an uninformative map."""
    return float(np.asarray(mask).astype(bool).mean())


def energy_inside(cam: np.ndarray, mask: np.ndarray) -> float:
    """Share of the map's total energy (sum) inside the region; NaN for an all-zero map."""
    cam, mask = _check(cam, mask)
    total = float(cam.sum())
    return float(cam[mask].sum() / total) if total > 0 else math.nan


def within(mask: np.ndarray, tolerance_px: float) -> np.ndarray:
    """The region grown by `tolerance_px` (Euclidean distance to its nearest pixel)."""
    import cv2

    mask = np.asarray(mask).astype(bool)
    if tolerance_px <= 0 or not mask.any():
        return mask
    distance = cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return distance <= tolerance_px


def pointing_hit(cam: np.ndarray, mask: np.ndarray, tolerance_px: float = 0.0) -> float:
    """Pointing game (Zhang et al., 2018): 1 if the map's peak lies within `tolerance_px` of the
    region, 0 if not (they allow 15 px at 224 px, for annotations that are not pixel-exact).

    A plateau of equal maxima scores the share of its pixels that hit (the hit probability of
    a random tie-break) instead of whichever pixel argmax finds first.  NaN for an all-zero
    map, which has no peak.
    """
    cam, mask = _check(cam, mask)
    peak = float(cam.max()) if cam.size else 0.0
    if peak <= 0:
        return math.nan
    peaks = cam >= peak - PEAK_ATOL
    return float(within(mask, tolerance_px)[peaks].mean())


def localisation(cam: np.ndarray, mask: np.ndarray, tolerance_px: float = 0.0) -> dict[str, float]:
    """energy_inside, pointing_hit (with the tolerance), pointing_inside (strict: the peak in
    the region itself) and area_fraction (what an uninformative map scores for energy)."""
    return {"energy_inside": energy_inside(cam, mask), "pointing_hit": pointing_hit(cam, mask, tolerance_px),
            "pointing_inside": pointing_hit(cam, mask), "area_fraction": area_fraction(mask)}


def ratios(metrics: dict[str, float], groups: Iterable[str]) -> dict[str, float]:
    """energy_over_area_<group>: the mean energy inside the region over the mean area fraction,
    i.e. how many times better than a map spread evenly (1.0 = chance)."""
    out = {}
    for group in groups:
        energy, area = metrics.get(f"energy_inside_{group}"), metrics.get(f"area_fraction_{group}")
        if energy is not None and area:
            out[f"energy_over_area_{group}"] = float(energy / area)
    return out


def random_map(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A smooth random map with the blob scale of a CAM from a final feature map."""
    import cv2

    grid = rng.random((RANDOM_MAP_GRID, RANDOM_MAP_GRID)).astype(np.float32)
    return np.clip(cv2.resize(grid, (int(shape[1]), int(shape[0])), interpolation=cv2.INTER_LINEAR), 0, 1)


def perturbation_score(model: torch.nn.Module, x: torch.Tensor, cam: np.ndarray, target: int, kind: str,
                       percentiles: Iterable[int] = (20, 40, 60, 80)) -> float:
    """A faithfulness score from pytorch_grad_cam.metrics on the target class probability.

    road: ROAD combined (Rong et al., 2022): (drop when removing the LEAST relevant pixels
      first - drop when removing the MOST relevant first) / 2, averaged over percentiles,
      removed pixels filled by noisy linear imputation. Higher is more faithful; ~0 for a
      map unrelated to the decision.
    confidence_change: change of the target probability when the input is multiplied by the
      map (CamMultImageConfidenceChange); near 0 or positive is good, strongly negative bad.
    cam: (h, w) at the model input size.
    """
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    cams = np.asarray(cam, dtype=np.float32)[None]
    if cams.shape[-2:] != tuple(x.shape[-2:]):
        raise BoneHealthError(f"perturbation: map {cams.shape[-2:]} must have the input size {tuple(x.shape[-2:])}")
    targets = [ClassifierOutputSoftmaxTarget(int(target))]
    model.eval()
    if kind == "road":
        from pytorch_grad_cam.metrics.road import ROADCombined

        metric = ROADCombined(percentiles=list(percentiles))
    elif kind == "confidence_change":
        from pytorch_grad_cam.metrics.cam_mult_image import CamMultImageConfidenceChange

        metric = CamMultImageConfidenceChange()
    else:
        raise BoneHealthError(f"gradcam.perturbation: unknown score {kind!r}; allowed: road, confidence_change, none")
    return float(np.asarray(metric(x, cams, targets, model)).reshape(-1)[0])


def summarise(rows: list[dict[str, Any]], classes: list[str], keys: Iterable[str]) -> dict[str, float]:
    """Flat means per class and over all images: {'<key>_<class>': ..., '<key>_all': ...}.

    NaNs (maps without a peak) are left out of the means and counted in n_empty_maps.
    """
    out: dict[str, float] = {}
    groups = {c: [r for r in rows if r["class"] == c] for c in classes}
    groups["all"] = list(rows)
    for group, members in groups.items():
        out[f"n_images_{group}"] = len(members)
        for key in keys:
            values = np.array([r[key] for r in members if r.get(key) is not None], dtype=np.float64)
            finite = values[np.isfinite(values)]
            if len(finite):
                out[f"{key}_{group}"] = float(finite.mean())
        if any("energy_inside" in r for r in members):
            out[f"n_empty_maps_{group}"] = int(sum(1 for r in members if not np.isfinite(r.get("energy_inside", 0.0))))
    return out
