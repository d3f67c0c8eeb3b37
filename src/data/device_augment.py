"""Training augmentation on the device: the transforms and parameter ranges of
`src.data.augment` (albumentations, per image on the CPU), drawn per image and applied to a
whole (N, 1, H, W) batch of [0, 1] tensors where the batch already is - the GPU, so the CPU
only reads uint8 crops from the store.

Why plain torch rather than torchvision.transforms.v2 or kornia: v2's functional ops take one
parameter set per call (a batch would share one rotation), and kornia draws its parameters its
own way (fixed blur kernel size and noise level, other brightness and shear conventions).
Matching albumentations' distributions draw for draw needs its own sampler, and with that the
ops are a handful of batched torch calls: one affine_grid/grid_sample for flips, rotation and
the affine (one interpolation instead of two), broadcast arithmetic for brightness, contrast,
gamma and noise, a grouped convolution for per-image Gaussian blur, and a batched CLAHE.
tests/test_device_augment.py checks the draws and the outputs against albumentations.

The one difference that remains: the CPU path rounds to uint8 after every step, this one keeps
floats until the network.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from src.core.config import AugmentParams
from src.data.augment import augment_ranges, augmentation_on

CLAHE_GRID = 8   # tiles per side, as albumentations' CLAHE(tile_grid_size=(8, 8))
CLAHE_BINS = 256


@dataclass
class Draw:
    """One batch's augmentation parameters, one value per image (tensors of shape (N,))."""
    vflip: torch.Tensor
    hflip: torch.Tensor
    angle: torch.Tensor        # degrees, Rotate (always on when rotate_limit > 0)
    affine: torch.Tensor       # whether Affine applies
    scale_x: torch.Tensor
    scale_y: torch.Tensor
    shear_x: torch.Tensor      # degrees
    shear_y: torch.Tensor
    shift_x: torch.Tensor      # pixels, truncated to integers as albumentations does
    shift_y: torch.Tensor
    bc: torch.Tensor           # whether RandomBrightnessContrast applies
    alpha: torch.Tensor        # contrast factor
    beta: torch.Tensor         # brightness offset (of the maximum value 1.0)
    gamma_on: torch.Tensor
    gamma: torch.Tensor
    clahe: torch.Tensor
    clip_limit: torch.Tensor
    noise: torch.Tensor
    noise_std: torch.Tensor    # of the maximum value 1.0
    blur: torch.Tensor
    sigma: torch.Tensor
    ksize: torch.Tensor        # 3 or 5 (albumentations draws 3, 4 or 5 and makes 4 odd)

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class DeviceAugment:
    """`train.augment` for a batch of tensors; `None`-equivalent when augmentation is off
    (`build_device_augment` returns None then, like `build_augment`)."""

    def __init__(self, cfg: AugmentParams):
        self.cfg, self.r = cfg, augment_ranges(cfg)

    # ------------------------------------------------------------------ drawing
    def sample(self, n: int, size: tuple[int, int], generator: torch.Generator | None = None,
               device: torch.device | str = "cpu") -> Draw:
        """Parameters for n images of `size` (H, W), on `device`, from `generator` (on that device)."""
        device = torch.device(device)

        def u(lo: float, hi: float) -> torch.Tensor:
            return lo + (hi - lo) * torch.rand(n, generator=generator, device=device)

        def coin(prob: float) -> torch.Tensor:
            return torch.rand(n, generator=generator, device=device) < prob

        height, width = size
        r = self.r
        ksize = torch.randint(3, 6, (n,), generator=generator, device=device)
        return Draw(
            vflip=coin(r.vflip), hflip=coin(r.hflip),
            angle=u(-r.rotate_limit, r.rotate_limit),
            affine=coin(r.affine),
            scale_x=u(*r.scale), scale_y=u(*r.scale),
            shear_x=u(-r.shear, r.shear), shear_y=u(-r.shear, r.shear),
            shift_x=torch.trunc(u(-r.translate, r.translate) * width),
            shift_y=torch.trunc(u(-r.translate, r.translate) * height),
            bc=coin(r.brightness_contrast), alpha=1.0 + u(-r.bc_limit, r.bc_limit), beta=u(-r.bc_limit, r.bc_limit),
            gamma_on=coin(r.gamma), gamma=u(*r.gamma_limit) / 100.0,
            clahe=coin(r.clahe), clip_limit=u(*r.clip_limit),
            noise=coin(r.noise), noise_std=u(*r.noise_std),
            blur=coin(r.blur), sigma=u(*r.blur_sigma), ksize=ksize + (ksize % 2 == 0).long(),
        )

    # ------------------------------------------------------------------ applying
    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(N, 1, H, W) float in [0, 1] -> augmented, same shape, float32 in [0, 1]."""
        draw = self.sample(x.shape[0], tuple(x.shape[-2:]), generator, x.device)
        return self.apply(x, draw, generator)

    def apply(self, x: torch.Tensor, draw: Draw, generator: torch.Generator | None = None) -> torch.Tensor:
        x = x.float()
        x = geometric(x, draw)
        on = draw.bc.view(-1, 1, 1, 1)
        x = torch.where(on, (x * draw.alpha.view(-1, 1, 1, 1) + draw.beta.view(-1, 1, 1, 1)).clamp(0, 1), x)
        on = draw.gamma_on.view(-1, 1, 1, 1)
        x = torch.where(on, x.clamp_min(0).pow(draw.gamma.view(-1, 1, 1, 1)), x)
        if bool(draw.clahe.any()):  # one host sync, and only when CLAHE is configured at all
            rows = draw.clahe.nonzero().flatten()
            x = x.index_copy(0, rows, clahe(x[rows], draw.clip_limit[rows]))
        noise = torch.randn(x.shape, generator=generator, device=x.device) * draw.noise_std.view(-1, 1, 1, 1)
        x = torch.where(draw.noise.view(-1, 1, 1, 1), (x + noise).clamp(0, 1), x)
        x = torch.where(draw.blur.view(-1, 1, 1, 1), gaussian_blur(x, draw.sigma, draw.ksize), x)
        return x.clamp(0, 1)


def build_device_augment(cfg: AugmentParams) -> DeviceAugment | None:
    return DeviceAugment(cfg) if augmentation_on(cfg) else None


# ---------------------------------------------------------------------- the pieces
def _eye(n: int, device) -> torch.Tensor:
    return torch.eye(3, device=device).expand(n, 3, 3).clone()


def _about_centre(m: torch.Tensor, height: int, width: int) -> torch.Tensor:
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    to_centre, back = _eye(m.shape[0], m.device), _eye(m.shape[0], m.device)
    to_centre[:, 0, 2], to_centre[:, 1, 2] = -cx, -cy
    back[:, 0, 2], back[:, 1, 2] = cx, cy
    return back @ m @ to_centre


def flip_rotate_matrices(draw: Draw, height: int, width: int) -> torch.Tensor:
    """Forward (source -> output) pixel-coordinate matrices (N, 3, 3) of the flips and Rotate."""
    n, device = draw.angle.shape[0], draw.angle.device
    flip = _eye(n, device)
    flip[:, 0, 0] = torch.where(draw.hflip, -1.0, 1.0)
    flip[:, 1, 1] = torch.where(draw.vflip, -1.0, 1.0)
    a = torch.deg2rad(draw.angle)
    rot = _eye(n, device)
    rot[:, 0, 0], rot[:, 0, 1], rot[:, 1, 0], rot[:, 1, 1] = torch.cos(a), torch.sin(a), -torch.sin(a), torch.cos(a)
    return _about_centre(rot @ flip, height, width)


def affine_matrices(draw: Draw, height: int, width: int) -> torch.Tensor:
    """Forward matrices of Affine: about the centre, scale, then shear, then shift (albumentations'
    create_affine_transformation_matrix with no rotation); the identity where it does not apply."""
    n, device = draw.angle.shape[0], draw.angle.device
    on = draw.affine
    scale, shear, shift = _eye(n, device), _eye(n, device), _eye(n, device)
    scale[:, 0, 0] = torch.where(on, draw.scale_x, 1.0)
    scale[:, 1, 1] = torch.where(on, draw.scale_y, 1.0)
    shear[:, 0, 1] = torch.where(on, torch.tan(torch.deg2rad(-draw.shear_x)), 0.0)
    shear[:, 1, 0] = torch.where(on, torch.tan(torch.deg2rad(-draw.shear_y)), 0.0)
    shift[:, 0, 2] = torch.where(on, draw.shift_x, 0.0)
    shift[:, 1, 2] = torch.where(on, draw.shift_y, 0.0)
    return _about_centre(shift @ shear @ scale, height, width)


def warp(x: torch.Tensor, forward: torch.Tensor) -> torch.Tensor:
    """Bilinear resampling of (N, C, H, W) by forward pixel matrices, the border reflected about
    the edge pixels (OpenCV's BORDER_REFLECT_101, albumentations' border here): the image is
    padded that way by a quarter of its size, beyond which grid_sample reflects again."""
    n, c, height, width = x.shape
    pad_h, pad_w = min(height - 1, -(-height // 4)), min(width - 1, -(-width // 4))
    padded = F.pad(x, (pad_w, pad_w, pad_h, pad_h), mode="reflect")
    ys, xs = torch.meshgrid(torch.arange(height, device=x.device, dtype=torch.float32),
                            torch.arange(width, device=x.device, dtype=torch.float32), indexing="ij")
    points = torch.stack([xs, ys, torch.ones_like(xs)], dim=-1).view(1, -1, 3)
    source = points @ torch.linalg.inv(forward).transpose(1, 2)  # (N, H*W, 3): where each output pixel comes from
    u = (2 * (source[..., 0] + pad_w) + 1) / padded.shape[-1] - 1
    v = (2 * (source[..., 1] + pad_h) + 1) / padded.shape[-2] - 1
    grid = torch.stack([u, v], dim=-1).view(n, height, width, 2)
    return F.grid_sample(padded, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def geometric(x: torch.Tensor, draw: Draw) -> torch.Tensor:
    """Flips and rotation in one resampling, the affine in a second one where it applies:
    albumentations resamples after Rotate and again after Affine, and the two smoothings show
    in the outputs' gradients."""
    height, width = x.shape[-2:]
    x = warp(x, flip_rotate_matrices(draw, height, width))
    if bool(draw.affine.any()):
        x = torch.where(draw.affine.view(-1, 1, 1, 1), warp(x, affine_matrices(draw, height, width)), x)
    return x


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, ksize: torch.Tensor) -> torch.Tensor:
    """Per-image separable Gaussian blur (kernel size 3 or 5, reflect border) as one grouped conv:
    every image's kernel padded to the largest size with zeros."""
    n, c, height, width = x.shape
    size = 5
    offsets = torch.arange(size, device=x.device, dtype=x.dtype) - size // 2
    half = (ksize.to(x.dtype) - 1).view(-1, 1) / 2
    kernel = torch.exp(-0.5 * (offsets.view(1, -1) / sigma.view(-1, 1).clamp_min(1e-3)) ** 2)
    kernel = torch.where(offsets.abs().view(1, -1) <= half, kernel, torch.zeros_like(kernel))
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    flat = F.pad(x.reshape(1, n * c, height, width), (size // 2,) * 4, mode="reflect")
    weight = kernel.repeat_interleave(c, dim=0)
    flat = F.conv2d(flat, weight.view(n * c, 1, 1, size), groups=n * c)
    flat = F.conv2d(flat, weight.view(n * c, 1, size, 1), groups=n * c)
    return flat.view(n, c, height, width)


def clahe(x: torch.Tensor, clip_limit: torch.Tensor) -> torch.Tensor:
    """Contrast-limited adaptive histogram equalisation per image (OpenCV's algorithm on 8-bit
    levels: an 8x8 grid of tiles, each tile's histogram clipped at clip_limit x its mean bin
    count with the excess spread evenly, the tiles' mappings interpolated bilinearly)."""
    n, c, height, width = x.shape
    g = CLAHE_GRID
    # OpenCV pads the image to a multiple of the grid (reflect-101) before tiling
    ph, pw = (-height) % g, (-width) % g
    levels = (x.clamp(0, 1) * (CLAHE_BINS - 1)).round().long()
    padded = F.pad(levels.float(), (0, pw, 0, ph), mode="reflect").long() if (ph or pw) else levels
    th, tw = padded.shape[-2] // g, padded.shape[-1] // g
    tiles = padded.view(n * c, g, th, g, tw).permute(0, 1, 3, 2, 4).reshape(n * c, g * g, th * tw)
    hist = torch.zeros(n * c, g * g, CLAHE_BINS, device=x.device)
    hist.scatter_add_(2, tiles, torch.ones_like(tiles, dtype=hist.dtype))
    area = th * tw
    limit = (clip_limit.repeat_interleave(c).view(-1, 1, 1) * area / CLAHE_BINS).clamp_min(1.0).floor()
    excess = (hist - limit).clamp_min(0).sum(dim=2, keepdim=True)
    batch_add = torch.floor(excess / CLAHE_BINS)
    hist = hist.clamp_max(limit) + batch_add
    # OpenCV spreads the rest one count per bin, every (bins // rest)-th bin from the first
    residual = excess - batch_add * CLAHE_BINS
    step = torch.floor(CLAHE_BINS / residual.clamp_min(1)).clamp_min(1)
    bins = torch.arange(CLAHE_BINS, device=x.device, dtype=hist.dtype).view(1, 1, -1)
    hist = hist + ((torch.remainder(bins, step) == 0) & (torch.floor(bins / step) < residual)).to(hist.dtype)
    lut = (hist.cumsum(dim=2) * ((CLAHE_BINS - 1) / area)).clamp(0, CLAHE_BINS - 1).round() / (CLAHE_BINS - 1)
    lut = lut.view(n * c, g, g, CLAHE_BINS)
    # each pixel between the centres of its four nearest tiles
    # (OpenCV: tile coordinate x / tile width - 0.5, neighbours clamped to the grid)
    ys = torch.arange(height, device=x.device, dtype=torch.float32) / th - 0.5
    xs = torch.arange(width, device=x.device, dtype=torch.float32) / tw - 0.5
    fy, fx = ys.floor(), xs.floor()
    wy, wx = (ys - fy).view(1, -1, 1), (xs - fx).view(1, 1, -1)
    y0, y1 = fy.clamp(0, g - 1).long(), (fy + 1).clamp(0, g - 1).long()
    x0, x1 = fx.clamp(0, g - 1).long(), (fx + 1).clamp(0, g - 1).long()
    flat_levels = levels.view(n * c, height, width)
    batch = torch.arange(n * c, device=x.device).view(-1, 1, 1)

    def look(yy: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
        return lut[batch, yy.view(1, -1, 1), xx.view(1, 1, -1), flat_levels]

    top = look(y0, x0) * (1 - wx) + look(y0, x1) * wx
    bottom = look(y1, x0) * (1 - wx) + look(y1, x1) * wx
    return (top * (1 - wy) + bottom * wy).view(n, c, height, width).to(x.dtype)
