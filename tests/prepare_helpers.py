"""Tiny synthetic datasets in the phantom's layout, for the ingestion and prepare tests.

Layout (as src.phantom writes it): {out}/images/<class>/P0001_v1.png, {out}/manifest.csv
(file,patient_id,class,box_x,box_y,box_w,box_h; file relative to images/) and
{out}/annotations.json (COCO, file_name relative to images/).
"""
from __future__ import annotations

import csv
import json
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from src.core.config import params_from_dict

H, W = 48, 96  # small but wide, like a panoramic radiograph
BOX = (40.0, 20.0, 16.0, 8.0)  # x, y, w, h: centre (48, 24)


def synthetic_image(seed: int, label: int, h: int = H, w: int = W) -> np.ndarray:
    """uint8 (h, w): a bright band (the 'cortex') whose brightness depends on the class, plus noise."""
    rng = np.random.default_rng(seed)
    img = rng.normal(60, 10, size=(h, w))
    img[h // 3: h // 3 + 6, :] += 90 if label == 0 else 40
    return np.clip(img, 0, 255).astype(np.uint8)


def make_dataset(
    out: Path,
    patients_per_class: int = 4,
    classes: tuple[str, ...] = ("C1", "C3"),
    visits: int = 2,
    coco: bool = True,
    manifest: bool = True,
    box: tuple[float, float, float, float] = BOX,
) -> dict[str, Path]:
    """Write the dataset; every image unique, patients with `visits` images each."""
    images = out / "images"
    rows, coco_images, coco_anns = [], [], []
    seed = 0
    for label, cls in enumerate(classes):
        (images / cls).mkdir(parents=True, exist_ok=True)
        for p in range(patients_per_class):
            pid = f"{cls}P{p:04d}"  # distinct per class: a patient has one diagnosis here
            for v in range(1, visits + 1):
                seed += 1
                rel = f"{cls}/{pid}_v{v}.png"
                Image.fromarray(synthetic_image(seed, label)).save(images / rel)
                rows.append([rel, pid, cls, *box])
                coco_images.append({"id": seed, "file_name": rel, "width": W, "height": H})
                coco_anns.append({"id": 1000 + seed, "image_id": seed, "category_id": 1, "bbox": list(box)})
    paths = {"root": images}
    if manifest:
        paths["manifest"] = out / "manifest.csv"
        with open(paths["manifest"], "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["file", "patient_id", "class", "box_x", "box_y", "box_w", "box_h"])
            writer.writerows(rows)
    if coco:
        paths["annotations"] = out / "annotations.json"
        paths["annotations"].write_text(json.dumps({
            "images": coco_images, "annotations": coco_anns,
            "categories": [{"id": 1, "name": "cortex"}],
        }))
    return paths


def make_params(paths: dict[str, Path], out: Path, folds: int = 2, **sections):
    """Validated Params for a tiny run: crop side 24 px -> 16 px stored, `folds` folds."""
    raw = {
        "data": {
            "root": str(paths["root"]),
            "manifest": str(paths["manifest"]) if "manifest" in paths else None,
            "annotations": str(paths["annotations"]) if "annotations" in paths else None,
        },
        "prepare": {"out": str(out), "mode": "crop", "crop": {"side": 24, "reference_width": None, "size": 16},
                    "folds": folds},
    }
    for section, values in sections.items():
        raw.setdefault(section, {})
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(raw[section].get(key), dict):
                raw[section][key].update(value)
            else:
                raw[section][key] = value
    return params_from_dict(raw)


def png_with_sbit(arr16: np.ndarray, significant_bits: int) -> bytes:
    """A 16-bit grey PNG carrying an sBIT chunk (Pillow cannot write one)."""
    import io

    buf = io.BytesIO()
    Image.fromarray(arr16.astype(np.uint16)).save(buf, "PNG")
    data = buf.getvalue()
    ihdr_end = 8 + 8 + 13 + 4
    body = bytes([significant_bits])
    chunk = struct.pack(">I", 1) + b"sBIT" + body + struct.pack(">I", zlib.crc32(b"sBIT" + body) & 0xFFFFFFFF)
    return data[:ihdr_end] + chunk + data[ihdr_end:]


def write_dicom(path: Path, pixels: np.ndarray | None, bits_stored: int = 12, photometric: str = "MONOCHROME2",
                preamble: bool = True, **elements) -> Path:
    """A minimal DICOM file written by pydicom; pixels=None leaves out PixelData."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (
        ExplicitVRLittleEndian,
        SecondaryCaptureImageStorage,
        generate_uid,
    )

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.PatientID = "P1"
    if pixels is not None:
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated = 16
        ds.BitsStored = bits_stored
        ds.HighBit = bits_stored - 1
        ds.PixelRepresentation = 0
        ds.PixelData = pixels.astype(np.uint16).tobytes()
    for key, value in elements.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=preamble)
    return path
