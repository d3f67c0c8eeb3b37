"""Training one localiser and predicting centres with one or several (the fold ensemble)."""
from __future__ import annotations

import logging
import math
import time
from typing import Callable, Sequence

import numpy as np
import torch

from src.core.runtime import seed_everything, set_threads
from src.localise.heatmap import Peak, decode, make_targets
from src.localise.heatmap import loss as heatmap_loss
from src.localise.network import STRIDE, Localiser
from src.localise.overview import augment, negative, to_input
from src.model.schedules import warmup_cosine

log = logging.getLogger(__name__)
FLIP_TEST = True  # average each image's maps with its mirror's: +4 points of hits out of fold (bench_locate)


Batch = tuple[np.ndarray, np.ndarray, np.ndarray]  # views (B, h, w) uint8, centres and sizes (B, 2) in pixels


def train_localiser(overviews: np.ndarray, centres: np.ndarray, sizes: np.ndarray, cfg, seed: int,
                    label: str = "localiser", epoch_callback: Callable[[int, dict], None] | None = None) -> Localiser:
    """Train on `overviews` (N, h, w) uint8 with box centres and sizes (N, 2 each: x, y / w, h in
    overview pixels), with the locate section `cfg`: augmented views plus `cfg.negatives` images
    without a cortex per image."""
    def batch(idx: np.ndarray, rng: np.random.Generator) -> Batch:
        views = [augment(overviews[i], tuple(centres[i]), rng, cfg.augment) for i in idx]
        pts = np.array([v[1] for v in views], dtype=np.float32)
        box = sizes[idx] * np.array([v[2] for v in views], dtype=np.float32)[:, None]
        n_neg = int(rng.binomial(len(idx), cfg.negatives))
        if n_neg:
            views += [(negative(overviews[i], rng),) for i in rng.choice(idx, n_neg)]
            pts = np.concatenate([pts, np.full((n_neg, 2), np.nan, dtype=np.float32)])
            box = np.concatenate([box, np.full((n_neg, 2), np.nan, dtype=np.float32)])
        return np.stack([v[0] for v in views]), pts, box

    return train_heatmap(len(overviews), overviews.shape[1:], batch, cfg, cfg.epochs, seed, label, epoch_callback)


def epochs_for(epochs: int, n: int, cfg) -> int:
    """`epochs`, or more when n items in batches of cfg.batch_size give fewer than cfg.min_steps
    optimiser steps: the schedule needs steps, not passes.  On 52 training images (a 1024x512
    phantom of 104 images, 2 folds) 16 epochs are 64 steps and found 42% of the boxes on the
    annotated side, fewer than a fixed box (44%); 48 epochs found 95%."""
    steps_per_epoch = max(1, math.ceil(n / cfg.batch_size))
    return max(epochs, math.ceil(cfg.min_steps / steps_per_epoch))


def train_heatmap(n: int, shape: tuple[int, int], batch: Callable[[np.ndarray, np.random.Generator], Batch], cfg,
                  epochs: int, seed: int, label: str, epoch_callback: Callable[[int, dict], None] | None = None
                  ) -> Localiser:
    """The loop the localiser and its refiner share: `epochs` passes over n items in batches of
    cfg.batch_size, each turned into images of `shape` by `batch`; AdamW, one-epoch warm-up,
    cosine to 1%, the last epoch kept (there is no validation part to choose by, and a fixed
    schedule needs none)."""
    set_threads(cfg.threads)
    seed_everything(seed, False)
    rng = np.random.default_rng(seed)
    h, w = shape
    model = Localiser(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, math.ceil(n / cfg.batch_size))
    needed = epochs_for(epochs, n, cfg)
    if needed > epochs:
        log.info("%s: %d epochs instead of %d: %d images give %d steps per epoch (locate.min_steps %d)", label,
                 needed, epochs, n, steps_per_epoch, cfg.min_steps)
    epochs = needed
    sched = warmup_cosine(opt, steps_per_epoch, epochs * steps_per_epoch)
    for epoch in range(1, epochs + 1):
        model.train()
        started, losses = time.perf_counter(), []
        order = rng.permutation(n)
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            if len(idx) < 2:  # BatchNorm needs two images
                continue
            views, pts, box = batch(idx, rng)
            targets = make_targets((h // STRIDE, w // STRIDE), pts / STRIDE, box / STRIDE, cfg.sigma)
            loss = heatmap_loss(model(to_input(views)), targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        record = {"train_loss": float(np.mean(losses)) if losses else float("nan"),
                  "images_per_s": len(order) / max(time.perf_counter() - started, 1e-9)}
        log.info("%s epoch %d/%d: loss %.4f, %.1f img/s", label, epoch, epochs, record["train_loss"],
                 record["images_per_s"])
        if epoch_callback is not None:
            epoch_callback(epoch, record)
    return model.eval()


def _maps(model: Localiser, x: torch.Tensor, flipped: bool) -> torch.Tensor:
    """The model's maps of x (probabilities in channel 0); of the mirrored image mirrored back
    when `flipped`: a centre at offset ox in cell j of the mirror lies at 1 - ox in cell W-1-j."""
    y = model.eval()(torch.flip(x, dims=[3]) if flipped else x).float()
    y = torch.cat([torch.sigmoid(y[:, :1]), y[:, 1:]], dim=1)
    if flipped:
        y = torch.flip(y, dims=[3])
        y[:, 1] = 1.0 - y[:, 1]
    return y


@torch.no_grad()
def predict_maps(models: Sequence[Localiser], overviews: np.ndarray, batch_size: int = 16,
                 flip: bool = FLIP_TEST) -> np.ndarray:
    """(N, 5, h/4, w/4): centre probability, offset and log size, averaged over `models` (the fold
    ensemble when serving) and, with `flip`, over each image and its mirror."""
    out = []
    for start in range(0, len(overviews), batch_size):
        x = to_input(overviews[start:start + batch_size])
        maps = [_maps(m, x, flipped) for m in models for flipped in ((False, True) if flip else (False,))]
        out.append(torch.stack(maps).mean(0).numpy())
    h, w = overviews.shape[1:]
    return np.concatenate(out) if out else np.zeros((0, 5, h // STRIDE, w // STRIDE), dtype=np.float32)


def find_centres(models: Sequence[Localiser], overviews: np.ndarray, flip: bool = FLIP_TEST) -> list[tuple[Peak, Peak]]:
    """Per overview: (best peak, best peak on the other side), in overview pixels."""
    return [decode(m, STRIDE) for m in predict_maps(models, overviews, flip=flip)]
