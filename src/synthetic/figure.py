"""The C1/C3 example figure of the phantom (docs/figures/phantom_examples.png)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from src.core.config import PhantomParams
from src.core.fileio import atomic_path
from src.core.plotting import pyplot
from src.synthetic.anatomy import acquire, draw_anatomy
from src.synthetic.generator import field_of, plan
from src.synthetic.measurement import cortex_profile


def make_figure(p: PhantomParams, path: str | Path) -> Path:
    """C1 and C3 examples side by side with their cortex zoomed in (the lab's 60 mm square)."""
    plt = pyplot()
    f = field_of(p)
    planned = plan(p.model_copy(update={"followup_fraction": 0.0}))
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.2), gridspec_kw={"height_ratios": [1, 1.25]})
    for col, cls in enumerate(p.classes):
        group = [im for im in planned if im.cls == cls]
        median = float(np.median([im.patient.severity for im in group]))
        im = min(group, key=lambda g: abs(g.patient.severity - median))  # a typical member of the class
        rad = acquire(draw_anatomy(im.patient, f), im.acquisition, f)
        meas = cortex_profile(rad.image, rad.box, f.mm_per_px)
        x, y, w, h = rad.box
        ax = axes[0, col]
        ax.imshow(rad.image, cmap="gray", vmin=0, vmax=1)
        ax.add_patch(plt.Rectangle((x, y), w, h, fill=False, color="lime", lw=1.2))
        ax.contour(rad.mask, levels=[0.5], colors="red", linewidths=0.6)
        kind = "healthy" if col == 0 else "osteoporotic"
        ax.set_title(f"{cls} ({kind}) {im.file}: box (green), cortex mask (red)", fontsize=9)
        ax.axis("off")
        side = int(round(60.0 / f.mm_per_px))
        cx, cy = x + w / 2, y + h / 2
        x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
        crop = np.pad(rad.image, side, mode="edge")[y0 + side:y0 + 2 * side, x0 + side:x0 + 2 * side]
        ax = axes[1, col]
        ax.imshow(crop, cmap="gray", vmin=0, vmax=1, extent=(0, 60, 60, 0))
        ticks = (np.arange(side) + 0.5) * (60.0 / side)
        zoom_mask = np.pad(rad.mask, side)[y0 + side:y0 + 2 * side, x0 + side:x0 + 2 * side]
        ax.contour(ticks, ticks, zoom_mask.astype(np.float32), levels=[0.5], colors="red", linewidths=0.6)
        ax.set_title(f"60 mm around the box: cortex drawn {im.patient.cortex_mm:.1f} mm, "
                     f"measured from the image {meas.width_mm:.1f} mm", fontsize=9)
        ax.set_xlabel("mm")
    fig.suptitle(f"bone-health phantom (seed {p.seed}, separation {p.separation}, "
                 f"{f.mm_per_px:.3f} mm/px); Klemetti C1 vs C3: cortical width and endosteal erosion",
                 fontsize=10)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return path
