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
    differs between machines far more than anatomy does)."""
    import torch

    x = torch.from_numpy(np.asarray(batch, dtype=np.float32) / 255.0).unsqueeze(1)
    mean = x.mean(dim=(2, 3), keepdim=True)
    std = x.std(dim=(2, 3), keepdim=True).clamp(min=1e-3)
    return (x - mean) / std


def augment(img: np.ndarray, point: tuple[float, float], rng: np.random.Generator
            ) -> tuple[np.ndarray, tuple[float, float], float]:
    """One random view of an overview, its centre (x, y in pixels, pixel i spanning [i, i+1))
    and the scale applied (boxes grow with it): horizontal flip (the other side's cortex is just
    as right), a small rotation, scale and shift, then brightness, contrast and gamma."""
    import cv2

    h, w = img.shape
    x, y = point
    if rng.random() < 0.5:
        img, x = img[:, ::-1], w - x
    angle = rng.uniform(-6.0, 6.0)
    scale = rng.uniform(0.9, 1.1)
    m = cv2.getRotationMatrix2D((w / 2.0 - 0.5, h / 2.0 - 0.5), angle, scale)
    m[:, 2] += (rng.uniform(-0.05, 0.05) * w, rng.uniform(-0.05, 0.05) * h)
    img = cv2.warpAffine(np.ascontiguousarray(img), m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    px, py = m @ np.array([x - 0.5, y - 0.5, 1.0])  # cv2 puts pixel centres on integers
    out = img.astype(np.float32) / 255.0
    out = out * rng.uniform(0.75, 1.25) + rng.uniform(-0.1, 0.1)
    out = np.clip(out, 0.0, 1.0) ** math.exp(rng.uniform(-0.3, 0.3))
    return np.rint(out * 255.0).astype(np.uint8), (float(px) + 0.5, float(py) + 0.5), float(scale)
