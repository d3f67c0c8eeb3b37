"""Training-time augmentation of grey radiograph crops (albumentations 2.x).

Applied to the training part of a fold only; the inner validation part and the test
fold see the prepared images unchanged.  `train.augment.strength` is the one knob a
tuner turns: it scales every probability (capped at 1) and every magnitude, so 0 is
the identity and 1 the configured defaults.
"""
from __future__ import annotations

import cv2
import numpy as np

from src.core.config import AugmentParams
from src.core.offline import offline_defaults

# Reflect instead of a black fill: black corners would be a shortcut the network could learn.
_BORDER = cv2.BORDER_REFLECT_101


def build_augment(cfg: AugmentParams, seed: int | None = None):
    """An albumentations Compose for (H, W) uint8 or float32-in-[0, 1] images, or None."""
    # Imported here, after offline_defaults: albumentations 2.0.8 checks PyPI when imported.
    offline_defaults()
    import albumentations as A

    # Per-image ops on 128-512 px gain nothing from OpenCV's thread pool, and its threads fight
    # torch's OpenMP workers (still spinning after each step) for the same cores.
    cv2.setNumThreads(1)

    s = float(cfg.strength)
    if not cfg.enabled or s <= 0.0:
        return None

    def p(prob: float) -> float:
        return float(min(1.0, prob * s))

    steps = []
    if cfg.vflip > 0:
        steps.append(A.VerticalFlip(p=p(cfg.vflip)))
    if cfg.hflip > 0:
        steps.append(A.HorizontalFlip(p=p(cfg.hflip)))
    if cfg.rotate_limit > 0:
        # The lab's rotation: always on, its range scaled by strength.
        limit = min(180.0, cfg.rotate_limit * s)
        steps.append(A.Rotate(limit=(-limit, limit), border_mode=_BORDER, p=1.0))
    if cfg.affine > 0:
        steps.append(A.Affine(
            scale=(1.0 - 0.1 * s, 1.0 + 0.1 * s),
            translate_percent=(-0.05 * s, 0.05 * s),
            shear=(-5.0 * s, 5.0 * s),
            border_mode=_BORDER, p=p(cfg.affine),
        ))
    if cfg.brightness_contrast > 0:
        lim = min(0.9, 0.2 * s)
        steps.append(A.RandomBrightnessContrast(brightness_limit=lim, contrast_limit=lim, p=p(cfg.brightness_contrast)))
    if cfg.gamma > 0:
        g = min(70.0, 20.0 * s)
        steps.append(A.RandomGamma(gamma_limit=(100.0 - g, 100.0 + g), p=p(cfg.gamma)))
    if cfg.clahe > 0:
        steps.append(A.CLAHE(clip_limit=(1.0, 1.0 + 3.0 * s), tile_grid_size=(8, 8), p=p(cfg.clahe)))
    if cfg.noise > 0:
        steps.append(A.GaussNoise(std_range=(0.01 * s, min(0.5, 0.05 * s)), p=p(cfg.noise)))
    if cfg.blur > 0:
        steps.append(A.GaussianBlur(blur_limit=(3, 5), sigma_limit=(0.1, 0.5 + 0.75 * s), p=p(cfg.blur)))
    if not steps:
        return None
    return A.Compose(steps, seed=seed)


def to_augmentable(images: np.ndarray) -> np.ndarray:
    """albumentations handles uint8 and float32; a uint16 store goes through float32 in [0, 1]."""
    if images.dtype == np.uint16:
        return images.astype(np.float32) / 65535.0
    return images


def augment_batch(transform, images: np.ndarray) -> np.ndarray:
    """Apply `transform` to each (H, W) image of an (N, H, W) batch; returns a new array."""
    images = to_augmentable(np.asarray(images))
    if transform is None:
        return images
    out = np.empty_like(images)
    for i, img in enumerate(images):
        res = transform(image=np.ascontiguousarray(img))["image"]
        out[i] = res if res.ndim == 2 else res[..., 0]
    if out.dtype == np.float32:
        np.clip(out, 0.0, 1.0, out=out)
    return out
