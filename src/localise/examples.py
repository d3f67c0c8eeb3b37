"""The locate stage's picture: held-out overviews with the annotated box (green, dotted on the
other side of the mandible, which is scored as just as right) and the box the localiser found
(orange; dashed when below locate.min_confidence): the worst cases by
centre error first, then random ones, so a reader sees both how it fails and how it usually does."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from src.artifacts.store import PreparedStore
from src.core.fileio import atomic_path
from src.core.plotting import pyplot

WORST, RANDOM, COLUMNS = 6, 6, 4


def _rect(ax, box, scale, **style) -> None:
    from matplotlib.patches import Rectangle

    x, y, w, h = box
    sx, sy = scale
    ax.add_patch(Rectangle((x * sx, y * sy), w * sx, h * sy, fill=False, linewidth=1.2, **style))


def plot_examples(path: Path, store: PreparedStore, table: pd.DataFrame | None, data) -> Path:
    plt = pyplot()
    if table is None or not len(table):
        fig, ax = plt.subplots(figsize=(4, 1))
        ax.axis("off")
        ax.text(0.5, 0.5, f"locate skipped: {store.meta.get('mode')}-mode store", ha="center", va="center")
    else:
        worst = table.sort_values("centre_error_px", ascending=False).index[:WORST].tolist()
        rest = [i for i in table.index if i not in worst]
        rng = np.random.default_rng(0)
        picked = worst + rng.choice(rest, size=min(RANDOM, len(rest)), replace=False).tolist()
        rows = int(np.ceil(len(picked) / COLUMNS))
        fig, axes = plt.subplots(rows, COLUMNS, figsize=(COLUMNS * 3.2, rows * 2.2), squeeze=False)
        scale_all = data.scale()
        for ax, i in zip(axes.flat, picked):
            rec = table.loc[i]
            ax.imshow(data.overviews[i], cmap="gray", vmin=0, vmax=255)
            scale = tuple(scale_all[i])
            _rect(ax, (rec.box_x, rec.box_y, rec.box_w, rec.box_h), scale, edgecolor="lime")
            _rect(ax, (rec.mirror_x, rec.mirror_y, rec.mirror_w, rec.mirror_h), scale, edgecolor="lime",
                  linestyle=":")
            _rect(ax, (rec.found_x, rec.found_y, rec.found_w, rec.found_h), scale, edgecolor="orange",
                  linestyle="-" if rec.found else "--")
            kind = "worst" if i in worst else "random"
            ax.set_title(f"{kind}: {Path(rec.file).name[:22]}\nIoU {rec.iou:.2f}, conf {rec.confidence:.2f}, "
                         f"{rec.side} side", fontsize=7)
            ax.axis("off")
        for ax in list(axes.flat)[len(picked):]:
            ax.axis("off")
        fig.suptitle("held-out boxes: annotated (green; dotted: the same box on the other side), "
                     "found (orange; dashed: below min_confidence)", fontsize=9)
        fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
