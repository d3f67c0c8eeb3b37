"""Measuring the phantom from its pixels alone: the cortical width inside an annotation box
(does the drawn class signal survive acquisition?) and the global intensity features a
shortcut would use (it must not separate the classes).  Used by the phantom's tests and
benchmarks/calibrate_phantom.py, and by the example figure."""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from src.core.errors import DataError


@dataclass
class CortexMeasurement:
    width_mm: float          # perpendicular width between the half-maximum edges of the bright band
    slope_deg: float         # inclination of the inferior border in the box
    offsets_mm: np.ndarray   # perpendicular distance above the inferior border (negative: below it)
    profile: np.ndarray      # median intensity across the box's columns at those offsets
    columns: int             # columns whose border was found and used


def _as_float(image: np.ndarray) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim != 2:
        raise DataError(f"expected a grey (H, W) image, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / 65535.0
    return arr.astype(np.float32, copy=False)


def cortex_profile(image: np.ndarray, box, mm_per_px: float = 1.0, above_mm: float = 12.0,
                   below_mm: float = 5.0, step_mm: float | None = None) -> CortexMeasurement:
    """Measure the inferior mandibular cortex inside an annotation box, from the pixels alone.

    In every column of the box the inferior border is the steepest fall of intensity going
    down (bright cortex over dark soft tissue); a robust line through those edges gives the
    border's slope.  Intensities are then sampled along the perpendicular, aligned on that line,
    and their median across columns is the profile.  The width is the distance between the
    half-maximum crossings on either side of the profile's peak: towards the soft tissue below
    and towards the cancellous bone (8 mm and more above the border) on the endosteal side.
    """
    img = _as_float(image)
    H, W = img.shape
    x, y, w, h = (int(round(float(v))) for v in box)
    c0, c1 = max(0, x), min(W, x + w)
    if c1 - c0 < 3 or h < 3:
        raise DataError(f"box {tuple(box)}: needs at least 3 columns and rows inside the {W}x{H} image")
    step = step_mm or mm_per_px / 2
    px = 1.0 / mm_per_px
    reach = int((above_mm + below_mm) * px * 1.3) + 4
    r0, r1 = max(0, y - reach), min(H, y + h + reach)
    sub = cv2.GaussianBlur(np.ascontiguousarray(img[r0:r1, c0:c1]), (0, 0), max(0.7, 0.3 * px))
    fall = sub[1:] - sub[:-1]
    s0, s1 = max(0, y - r0), min(fall.shape[0], y + h - r0 + int(2 * px) + 1)
    rows = np.argmin(fall[s0:s1], axis=0) + s0
    cols = np.arange(c1 - c0)
    edge = rows + 0.5 + _parabolic_offset(fall, rows, cols)
    keep = np.ones(edge.size, bool)
    for _ in range(3):  # a line through the edges, dropping columns where a tooth or noise won
        a, b = np.polyfit(cols[keep], edge[keep], 1)
        resid = np.abs(edge - (a * cols + b))
        keep = resid <= max(1.5, 2.5 * float(np.median(resid[keep])))
    cos = math.cos(math.atan(a))
    offsets = np.arange(-below_mm, above_mm + step / 2, step)
    line = a * cols + b
    ys = (line[keep][None, :] - (offsets * px / cos)[:, None]).astype(np.float32)
    xs = np.broadcast_to(cols[keep][None, :].astype(np.float32), ys.shape)
    samples = cv2.remap(sub, np.ascontiguousarray(xs), ys, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    profile = np.median(samples, axis=1)
    return CortexMeasurement(width_mm=_half_max_width(offsets, profile), slope_deg=math.degrees(math.atan(a)),
                             offsets_mm=offsets, profile=profile, columns=int(keep.sum()))


def _parabolic_offset(fall: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Sub-pixel position of each column's extremum from its two neighbours."""
    lo = np.clip(rows - 1, 0, fall.shape[0] - 1)
    hi = np.clip(rows + 1, 0, fall.shape[0] - 1)
    a, b, c = fall[lo, cols], fall[rows, cols], fall[hi, cols]
    den = a - 2 * b + c
    return np.where(np.abs(den) > 1e-9, 0.5 * (a - c) / np.where(den == 0, 1, den), 0.0).clip(-0.5, 0.5)


def _crossing(offsets, profile, start: int, level: float, direction: int) -> float:
    i = start
    while 0 <= i + direction < len(profile) and profile[i + direction] >= level:
        i += direction
    j = i + direction
    if not 0 <= j < len(profile):
        return float(offsets[i])
    t = (profile[i] - level) / max(profile[i] - profile[j], 1e-9)
    return float(offsets[i] + t * (offsets[j] - offsets[i]))


def _half_max_width(offsets: np.ndarray, profile: np.ndarray) -> float:
    soft = float(np.median(profile[offsets <= -1.5]))
    trab = float(np.median(profile[offsets >= 8.0]))
    zone = np.flatnonzero((offsets >= -0.5) & (offsets <= 7.0))
    peak_i = int(zone[np.argmax(profile[zone])])
    peak = float(profile[peak_i])
    lower = _crossing(offsets, profile, peak_i, (peak + soft) / 2, -1)
    upper = _crossing(offsets, profile, peak_i, (peak + trab) / 2, +1)
    return upper - lower


GLOBAL_PERCENTILES = (1, 5, 25, 50, 75, 95, 99)


def global_intensity_features(image: np.ndarray) -> np.ndarray:
    """What a shortcut would use: mean, std, percentiles of the whole image, and its size."""
    img = _as_float(image)
    return np.array([img.mean(), img.std(), *np.percentile(img, GLOBAL_PERCENTILES), *img.shape], dtype=np.float64)
