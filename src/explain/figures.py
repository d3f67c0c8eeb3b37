"""Figures of heat maps: one panel strip per image and a contact sheet per class.

Matplotlib runs headless (Agg) and every PNG is written to a temporary name first.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from src.core.fileio import atomic_path
from src.core.plotting import pyplot

SHEET_COLUMNS = 5
PANEL_INCHES = 3.0
DPI = 100


def to_unit(image: np.ndarray) -> np.ndarray:
    """Stored uint8/uint16 or float image -> float32 in [0, 1] for display."""
    arr = np.asarray(image)
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / 65535.0
    return np.clip(arr.astype(np.float32), 0.0, 1.0)


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """RGB uint8 overlay; alpha is the heat map's weight (pytorch-grad-cam's show_cam_on_image)."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    grey = to_unit(image)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    return show_cam_on_image(rgb, np.clip(cam, 0, 1).astype(np.float32), use_rgb=True, image_weight=1.0 - alpha)


def caption(pred_class: str, prob: float, true_class: str | None = None) -> str:
    text = f"predicted {pred_class} (p={prob:.2f})"
    return f"true {true_class} | {text}" if true_class is not None else text


def save_overlay(path: str | Path, image: np.ndarray, cam: np.ndarray, *, pred_class: str, prob: float,
                 true_class: str | None = None, alpha: float = 0.4, method: str = "gradcam",
                 mask: np.ndarray | None = None, note: str | None = None) -> Path:
    """Image | heat map | overlay side by side, titled with the true class (if known), the
    predicted class and its probability; the ground-truth region's outline when a mask is given."""
    plt = pyplot()
    image = to_unit(image)
    # A fixed layout instead of tight_layout, which costs more than the CAM itself on a CPU.
    fig, axes = plt.subplots(1, 3, figsize=(3 * PANEL_INCHES, PANEL_INCHES + 0.6), dpi=DPI,
                             gridspec_kw=dict(left=0.01, right=0.96, bottom=0.02, top=0.80, wspace=0.12))
    axes[0].imshow(image, cmap="gray", vmin=0, vmax=1)
    axes[0].set_title("image")
    shown = axes[1].imshow(cam, cmap="jet", vmin=0, vmax=1)
    axes[1].set_title(f"heat map ({method})")
    fig.colorbar(shown, ax=axes[1], fraction=0.046, pad=0.04)
    axes[2].imshow(overlay(image, cam, alpha))
    axes[2].set_title("overlay")
    if mask is not None and np.asarray(mask).any():
        for ax in (axes[0], axes[2]):
            ax.contour(np.asarray(mask).astype(float), levels=[0.5], colors="white", linewidths=0.8)
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle(caption(pred_class, prob, true_class) + (f"\n{note}" if note else ""), fontsize=10)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


@dataclass
class SheetItem:
    image: np.ndarray
    cam: np.ndarray
    label: str


def save_contact_sheet(path: str | Path, items: Sequence[SheetItem], title: str, alpha: float = 0.4,
                       columns: int = SHEET_COLUMNS) -> Path:
    """A grid of overlays with one caption line each."""
    plt = pyplot()
    n = max(len(items), 1)
    cols = min(columns, n)
    rows = -(-n // cols)
    height = rows * 2.6 + 0.5
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.4, height), dpi=DPI, squeeze=False,
                             gridspec_kw=dict(left=0.02, right=0.98, bottom=0.01, top=1 - 0.5 / height,
                                              wspace=0.08, hspace=0.25))
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, item in zip(axes.flat, items):
        ax.imshow(overlay(item.image, item.cam, alpha))
        ax.set_title(item.label, fontsize=7)
    fig.suptitle(title, fontsize=10)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
