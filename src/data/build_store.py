"""Build the prepared store: decode every radiograph once into the array store training reads.

discover -> cheap validation (label conflicts, boxes, patients per class) -> one decoding
pass straight into images.npy (a memmap in the temporary store folder, so memory stays
flat) -> validation with the decoding failures -> folds (StratifiedGroupKFold) ->
manifest.csv, meta.json, report.json.  The folder is built under a temporary name and
swapped in whole (layout: src/artifacts/store.py), so a stop or a crash leaves no store
that looks complete.
"""
from __future__ import annotations

import logging
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from src.artifacts.store import (
    IMAGES_FILE,
    MANIFEST_FILE,
    META_FILE,
    REPORT_FILE,
    compact_images,
    images_bytes,
    open_images,
    write_manifest,
    write_store_json,
)
from src.core.config import Params, PrepareParams
from src.core.diskspace import require_free
from src.core.errors import DataError
from src.core.fileio import atomic_dir, sha256_file, sweep_stale_temps
from src.data.dataset import Dataset, ImageRecord, discover, fold_summary, validate
from src.data.imaging import probe_size, read_image
from src.data.preprocess import full_size, preprocess_image
from src.data.splits import assign_folds, fold_groups

log = logging.getLogger(__name__)

RUN_ONLY_FIELDS = {"out", "workers"}


def prepare(params: Params) -> Path:
    """Build the prepared store at prepare.out and return its path."""
    folds = params.prepare.folds
    ds = discover(params.data, folds=folds)
    prep = resolve_mode(params.prepare, ds.records)
    crop = prep.mode == "crop"
    # Rules that need no pixels run first, so a label conflict stops in seconds, not after decoding.
    early = _validated(ds, folds, crop, unreadable={})
    skip = {e["file"] for e in early["excluded"]}
    todo = [r for r in ds.records if r.file not in skip]

    settings, source_sizes = resolve_settings(prep, todo)
    size = (prep.crop.size, prep.crop.size) if crop else tuple(settings.full.size)
    out = Path(prep.out)
    # The store's size is known before decoding: a disk too small stops now, not hours in
    # (after removing what a killed earlier run left, which would otherwise count as used).
    sweep_stale_temps(out)
    require_free(out, images_bytes(prep.dtype, (len(ds.records), *size)), "prepare.out")
    with atomic_dir(out, "prepare.out") as tmp:
        infos, unreadable = _decode_into(tmp / IMAGES_FILE, ds.records, skip, settings, size, params.data.max_pixels)
        report = _validated(ds, folds, crop, unreadable=unreadable)
        kept_files = set(report["kept"])
        keep = [i for i, r in enumerate(ds.records) if r.file in kept_files]
        if len(keep) < len(ds.records):
            compact_images(tmp / IMAGES_FILE, keep)
        kept = [ds.records[i] for i in keep]
        fold = assign_folds(np.array([r.label for r in kept]), fold_groups(kept), folds, prep.fold_seed)

        report["fold_counts"] = fold_summary(kept, fold, ds.classes)
        report["source_sizes"] = {f"{h}x{w}": n for (h, w), n in source_sizes.most_common()}
        report["store_size"] = [int(size[0]), int(size[1])]
        report["mode"] = mode_choice(params.prepare.mode, prep.mode, ds.records)
        report["warnings"] = _warnings(report, source_sizes, crop)
        write_manifest(tmp / MANIFEST_FILE, _manifest_rows(kept, [infos[i] for i in keep], fold))
        meta = {
            "mode": prep.mode,
            "size": [int(size[0]), int(size[1])],
            "dtype": prep.dtype,
            "classes": ds.classes,
            "positive_class": ds.positive_class,
            "folds": folds,
            "fold_seed": prep.fold_seed,
            "preprocessing": stored_settings(settings),
            "data_root": str(params.data.root),
            "n_images": len(kept),
            "manifest_sha256": sha256_file(tmp / MANIFEST_FILE),
        }
        write_store_json(tmp / META_FILE, meta)
        write_store_json(tmp / REPORT_FILE, report)
    return out


def _validated(ds: Dataset, folds: int, crop: bool, unreadable: dict[str, str]) -> dict[str, Any]:
    """The validation report; a failure carries its report (ValidationFailed.report)."""
    return validate(ds, folds, require_boxes=crop, unreadable=unreadable)


def resolve_mode(prep: PrepareParams, records: list[ImageRecord]) -> PrepareParams:
    """prepare.mode auto: crop when every image has a box, else full.  The concrete mode is what
    the store (and every model trained on it) records; `mode_choice` says why, for the report."""
    if prep.mode != "auto":
        return prep
    boxed = sum(r.box is not None for r in records)
    mode = "crop" if records and boxed == len(records) else "full"
    return prep.model_copy(update={"mode": mode})


def mode_choice(requested: str, resolved: str, records: list[ImageRecord]) -> str:
    boxed = sum(r.box is not None for r in records)
    why = f"{boxed} of {len(records)} images have a box"
    if requested != "auto":
        return f"{resolved} (prepare.mode; {why})"
    return f"auto -> {resolved}: {why}" + ("" if resolved == "crop" else " (crop mode needs one for every image)")


def resolve_settings(prep: PrepareParams, records: list[ImageRecord]) -> tuple[PrepareParams, Counter]:
    """Fix full-mode's output size from the source sizes (headers only).

    A store holds one size.  A downscale factor applies to the most common source size; a long
    side (the default) keeps the median source aspect ratio.  The resolved [h, w] is written
    into the stored settings so inference resizes any new image to exactly the trained size.
    """
    sizes = Counter(s for s in (probe_size(r.path) for r in records) if s is not None)
    return sized(prep, sizes), sizes


def sized(prep: PrepareParams, sizes: Counter) -> PrepareParams:
    """`prep` with full mode's [h, w] fixed from the source sizes (see resolve_settings)."""
    if prep.mode != "full" or prep.full.size is not None:
        return prep
    if not sizes:
        raise DataError("prepare.full: no readable image header to take the size from; set prepare.full.size")
    if prep.full.downscale:
        resolved = full_size(sizes.most_common(1)[0][0], prep.full.downscale, None)
    else:
        ratio = median_aspect(sizes)
        resolved = full_size((ratio, 1.0), None, None, prep.full.long_side)
    return prep.model_copy(update={"full": prep.full.model_copy(update={"size": resolved})})


def median_aspect(sizes: Counter) -> float:
    """Median height/width over the images (each image counts once)."""
    ratios = np.repeat([h / w for h, w in sizes], list(sizes.values()))
    return float(np.median(ratios))


def stored_settings(settings: PrepareParams) -> dict[str, Any]:
    """The prepare section as inference needs it: where the store went and how many
    processes built it change nothing in the pixels, so they stay out of meta.json."""
    return settings.model_dump(mode="json", exclude=RUN_ONLY_FIELDS)


def _decode_into(path: Path, records: list[ImageRecord], skip: set[str], settings: PrepareParams,
                 size: tuple[int, int], max_pixels: int | None) -> tuple[list[dict | None], dict[str, str]]:
    """One pass: decode + preprocess each image into row i of a memmapped images.npy."""
    images = open_images(path, settings.dtype, (len(records), *size))
    infos: list[dict | None] = [None] * len(records)
    unreadable: dict[str, str] = {}
    todo = [i for i, r in enumerate(records) if r.file not in skip]
    jobs = [(str(records[i].path), records[i].box) for i in todo]
    for i, result in zip(todo, _run(jobs, settings.model_dump(mode="json"), settings.workers, max_pixels)):
        if isinstance(result, str):
            unreadable[records[i].file] = result
            continue
        arr, info = result
        if arr.shape != tuple(size):
            raise DataError(f"{records[i].file}: preprocessed to {arr.shape}, store rows are {tuple(size)}")
        images[i] = arr
        infos[i] = info
    images.flush()
    del images
    return infos, unreadable


def _run(jobs: list[tuple[str, Any]], settings: dict, workers: int, max_pixels: int | None) -> Iterator[Any]:
    if workers <= 1 or len(jobs) < 2 * workers:
        for path, box in jobs:
            yield process_one(path, box, settings, max_pixels)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        # map keeps input order, so row i is always record i whatever the worker count.
        yield from pool.map(process_one, *zip(*jobs), [settings] * len(jobs), [max_pixels] * len(jobs), chunksize=8)


def process_one(path: str, box, settings: dict, max_pixels: int | None = None) -> tuple[np.ndarray, dict] | str:
    """Decode + preprocess one file; a DataError becomes its reason (the file is reported)."""
    try:
        return preprocess_image(read_image(path, max_pixels), settings, box)
    except DataError as exc:
        text = str(exc)
        return text[len(path) + 2:] if text.startswith(f"{path}: ") else text


def _manifest_rows(records: list[ImageRecord], infos: list[dict], fold: np.ndarray) -> list[dict[str, Any]]:
    rows = []
    for i, (r, info, k) in enumerate(zip(records, infos, fold)):
        box = r.box or (None, None, None, None)
        rows.append({"index": i, "file": r.file, "class": r.class_name, "label": r.label, "patient": r.patient,
                     "fold": int(k), "src_height": info["src_height"], "src_width": info["src_width"],
                     **dict(zip(("box_x", "box_y", "box_w", "box_h"), box)),
                     "crop_x0": info["crop_x0"], "crop_y0": info["crop_y0"], "crop_side": info["crop_side"],
                     "sha256": r.sha256})
    return rows


def _warnings(report: dict[str, Any], source_sizes: Counter, crop: bool) -> list[str]:
    out = []
    for k, row in report["fold_counts"].items():
        empty = [c for c in report["classes"] if row[c] == 0]
        if empty:
            out.append(f"fold {k} has no image of class {', '.join(empty)}: its AUC is undefined; add patients or lower prepare.folds")
    if not crop and source_sizes:
        line = aspect_warning(source_sizes, tuple(report["store_size"]))
        if line:
            out.append(line)
    return out


def aspect_warning(source_sizes: Counter, store_hw: tuple[int, int], tolerance: float = 0.02,
                   listed: str = " in report.json source_sizes") -> str | None:
    """Full mode resizes every image to one [h, w]: say how far that bends the anatomy."""
    store_ratio = store_hw[0] / store_hw[1]
    ratios = np.repeat([h / w for h, w in source_sizes], list(source_sizes.values()))
    change = np.abs(ratios / store_ratio - 1)
    bent = int((change > tolerance).sum())
    if not bent:
        return None
    return (f"{bent} of {len(ratios)} images change aspect ratio by more than {tolerance:.0%} when resized to the "
            f"store's {store_hw[0]}x{store_hw[1]} (h/w {store_ratio:.2f}): source h/w {ratios.min():.2f}-"
            f"{ratios.max():.2f}, median {np.median(ratios):.2f}, up to {change.max():.0%} squashed or stretched; "
            f"{len(source_sizes)} source sizes{listed}")
