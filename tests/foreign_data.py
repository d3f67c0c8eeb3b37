"""A radiograph folder as users bring it, not as the phantom is laid out: two classes with
names of their own, no manifest, no boxes, JPEG and PNG mixed, grey and RGB, sizes from 700 to
1800 px, patient ids in the file names (some patients with two visits).

The class signal is a bright band near the lower edge (a cortex-like stripe) that is thicker in
the first class, so a tiny model can learn something in one epoch."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("healthy", "osteoporotic")
SIZES = ((700, 900), (900, 1200), (1100, 1500), (1350, 1800), (800, 800), (1500, 1100))


def make_foreign_xrays(root: str | Path, patients_per_class: int = 8, seed: int = 0) -> Path:
    root = Path(root)
    rng = np.random.default_rng(seed)
    k = 0
    for label, cls in enumerate(CLASSES):
        folder = root / cls
        folder.mkdir(parents=True, exist_ok=True)
        for p in range(patients_per_class):
            pid = f"pt{label}{p:03d}"
            for visit in range(1 + (p % 3 == 0)):  # every third patient came twice
                h, w = SIZES[k % len(SIZES)]
                img = rng.normal(90, 18, (h, w))
                band = int(h * (0.06 if label == 0 else 0.025))
                top = int(h * rng.uniform(0.70, 0.78))
                img[top:top + band, :] += 110
                grey = np.clip(img, 0, 255).astype(np.uint8)
                name = f"{pid}_{2019 + visit}"
                if k % 2:
                    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(folder / f"{name}.jpg", quality=90)
                else:
                    Image.fromarray(grey).save(folder / f"{name}.png")
                k += 1
    return root
