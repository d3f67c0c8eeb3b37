"""The cortex centre as a heat-map peak: training targets, the loss, and decoding.

The network answers per cell of a 4x-downsampled map: the probability that a box centre lies
in the cell, the centre's position inside the cell, and the box size.  Both sides of the
mandible carry the cortex and an annotator draws one box: with horizontal flips in training the
network learns both, so decoding gives the best peak and the best peak on the other side.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

SIZE_WEIGHT = 0.1  # CenterNet's weight of the size loss against the heat-map's


@dataclass
class Targets:
    heat: torch.Tensor     # (N, 1, h, w): Gaussian around each centre cell, 1 at the cell
    cells: torch.Tensor    # (N, 2) long: the centre cell (y, x)
    offset: torch.Tensor   # (N, 2): centre - cell corner, in cells (x, y)
    log_size: torch.Tensor  # (N, 2): log box (w, h) in cells
    positive: torch.Tensor  # (N,) bool: the image holds a centre (negatives: no peak anywhere)


def make_targets(shape: tuple[int, int], centres: np.ndarray, sizes: np.ndarray, sigma: float) -> Targets:
    """Targets for centres and box sizes (N, 2 each: x, y / w, h) given in cell units; a NaN
    centre marks an image without a cortex (a negative: its map is zero everywhere)."""
    h, w = shape
    centres = np.asarray(centres, dtype=np.float32)
    positive = np.isfinite(centres).all(axis=1)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    heat = np.zeros((len(centres), 1, h, w), dtype=np.float32)
    cells = np.zeros((len(centres), 2), dtype=np.int64)
    for i, (cx, cy) in enumerate(centres):
        if not positive[i]:
            continue
        iy, ix = int(np.clip(np.floor(cy), 0, h - 1)), int(np.clip(np.floor(cx), 0, w - 1))
        g = np.exp(-((xs - ix) ** 2 + (ys - iy) ** 2) / (2.0 * sigma * sigma))
        g[iy, ix] = 1.0
        heat[i, 0], cells[i] = g, (iy, ix)
    offset = np.where(positive[:, None], centres - cells[:, ::-1], 0.0)
    log_size = np.log(np.clip(np.nan_to_num(np.asarray(sizes, dtype=np.float32), nan=1.0), 1e-3, None))
    return Targets(torch.from_numpy(heat), torch.from_numpy(cells), torch.from_numpy(offset.astype(np.float32)),
                   torch.from_numpy(log_size), torch.from_numpy(positive))


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 2.0, beta: float = 4.0) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss (Zhou et al. 2019), mean over the positives.

    Plain BCE on a map that is 99.9% background learns to answer "nowhere"; this weights the
    hard cells and forgives near-misses next to the peak by (1 - target)^beta."""
    p = torch.sigmoid(logits.float()).clamp(1e-6, 1 - 1e-6)
    pos = target.eq(1.0).float()
    pos_loss = -torch.log(p) * (1 - p) ** alpha * pos
    neg_loss = -torch.log(1 - p) * p ** alpha * (1 - target) ** beta * (1 - pos)
    return (pos_loss.sum() + neg_loss.sum()) / pos.sum().clamp(min=1.0)


def loss(output: torch.Tensor, t: Targets) -> torch.Tensor:
    """Heat-map focal loss + L1 of the offset and log size, read at each centre cell."""
    rows = torch.arange(len(t.cells))
    at = output[rows, :, t.cells[:, 0], t.cells[:, 1]].float()[t.positive]  # (P, 5)
    heat = focal_loss(output[:, :1], t.heat)
    if not len(at):
        return heat
    return (heat + F.l1_loss(at[:, 1:3], t.offset[t.positive])
            + SIZE_WEIGHT * F.l1_loss(at[:, 3:5], t.log_size[t.positive]))


@dataclass
class Peak:
    x: float           # centre, overview pixels
    y: float
    w: float           # box size, overview pixels
    h: float
    confidence: float  # the peak cell's probability


def decode(output: np.ndarray, stride: int) -> tuple[Peak, Peak]:
    """(best peak anywhere, best peak on the other half) from one (5, h, w) output whose channel
    0 holds probabilities (already through the sigmoid)."""
    prob = output[0]
    h, w = prob.shape
    iy, ix = np.unravel_index(int(np.argmax(prob)), prob.shape)
    other = prob.copy()
    if ix < w / 2:
        other[:, : (w + 1) // 2] = -1.0
    else:
        other[:, w // 2:] = -1.0
    jy, jx = np.unravel_index(int(np.argmax(other)), prob.shape)
    peaks = []
    for py, px in ((iy, ix), (jy, jx)):
        ox, oy, lw, lh = output[1:, py, px]
        peaks.append(Peak(x=(px + float(ox)) * stride, y=(py + float(oy)) * stride,
                          w=float(np.exp(lw)) * stride, h=float(np.exp(lh)) * stride, confidence=float(prob[py, px])))
    return peaks[0], peaks[1]
