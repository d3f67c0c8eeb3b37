"""Training-time augmentation of grey radiograph crops (albumentations 2.x).

Applied to the training part of a fold only; the inner validation part and the test
fold see the prepared images unchanged.  `train.augment.strength` is the one knob a
tuner turns: it scales every probability (capped at 1) and every magnitude, so 0 is
the identity and 1 the configured defaults.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from src.core.config import AugmentParams
from src.core.offline import offline_defaults

# Reflect instead of a black fill: black corners would be a shortcut the network could learn.
_BORDER = cv2.BORDER_REFLECT_101


@dataclass(frozen=True)
class AugmentRanges:
    """train.augment with its strength applied: each step's probability (scaled, capped at 1;
    0 = the step is left out) and its parameter ranges.  The one definition that the CPU path
    (albumentations, below) and the device path (src/data/device_augment.py) both draw from."""
    vflip: float
    hflip: float
    rotate_limit: float                       # degrees; the lab's rotation is always on when > 0
    affine: float
    scale: tuple[float, float]
    translate: float                          # share of the side, +-
    shear: float                              # degrees, +-
    brightness_contrast: float
    bc_limit: float                           # +- for contrast (1 + a) and brightness (of the maximum)
    gamma: float
    gamma_limit: tuple[float, float]          # percent, albumentations' unit (gamma = value / 100)
    clahe: float
    clip_limit: tuple[float, float]
    noise: float
    noise_std: tuple[float, float]            # of the maximum value
    blur: float
    blur_sigma: tuple[float, float]


def augment_ranges(cfg: AugmentParams) -> AugmentRanges:
    s = float(cfg.strength)

    def p(prob: float) -> float:
        return float(min(1.0, prob * s)) if prob > 0 else 0.0

    g = min(70.0, 20.0 * s)
    return AugmentRanges(
        vflip=p(cfg.vflip), hflip=p(cfg.hflip),
        rotate_limit=min(180.0, cfg.rotate_limit * s) if cfg.rotate_limit > 0 else 0.0,
        affine=p(cfg.affine), scale=(1.0 - 0.1 * s, 1.0 + 0.1 * s), translate=0.05 * s, shear=5.0 * s,
        brightness_contrast=p(cfg.brightness_contrast), bc_limit=min(0.9, 0.2 * s),
        gamma=p(cfg.gamma), gamma_limit=(100.0 - g, 100.0 + g),
        clahe=p(cfg.clahe), clip_limit=(1.0, 1.0 + 3.0 * s),
        noise=p(cfg.noise), noise_std=(0.01 * s, min(0.5, 0.05 * s)),
        blur=p(cfg.blur), blur_sigma=(0.1, 0.5 + 0.75 * s),
    )


def augmentation_on(cfg: AugmentParams) -> bool:
    return bool(cfg.enabled) and float(cfg.strength) > 0.0


def build_augment(cfg: AugmentParams, seed: int | None = None):
    """An albumentations Compose for (H, W) uint8 or float32-in-[0, 1] images, or None."""
    # Imported here, after offline_defaults: albumentations 2.0.8 checks PyPI when imported.
    offline_defaults()
    import albumentations as A

    # Per-image ops on 128-512 px gain nothing from OpenCV's thread pool, and its threads fight
    # torch's OpenMP workers (still spinning after each step) for the same cores.
    cv2.setNumThreads(1)

    if not augmentation_on(cfg):
        return None
    r = augment_ranges(cfg)
    steps = []
    if r.vflip > 0:
        steps.append(A.VerticalFlip(p=r.vflip))
    if r.hflip > 0:
        steps.append(A.HorizontalFlip(p=r.hflip))
    if r.rotate_limit > 0:
        steps.append(A.Rotate(limit=(-r.rotate_limit, r.rotate_limit), border_mode=_BORDER, p=1.0))
    if r.affine > 0:
        steps.append(A.Affine(scale=r.scale, translate_percent=(-r.translate, r.translate),
                              shear=(-r.shear, r.shear), border_mode=_BORDER, p=r.affine))
    if r.brightness_contrast > 0:
        steps.append(A.RandomBrightnessContrast(brightness_limit=r.bc_limit, contrast_limit=r.bc_limit,
                                                p=r.brightness_contrast))
    if r.gamma > 0:
        steps.append(A.RandomGamma(gamma_limit=r.gamma_limit, p=r.gamma))
    if r.clahe > 0:
        steps.append(A.CLAHE(clip_limit=r.clip_limit, tile_grid_size=(8, 8), p=r.clahe))
    if r.noise > 0:
        steps.append(A.GaussNoise(std_range=r.noise_std, p=r.noise))
    if r.blur > 0:
        steps.append(A.GaussianBlur(blur_limit=(3, 5), sigma_limit=r.blur_sigma, p=r.blur))
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
