"""Figures of heat maps: one panel strip per image and a contact sheet per class.

Matplotlib runs headless (Agg) and every PNG is written to a temporary name first.
"""
from __future__ import annotations

import textwrap
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


Box = tuple[float, float, float, float]  # x, y, w, h in the shown image's pixels


def draw_outline(ax, mask: np.ndarray | None = None, box: Box | None = None) -> None:
    """Where the answer should be: the ground-truth region's outline (phantom masks), else the
    annotated cortex box; white, thin, so that the heat map under it stays readable."""
    if mask is not None and np.asarray(mask).any():
        ax.contour(np.asarray(mask).astype(float), levels=[0.5], colors="white", linewidths=0.8)
    elif box is not None:
        from matplotlib.patches import Rectangle

        x, y, w, h = box
        ax.add_patch(Rectangle((x - 0.5, y - 0.5), w, h, fill=False, edgecolor="white", linewidth=0.8,
                               linestyle="--"))


def save_overlay(path: str | Path, image: np.ndarray, cam: np.ndarray, *, pred_class: str, prob: float,
                 true_class: str | None = None, alpha: float = 0.4, method: str = "gradcam",
                 mask: np.ndarray | None = None, box: Box | None = None, note: str | None = None) -> Path:
    """Image | heat map | overlay side by side, titled with the true class (if known), the
    predicted class and its probability; the ground-truth region's outline when a mask is
    given, else the cortex box when one is."""
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
    for ax in (axes[0], axes[2]):
        draw_outline(ax, mask, box)
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
    mask: np.ndarray | None = None
    box: Box | None = None


SHEET_PANEL = 2.4          # inches per panel (width = height)
SHEET_TITLE_PT = 10
SHEET_CAPTION_PT = 7


def _text_inches(lines: int, points: float) -> float:
    """Height of `lines` lines of text at `points`, with matplotlib's 1.2 line spacing."""
    return lines * points * 1.2 / 72.0


def _fit(line: str, inches: float, points: float) -> str:
    """`line` at most `inches` wide at `points`: broken at " | ", else shortened in the middle ("...")."""
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import TextToPath

    prop, measure = FontProperties(size=points), TextToPath()

    def wide(text: str) -> bool:
        return measure.get_text_width_height_descent(text, prop, ismath=False)[0] / 72.0 > inches

    if not wide(line):
        return line
    if " | " in line:  # "true C1 | predicted C3 (p=0.90)": two lines rather than a cut word
        return "\n".join(_fit(part, inches, points) for part in line.split(" | "))
    keep = len(line)
    while keep > 2:
        keep -= 1
        short = line[: keep // 2] + "..." + line[len(line) - (keep - keep // 2):]
        if not wide(short):
            return short
    return line[:1] + "..."


def save_contact_sheet(path: str | Path, items: Sequence[SheetItem], title: str, alpha: float = 0.4,
                       columns: int = SHEET_COLUMNS) -> Path:
    """`contact_sheet` written as a PNG."""
    fig = contact_sheet(items, title, alpha, columns)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    pyplot().close(fig)
    return path


def contact_sheet(items: Sequence[SheetItem], title: str, alpha: float = 0.4, columns: int = SHEET_COLUMNS):
    """A figure: a grid of overlays with a caption above each and the title above them all.

    The layout is set in inches: a band for the title, and above every row of panels a band
    as tall as the longest caption, so the title, the captions and the images never overlap
    (the title wraps; a caption line too wide for its panel breaks at " | " or is shortened in
    the middle).
    """
    plt = pyplot()
    n = max(len(items), 1)
    cols = min(columns, n)
    rows = -(-n // cols)
    width = cols * SHEET_PANEL
    title_lines = textwrap.wrap(title, max(20, int(width * 72.0 / (0.6 * SHEET_TITLE_PT)))) or [""]
    left, right, wspace = 0.02, 0.98, 0.08
    panel_w = (right - left) * width / (cols + (cols - 1) * wspace)  # what gridspec gives each axes
    captions = ["\n".join(_fit(line, panel_w, SHEET_CAPTION_PT) for line in item.label.split("\n"))
                for item in items]
    caption_h = _text_inches(max([c.count("\n") + 1 for c in captions] or [1]), SHEET_CAPTION_PT) + 0.08
    title_h = _text_inches(len(title_lines), SHEET_TITLE_PT) + 0.2
    margin = 0.08
    height = title_h + rows * (SHEET_PANEL + caption_h) + margin
    fig, axes = plt.subplots(rows, cols, figsize=(width, height), dpi=DPI, squeeze=False,
                             gridspec_kw=dict(left=left, right=right, bottom=margin / height,
                                              top=1 - (title_h + caption_h) / height,
                                              wspace=wspace, hspace=caption_h / SHEET_PANEL))
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, item, text in zip(axes.flat, items, captions):
        ax.imshow(overlay(item.image, item.cam, alpha))
        draw_outline(ax, item.mask, item.box)
        ax.set_title(text, fontsize=SHEET_CAPTION_PT, pad=3)
    fig.suptitle("\n".join(title_lines), fontsize=SHEET_TITLE_PT, y=1 - 0.1 / height, va="top")
    return fig
