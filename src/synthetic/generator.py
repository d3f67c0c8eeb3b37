"""A synthetic panoramic-radiograph dataset laid out like a user's real data (the synthesize
stage's work: `python -m src.phantom`).

Writes, each folder swapped in whole (src.core.fileio.atomic_dir):
  {phantom.out}/<class>/P0007_v1.png          grey PNG, 8 or 16 bit (data.root points here)
  {phantom.out}/manifest.csv                  file,patient_id,class,box_x,box_y,box_w,box_h
  {phantom.out}/annotations.json              COCO boxes ("cortex"), CVAT export style
  {phantom.masks_out}/<class>/P0007_v1.png    0/255 mask of the diagnostic cortex band (both sides)
  {phantom.masks_out}/truth.csv               per image: latent severity and drawn cortex width

Classes: phantom.classes = [healthy, osteoporotic].  Each patient has a latent severity
Phi(L), L ~ N(-/+ separation * SEVERITY_GAP / 2, 1) for healthy/osteoporotic, so `separation`
alone sets how much the classes overlap (0: not at all separable).  What severity draws, and
why, is in src/synthetic/anatomy.py and docs/PHANTOM.md.

Randomness: every patient and every visit has its own stream derived from (seed, class,
patient, visit), so files do not depend on the order of drawing and the same params give
byte-identical files.
"""
from __future__ import annotations

import csv
import io
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from src.artifacts.source_data import ANNOTATIONS_NAME, MANIFEST_NAME
from src.core.config import PhantomParams
from src.core.errors import BoneHealthError
from src.core.fileio import atomic_dir
from src.core.outputs import overlaps
from src.synthetic.anatomy import (
    FORAMEN_D,
    FORAMEN_H_MM,
    V_MID,
    V_OCC,
    Anatomy,
    Field,
    Patient,
    Visit,
    acquire,
    draw_anatomy,
)

MANIFEST_COLUMNS = ["file", "patient_id", "class", "box_x", "box_y", "box_w", "box_h"]
TRUTH_COLUMNS = ["file", "patient_id", "class", "label", "visit", "severity", "cortex_mm", "mm_per_px"]
SEVERITY_GAP = 2.4     # distance of the class means of the latent L in SDs at separation 1
WIDTH_JITTER_MM = 0.15  # individual cortex width around what severity predicts
MAX_PENDING_WRITES = 8  # encoded-but-unwritten PNGs held in memory
# Fixed PNG settings (so files are stable): zlib level 1 with Huffman-only coding after the "up"
# filter encodes a noisy radiograph 2x faster than level 1 alone and smaller, ~4x faster than the default.
PNG_FLAGS = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY]
if hasattr(cv2, "IMWRITE_PNG_FILTER"):  # recent OpenCV only
    PNG_FLAGS += [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_UP]


# ------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class PlannedImage:
    file: str              # relative to the images folder: C1/P0007_v1.png
    patient_id: str
    cls: str
    label: int             # 0 healthy, 1 osteoporotic
    visit: int             # 1, 2, ...
    patient: Patient
    acquisition: Visit


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=tuple(key)))


def sample_patient(rng: np.random.Generator, label: int, p: PhantomParams) -> Patient:
    """One patient: the latent severity sets the class signal; the rest is class-independent."""
    shift = (label - 0.5) * p.separation * SEVERITY_GAP
    severity = 0.5 * (1 + math.erf((rng.standard_normal() + shift) / math.sqrt(2)))
    lo, hi = p.cortical_width_mm
    cortex = float(np.clip(hi - (hi - lo) * severity + WIDTH_JITTER_MM * rng.standard_normal(), 0.6 * lo, 1.3 * hi))
    n = p.nuisance
    z = rng.standard_normal(9)
    missing_rate = rng.uniform(0, 0.3 * n)
    present = rng.random(32) >= missing_rate
    present[[7, 15, 23, 31]] &= rng.random(4) >= min(1.0, 0.5 * n)  # third molars are often absent
    rest_rate = rng.uniform(0, 0.25 * n)
    kinds = np.where(rng.random(32) < rest_rate, np.where(rng.random(32) < 0.25, 2, 1), 0)
    kinds[[0, 1, 8, 9, 16, 17, 24, 25]] = 0  # incisors rarely carry amalgam or metal crowns
    return Patient(
        severity=float(severity),
        cortex_mm=cortex,
        base_cortex_mm=float(rng.uniform(lo + 0.2 * (hi - lo), hi)),
        arch=float(1 + 0.035 * n * np.clip(z[0], -2.5, 2.5)),
        v_mid=float(V_MID + 0.010 * n * np.clip(z[1], -2.5, 2.5)),
        curve=float(1 + 0.08 * n * np.clip(z[2], -2.5, 2.5)),
        occlusal=float(V_OCC + 0.008 * n * np.clip(z[3], -2.5, 2.5)),
        foramen_d=float(FORAMEN_D + 0.006 * n * np.clip(z[4], -2.5, 2.5)),
        foramen_h_mm=float(FORAMEN_H_MM + 1.2 * n * np.clip(z[5], -2.5, 2.5)),
        present=tuple(bool(x) for x in present),
        restoration=tuple(int(x) for x in kinds),
        tilt_deg=tuple(float(x) for x in np.clip(rng.normal(0, 3.0 * n, 32), -8, 8)),
        soft_tissue=float(1 + 0.10 * n * np.clip(z[6], -2.5, 2.5)),
        density=float(math.exp(0.08 * n * np.clip(z[7], -2.5, 2.5))),
        cortex_density=float(math.exp(0.10 * n * np.clip(z[8], -2.5, 2.5))),
        seed=int(rng.integers(2**63)),
    )


def sample_visit(rng: np.random.Generator, p: PhantomParams) -> Visit:
    """Pose, exposure, detector and annotator of one image: nothing here knows the class."""
    n = p.nuisance
    z = np.clip(rng.standard_normal(9), -2.5, 2.5)
    side = {"left": 0, "right": 1}.get(p.box_side, int(rng.integers(2)))
    return Visit(
        rotation_deg=float(1.5 * n * z[0]),
        shift_mm=(float(3.0 * n * z[1]), float(2.5 * n * z[2])),
        scale=float(1 + 0.03 * n * z[3]),
        offset=float(0.05 * n * z[4]),
        gain=float(math.exp(0.10 * n * z[5])),
        k=float(1.2 * math.exp(0.10 * n * z[6])),
        gamma=float(math.exp(0.15 * n * z[7])),
        uneven=float(0.03 * n * abs(z[8])),
        blur_mm=float(rng.uniform(0.12, 0.12 + 0.25 * n)),
        noise=float(rng.uniform(0.008, 0.008 + 0.025 * n)),
        box_side=side,
        box_len_mm=float(rng.uniform(16.0, 24.0)),
        box_jitter_mm=tuple(float(x) for x in rng.normal(0, 0.6, 4)),
        seed=int(rng.integers(2**63)),
    )


def plan(p: PhantomParams) -> list[PlannedImage]:
    """Every image to draw, in file order: patients, their visits and all random draws."""
    n = p.patients_per_class
    plan_rng = _rng(p.seed, 0)
    ids = plan_rng.permutation(2 * n) + 1  # ids say nothing about the class
    digits = max(4, len(str(2 * n)))
    n_follow = round(p.followup_fraction * n) if p.max_images_per_patient > 1 else 0
    images: list[PlannedImage] = []
    for label, cls in enumerate(p.classes):
        follow = set(plan_rng.permutation(n)[:n_follow].tolist())
        for k in range(n):
            pid = f"P{ids[label * n + k]:0{digits}d}"
            prng = _rng(p.seed, 1, label, k)
            patient = sample_patient(prng, label, p)
            visits = int(prng.integers(2, p.max_images_per_patient + 1)) if k in follow else 1
            for j in range(1, visits + 1):
                images.append(PlannedImage(
                    file=f"{cls}/{pid}_v{j}.png", patient_id=pid, cls=cls, label=label, visit=j,
                    patient=patient, acquisition=sample_visit(_rng(p.seed, 2, label, k, j), p),
                ))
    return sorted(images, key=lambda im: im.file)


def field_of(p: PhantomParams) -> Field:
    return Field(p.width, p.height, p.field_width_mm)


# ---------------------------------------------------------------------------- rendering
def render(planned: list[PlannedImage], f: Field):
    """Yield (PlannedImage, Radiograph), drawing each patient's anatomy once for all visits."""
    cache: dict[int, Anatomy] = {}
    for im in planned:
        key = im.patient.seed
        if key not in cache:  # a patient's visits are consecutive in the plan: keep one anatomy
            cache = {key: draw_anatomy(im.patient, f)}
        yield im, acquire(cache[key], im.acquisition, f)


def quantize(image: np.ndarray, bit_depth: int) -> np.ndarray:
    top = 255 if bit_depth == 8 else 65535
    return (image * top + 0.5).astype(np.uint8 if bit_depth == 8 else np.uint16)


def _write_png(path: Path, array: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", array, PNG_FLAGS)
    if not ok:
        raise BoneHealthError(f"{path}: PNG encoding failed")
    path.write_bytes(buf.tobytes())


def coco(planned: list[PlannedImage], boxes: dict[str, tuple], f: Field) -> dict:
    """COCO detection JSON as CVAT exports it: one 'cortex' box per image."""
    images, annotations = [], []
    for i, im in enumerate(planned, start=1):
        x, y, w, h = boxes[im.file]
        images.append({"id": i, "width": f.width, "height": f.height, "file_name": im.file,
                       "license": 0, "flickr_url": "", "coco_url": "", "date_captured": 0})
        annotations.append({"id": i, "image_id": i, "category_id": 1, "segmentation": [],
                            "area": float(w * h), "bbox": [float(x), float(y), float(w), float(h)],
                            "iscrowd": 0, "attributes": {"occluded": False, "rotation": 0.0}})
    return {
        "licenses": [{"name": "", "id": 0, "url": ""}],
        "info": {"contributor": "", "date_created": "", "description": "bone-health phantom",
                 "url": "", "version": "", "year": ""},
        "categories": [{"id": 1, "name": "cortex", "supercategory": ""}],
        "images": images,
        "annotations": annotations,
    }


def _csv_text(columns: list[str], rows: list[list]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    return buf.getvalue()


def _check_paths(p: PhantomParams) -> tuple[Path, Path]:
    if overlaps(p.out, p.masks_out):
        raise BoneHealthError(
            f"phantom.masks_out {p.masks_out!r} must lie outside phantom.out {p.out!r} (masks are kept apart from the images)"
        )
    return Path(p.out), Path(p.masks_out)


def generate(p: PhantomParams) -> dict:
    """Write the dataset and its masks; returns a summary (counts, seconds, images/s)."""
    out, masks_out = _check_paths(p)
    f = field_of(p)
    start = time.perf_counter()
    planned = plan(p)
    boxes: dict[str, tuple] = {}
    truth_rows = []
    with atomic_dir(out, "phantom.out") as tmp_out, atomic_dir(masks_out, "phantom.masks_out") as tmp_masks:
        for cls in p.classes:
            (tmp_out / cls).mkdir(parents=True)
            (tmp_masks / cls).mkdir(parents=True)
        # PNG encoding releases the GIL: one writer thread overlaps it with drawing
        with ThreadPoolExecutor(max_workers=1) as writer:
            pending: list = []
            for im, rad in render(planned, f):
                boxes[im.file] = rad.box
                pending.append(writer.submit(_write_png, tmp_out / im.file, quantize(rad.image, p.bit_depth)))
                pending.append(writer.submit(_write_png, tmp_masks / im.file, np.where(rad.mask, 255, 0).astype(np.uint8)))
                truth_rows.append([im.file, im.patient_id, im.cls, im.label, im.visit,
                                   f"{im.patient.severity:.4f}", f"{im.patient.cortex_mm:.3f}", f"{f.mm_per_px:.5f}"])
                while len(pending) > MAX_PENDING_WRITES:  # bounded memory, and a failed write stops the run early
                    pending.pop(0).result()
            for fut in pending:
                fut.result()
        rows = [[im.file, im.patient_id, im.cls, *boxes[im.file]] for im in planned]
        (tmp_out / MANIFEST_NAME).write_text(_csv_text(MANIFEST_COLUMNS, rows))
        (tmp_out / ANNOTATIONS_NAME).write_text(json.dumps(coco(planned, boxes, f), indent=1) + "\n")
        (tmp_masks / "truth.csv").write_text(_csv_text(TRUTH_COLUMNS, truth_rows))
    seconds = time.perf_counter() - start
    return {
        "images": len(planned),
        "patients": len({im.patient_id for im in planned}),
        "per_class": {c: sum(im.cls == c for im in planned) for c in p.classes},
        "seconds": seconds,
        "images_per_s": len(planned) / max(seconds, 1e-9),
        "out": str(out),
        "masks_out": str(masks_out),
        "mm_per_px": f.mm_per_px,
    }
