"""Overviews: whole radiographs shrunk to the localiser's input, and their augmentation.

The box centre moves with every geometric change, so augmentation is done here (cv2 warps of
image and point together) rather than by the classifier's albumentations pipeline, which
knows nothing of the point.
"""
from __future__ import annotations

import math

import numpy as np

from src.data.preprocess import resize


def overview(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Grey float image in [0, 1] -> uint8 (h, w) overview (stretched to the fixed size: panoramics
    share one aspect ratio closely enough, and the point's coordinates scale per axis)."""
    small = resize(np.asarray(img, dtype=np.float32), size)
    return np.rint(np.clip(small, 0.0, 1.0) * 255.0).astype(np.uint8)


def to_input(batch: np.ndarray):
    """uint8 (N, h, w) -> float tensor (N, 1, h, w), each image standardised on its own (exposure
    differs between machines far more than anatomy does), channels-last: oneDNN's depthwise
    convolutions run 1.37x faster so on 2 CPU cores (mobilenetv3_small_100 at 96x192)."""
    import torch

    x = torch.from_numpy(np.asarray(batch, dtype=np.float32) / 255.0).unsqueeze(1)
    mean = x.mean(dim=(2, 3), keepdim=True)
    std = x.std(dim=(2, 3), keepdim=True).clamp(min=1e-3)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


def augment(img: np.ndarray, point: tuple[float, float], rng: np.random.Generator, strength: float = 1.0
            ) -> tuple[np.ndarray, tuple[float, float], float]:
    """One random view of an overview, its centre (x, y in pixels, pixel i spanning [i, i+1))
    and the scale applied (boxes grow with it): horizontal flip (the other side's cortex is just
    as right), a small rotation, scale and shift (+-6 degrees, +-10%, +-5% at strength 1), then
    brightness, contrast and gamma."""
    import cv2

    h, w = img.shape
    x, y = point
    if rng.random() < 0.5:
        img, x = img[:, ::-1], w - x
    angle = rng.uniform(-6.0, 6.0) * strength
    scale = math.exp(rng.uniform(-0.1, 0.1) * strength)
    m = cv2.getRotationMatrix2D((w / 2.0 - 0.5, h / 2.0 - 0.5), angle, scale)
    m[:, 2] += (rng.uniform(-0.05, 0.05) * strength * w, rng.uniform(-0.05, 0.05) * strength * h)
    img = cv2.warpAffine(np.ascontiguousarray(img), m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    px, py = m @ np.array([x - 0.5, y - 0.5, 1.0])  # cv2 puts pixel centres on integers
    out = img.astype(np.float32) / 255.0
    out = out * rng.uniform(0.75, 1.25) + rng.uniform(-0.1, 0.1)
    out = np.clip(out, 0.0, 1.0) ** math.exp(rng.uniform(-0.3, 0.3))
    return np.rint(out * 255.0).astype(np.uint8), (float(px) + 0.5, float(py) + 0.5), float(scale)


def negative(like: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An overview of the same size that holds no cortex, for training the localiser to answer
    "nowhere": a training overview cut into 8-pixel tiles and shuffled (radiograph texture and
    exposure without anatomy), a smooth random field, white noise, random shapes, or a flat
    frame.  Non-dental test images (src.localise.foreign) are never among them."""
    import cv2

    h, w = like.shape
    kind = rng.integers(5)
    if kind == 0:
        t = 8
        tiles = like[: h // t * t, : w // t * t].reshape(h // t, t, w // t, t).swapaxes(1, 2).reshape(-1, t, t)
        tiles = tiles[rng.permutation(len(tiles))].reshape(h // t, w // t, t, t).swapaxes(1, 2)
        out = np.full_like(like, int(np.median(like)))
        out[: h // t * t, : w // t * t] = tiles.reshape(h // t * t, w // t * t)
        return out
    if kind == 1:
        coarse = rng.random((max(2, h // 16), max(2, w // 16))).astype(np.float32)
        img = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    elif kind == 2:
        img = rng.random((h, w)).astype(np.float32)
    elif kind == 3:
        img = np.full((h, w), rng.uniform(0.1, 0.6), dtype=np.float32)
        for _ in range(rng.integers(3, 12)):
            colour = float(rng.uniform(0.0, 1.0))
            centre = (int(rng.integers(w)), int(rng.integers(h)))
            if rng.random() < 0.5:
                axes = (int(rng.integers(3, w // 3)), int(rng.integers(3, h // 3)))
                cv2.ellipse(img, centre, axes, float(rng.uniform(0, 180)), 0, 360, colour, -1)
            else:
                end = (int(rng.integers(w)), int(rng.integers(h)))
                cv2.line(img, centre, end, colour, int(rng.integers(1, 5)))
        img = cv2.GaussianBlur(img, (0, 0), float(rng.uniform(0.5, 2.0)))
    else:
        img = np.full((h, w), rng.uniform(0.0, 1.0), dtype=np.float32)
    return np.rint(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)
