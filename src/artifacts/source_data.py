"""The user's data folder (`data.root`), as synthesize writes it and prepare reads it:

    <root>/<class>/**/<image>   one folder per class (PNG, JPEG, TIFF, BMP, DICOM)
    <root>/manifest.csv         optional: file, patient_id[, class][, box_x, box_y, box_w, box_h]
    <root>/annotations.json     optional: COCO boxes of the cortex (a CVAT export)

`data.manifest` / `data.annotations` may name files elsewhere, be null (none), or be `auto`:
the file of that name inside data.root when it is there, none otherwise.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

AUTO = "auto"
MANIFEST_NAME = "manifest.csv"
ANNOTATIONS_NAME = "annotations.json"


def is_within(root: str | Path, folder: str | Path) -> bool:
    """Whether data.root is `folder` or lies inside it (e.g. the phantom's output folder)."""
    root, folder = Path(root).resolve(), Path(folder).resolve()
    return root == folder or folder in root.parents


def sidecar(setting: str | None, root: str | Path, name: str) -> Path | None:
    """The file a data.manifest/data.annotations setting points at, or None for none."""
    if setting == AUTO:
        path = Path(root) / name
        return path if path.is_file() else None
    return Path(setting) if setting else None


def mm_per_pixel(data_root: str | Path, phantom_out: str | Path, field_width_mm: float,
                 src_width: np.ndarray) -> np.ndarray | None:
    """mm per source pixel where the geometry is known: data.root is the phantom (its detector
    is phantom.field_width_mm wide); None on real data, whose files carry no trustworthy pixel
    spacing here."""
    if is_within(data_root, phantom_out):
        return field_width_mm / np.asarray(src_width, dtype=np.float64)
    return None
