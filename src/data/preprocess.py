"""The training-time transform of ONE decoded radiograph, shared by prepare and inference.

`preprocess_image` is the single definition of what the model sees: prepare stores its
output, and the model server calls it with the store's meta["preprocessing"] so a raw
upload is turned into exactly the array the folds were trained on.

Order: rolling-ball background subtraction -> CLAHE (both on the whole source image, so
their neighbourhoods do not depend on the crop) -> full-image resize, or a square crop
centred on the box then resize -> conversion to the stored dtype.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from pydantic import BaseModel, ValidationError

from src.core.config import PrepareParams
from src.core.errors import DataError

Box = tuple[float, float, float, float]  # x, y, w, h in source pixels (COCO order)
_DTYPES = {"uint8": np.uint8, "uint16": np.uint16}
# Grey levels the rolling ball works in: ImageJ's "Subtract Background" on 8-bit images,
# the tool the lab's "RB" datasets come from.  The ball's radius is in pixels, its height
# in these units, so the same radius means the same thing on 8- and 16-bit sources.
RB_GREY_LEVELS = 255.0
CROP_PADDING = "edge"  # replicate border pixels: reflection would mirror the cortex into a fake second one


def preprocess_image(
    img: np.ndarray, prep: Mapping[str, Any] | BaseModel, box: Box | None
) -> tuple[np.ndarray, dict[str, Any]]:
    """Grey float image (H, W) in [0, 1] -> (stored array, geometry info).

    `prep` is the prepare section as a dict (the store's meta["preprocessing"]).  info has
    src_height, src_width, size [h, w] and crop_x0, crop_y0, crop_side (None in full mode).
    """
    p = _settings(prep)
    img = np.asarray(img, dtype=np.float32)
    if img.ndim != 2:
        raise DataError(f"preprocess: expected a grey (H, W) image, got shape {img.shape}")
    src_h, src_w = img.shape
    img = intensity_steps(img, p)
    info: dict[str, Any] = {"src_height": src_h, "src_width": src_w,
                            "crop_x0": None, "crop_y0": None, "crop_side": None}
    if p.mode == "full":
        size = full_size((src_h, src_w), p.full.downscale, p.full.size, p.full.long_side)
        out = resize(img, size)
    else:
        if box is None:
            raise DataError("crop mode needs a box (x, y, w, h) for every image; none was given")
        out, (x0, y0, side) = crop_around(img, p, box)
        info.update(crop_x0=x0, crop_y0=y0, crop_side=side)
    info["size"] = [int(out.shape[0]), int(out.shape[1])]
    return to_dtype(out, p.dtype), info


def intensity_steps(img: np.ndarray, p) -> np.ndarray:
    """Rolling ball, then CLAHE, on the whole source image (as configured)."""
    if p.rolling_ball.enabled:
        img = subtract_background(img, p.rolling_ball.radius, p.rolling_ball.shrink)
    if p.clahe.enabled:
        img = apply_clahe(img, p.clahe.clip_limit, p.clahe.tile_grid)
    return img


def preprocess_crops(img: np.ndarray, prep: Mapping[str, Any] | BaseModel, boxes: list[Box]) -> list[np.ndarray]:
    """The crop-mode arrays of several boxes on one radiograph (both sides of the mandible):
    what `preprocess_image` gives for each box, with the whole-image steps done once."""
    p = _settings(prep)
    if p.mode != "crop":
        raise DataError(f"preprocess: crops need prepare.mode crop, the settings say {p.mode!r}")
    img = np.asarray(img, dtype=np.float32)
    if img.ndim != 2:
        raise DataError(f"preprocess: expected a grey (H, W) image, got shape {img.shape}")
    img = intensity_steps(img, p)
    return [to_dtype(crop_around(img, p, box)[0], p.dtype) for box in boxes]


def crop_around(img: np.ndarray, p, box: Box) -> tuple[np.ndarray, tuple[int, int, int]]:
    """(the square crop around the box centre at prepare.crop.size, its (x0, y0, side))."""
    x0, y0, side = crop_geometry(img.shape, box, p.crop.side, p.crop.reference_width)
    return resize(square_crop(img, x0, y0, side), (p.crop.size, p.crop.size)), (x0, y0, side)


def _settings(prep):
    """The prepare settings from any of the dicts that carry them: the prepare section
    itself, a store's meta.json, or a checkpoint meta's copy of it (both nest the section
    under "preprocessing")."""
    if isinstance(prep, PrepareParams):
        return prep
    prep = dict(prep)
    while isinstance(prep.get("preprocessing"), Mapping):
        prep = dict(prep["preprocessing"])
    try:
        return PrepareParams.model_validate(prep)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(x) for x in first["loc"])
        raise DataError(f"preprocessing settings: {key}: {first['msg']}") from None


# ------------------------------------------------------------------ geometry
def full_size(src_hw: tuple[int, int], downscale: float | None, size: tuple[int, int] | list | None,
              long_side: int | None = None) -> tuple[int, int]:
    """Output (h, w) of full mode: a fixed size, else the downscale factor, else the long side
    with `src_hw`'s aspect ratio (prepare passes the median source shape)."""
    if size is not None:
        return int(size[0]), int(size[1])
    h, w = src_hw
    if downscale:
        return max(1, int(round(h / downscale))), max(1, int(round(w / downscale)))
    if not long_side:
        raise DataError("prepare.full: set long_side, downscale or size [height, width]")
    if w >= h:
        return max(1, int(round(long_side * h / w))), int(long_side)
    return int(long_side), max(1, int(round(long_side * w / h)))


def crop_side(src_width: int, side: int, reference_width: int | None) -> int:
    """Crop side in source pixels, scaled by resolution when a reference width is given."""
    scaled = side * (src_width / reference_width) if reference_width else side
    return max(1, int(round(scaled)))


def crop_geometry(
    src_hw: tuple[int, int], box: Box, side: int, reference_width: int | None
) -> tuple[int, int, int]:
    """(x0, y0, side) of the square whose centre is the box centre (never shifted inward)."""
    h, w = src_hw
    bx, by, bw, bh = (float(v) for v in box)
    if not (bw > 0 and bh > 0) or not all(np.isfinite([bx, by, bw, bh])):
        raise DataError(f"box {tuple(box)}: width and height must be positive numbers")
    cx, cy = bx + bw / 2.0, by + bh / 2.0
    if not (0 <= cx < w and 0 <= cy < h):
        raise DataError(f"box {tuple(box)}: centre ({cx:.0f}, {cy:.0f}) lies outside the {w}x{h} image")
    s = crop_side(w, side, reference_width)
    return int(round(cx - s / 2.0)), int(round(cy - s / 2.0)), s


def square_crop(img: np.ndarray, x0: int, y0: int, side: int) -> np.ndarray:
    """img[y0:y0+side, x0:x0+side], padded by edge replication where it leaves the image."""
    h, w = img.shape
    ys, ye = max(y0, 0), min(y0 + side, h)
    xs, xe = max(x0, 0), min(x0 + side, w)
    if ys >= ye or xs >= xe:
        raise DataError(f"crop at ({x0}, {y0}) side {side} does not overlap the {w}x{h} image")
    patch = img[ys:ye, xs:xe]
    pad = ((ys - y0, y0 + side - ye), (xs - x0, x0 + side - xe))
    if any(any(p) for p in pad):
        patch = np.pad(patch, pad, mode=CROP_PADDING)
    return patch


def resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize to (h, w): area averaging when shrinking (no aliasing of the trabecular
    texture), bilinear when enlarging."""
    import cv2

    h, w = int(size[0]), int(size[1])
    if img.shape == (h, w):
        return img
    shrinking = h < img.shape[0] or w < img.shape[1]
    interp = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(img, (w, h), interpolation=interp)


def to_dtype(img: np.ndarray, dtype: str) -> np.ndarray:
    """[0, 1] float -> the stored integer type, rounding to the nearest level."""
    if dtype not in _DTYPES:
        raise DataError(f"prepare.dtype: {dtype!r} is not one of {sorted(_DTYPES)}")
    kind = _DTYPES[dtype]
    top = float(np.iinfo(kind).max)
    return np.rint(np.clip(img, 0.0, 1.0) * top).astype(kind)


# ------------------------------------------------------------ intensity steps
def auto_shrink(radius: float) -> int:
    """ImageJ's shrink factor for its rolling ball (RollingBall: 1/2/4/8 by radius)."""
    if radius <= 10:
        return 1
    if radius <= 30:
        return 2
    if radius <= 100:
        return 4
    return 8


def rolling_ball_background(img: np.ndarray, radius: float, shrink: int | None = None) -> np.ndarray:
    """Background under a ball of `radius` pixels rolled below the image, in img's units.

    The exact computation costs O(pixels * radius^2): seconds per radiograph at radius 50.
    Like ImageJ we roll on a copy shrunk by block minima (the background is a lower
    envelope, so the minimum keeps the ball below every pixel) and enlarge the result
    bilinearly.  Unlike ImageJ we also divide the intensities by the shrink factor, so the
    shrunken ball is the same sphere scaled on all three axes.  shrink=1 is exact;
    benchmarks/bench_prepare.py measures speed and deviation of the default.
    """
    import cv2

    s = auto_shrink(radius) if shrink is None else int(shrink)
    grey = img.astype(np.float32) * RB_GREY_LEVELS
    if s <= 1:
        return ball_background(grey, radius) / RB_GREY_LEVELS
    h, w = grey.shape
    ph, pw = -h % s, -w % s
    padded = np.pad(grey, ((0, ph), (0, pw)), mode="edge") if ph or pw else grey
    # Block minima: an s x s erosion anchored at the block's top-left corner, sampled every s pixels.
    small = cv2.erode(padded, np.ones((s, s), np.uint8), anchor=(0, 0))[::s, ::s]
    bg_small = ball_background(small / s, radius / s) * s
    bg = cv2.resize(bg_small.astype(np.float32), (padded.shape[1], padded.shape[0]), interpolation=cv2.INTER_LINEAR)
    # Interpolation can rise above a thin dark line; the background never exceeds the image.
    return np.minimum(bg[:h, :w], grey) / RB_GREY_LEVELS


def ball_background(img: np.ndarray, radius: float) -> np.ndarray:
    """skimage.restoration.rolling_ball(img, radius=radius), bit for bit, about 3x faster.

    skimage visits the ball's offsets pixel by pixel; here each offset is one vectorised
    min over the whole (shifted) image, which is what the benchmark's speed comes from.
    """
    from skimage.restoration import ball_kernel

    kernel = ball_kernel(radius, 2).astype(np.float32)
    cy, cx = (n // 2 for n in kernel.shape)
    lift = kernel[cy, cx] - kernel  # how far below its apex the ball surface is at each offset
    h, w = img.shape
    padded = np.pad(img.astype(np.float32), ((cy, cy), (cx, cx)), constant_values=np.inf)
    out = np.full((h, w), np.inf, dtype=np.float32)
    scratch = np.empty_like(out)
    for dy, dx in np.argwhere(np.isfinite(kernel)):
        np.add(padded[dy:dy + h, dx:dx + w], lift[dy, dx], out=scratch)
        np.minimum(out, scratch, out=out)
    return out


def subtract_background(img: np.ndarray, radius: float, shrink: int | None = None) -> np.ndarray:
    return np.clip(img - rolling_ball_background(img, radius, shrink), 0.0, 1.0).astype(np.float32)


def apply_clahe(img: np.ndarray, clip_limit: float, tile_grid: int) -> np.ndarray:
    """OpenCV CLAHE on 8-bit levels.

    OpenCV's 16-bit CLAHE spreads each tile over 65536 bins, which changes what
    clip_limit means; the 8-bit version is the one the usual clip limits (2-4) are
    tuned for.  The output therefore has 256 levels even in a uint16 store.
    """
    import cv2

    u8 = np.rint(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)
    clahe = cv2.createCLAHE(clipLimit=float(clip_limit), tileGridSize=(int(tile_grid), int(tile_grid)))
    return clahe.apply(u8).astype(np.float32) / 255.0
