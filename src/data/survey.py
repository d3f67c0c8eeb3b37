"""`python -m src.prepare --inspect`: look at a folder of radiographs before preparing it.

Reads file headers only (no decoding): classes, counts, formats, colour modes, sizes, duplicate
files, the patient ids the file names suggest, whether boxes exist, and the settings prepare
would then use (mode, store size, folds); prints them with the `dvc add` lines, and on request
writes a params overlay holding exactly those settings.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from src.artifacts.store import images_bytes
from src.core.config import Params
from src.core.diskspace import free_bytes, human_bytes
from src.core.errors import BoneHealthError
from src.core.fileio import atomic_write_text
from src.data.build_store import (
    aspect_warning,
    median_aspect,
    resolve_mode,
    sized,
)
from src.data.dataset import Dataset, discover
from src.data.imaging import probe_header

OVERLAY_HEADER = "# bone-health params overlay written by `python -m src.prepare --inspect`\n"


@dataclass
class Survey:
    ds: Dataset
    formats: dict[str, Counter] = field(default_factory=dict)
    modes: dict[str, Counter] = field(default_factory=dict)
    sizes: dict[str, Counter] = field(default_factory=dict)
    unreadable_headers: list[str] = field(default_factory=list)
    duplicates: list[list[str]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def positive_ok(self) -> bool:
        return self.ds.positive_class in self.ds.classes


def survey(params: Params) -> Survey:
    ds = discover(params.data, folds=params.prepare.folds, require_positive=False)
    out = Survey(ds=ds)
    for cls in ds.classes:
        out.formats[cls], out.modes[cls], out.sizes[cls] = Counter(), Counter(), Counter()
    for rec in ds.records:
        header = probe_header(rec.path)
        if header is None:
            out.unreadable_headers.append(rec.file)
            continue
        out.formats[rec.class_name][header.format] += 1
        out.modes[rec.class_name][header.mode] += 1
        out.sizes[rec.class_name][(header.height, header.width)] += 1
    by_hash = defaultdict(list)
    for rec in ds.records:
        by_hash[rec.sha256].append(rec.file)
    out.duplicates = [files for files in by_hash.values() if len(files) > 1]

    prep = resolve_mode(params.prepare, ds.records)
    all_sizes = sum(out.sizes.values(), Counter())
    settings = {"mode": prep.mode, "patient_regex": ds.patient_regex}
    if prep.mode == "full" and all_sizes:
        size = tuple(sized(prep, all_sizes).full.size)  # from the headers read above, not read again
        settings["size"] = list(size)
        line = aspect_warning(all_sizes, size, listed="")
        if line:
            out.notes.append(line)
        settings["median_aspect"] = median_aspect(all_sizes)
    elif prep.mode == "crop":
        size = (prep.crop.size, prep.crop.size)
        settings["size"] = list(size)
    else:
        size = None
    if size is not None:
        settings["store_bytes"] = images_bytes(prep.dtype, (len(ds.records), *size))
    out.settings = settings
    return out


def _counter(c: Counter, limit: int = 3) -> str:
    items = [f"{k} {n}" for k, n in c.most_common(limit)]
    return ", ".join(items) + (f", +{len(c) - limit}" if len(c) > limit else "")


def _sizes(c: Counter) -> str:
    if not c:
        return "-"
    hs = np.repeat([h for h, _ in c], list(c.values()))
    ws = np.repeat([w for _, w in c], list(c.values()))
    return (f"{hs.min()}-{hs.max()} x {ws.min()}-{ws.max()} (median {int(np.median(hs))}x{int(np.median(ws))}, "
            f"{len(c)} size{'s' if len(c) > 1 else ''})")


def format_survey(sv: Survey, params: Params) -> str:
    ds = sv.ds
    data = params.data
    boxed = sum(r.box is not None for r in ds.records)
    lines = [f"data.root {ds.root}: {len(ds.classes)} classes, {len(ds.records)} images"
             + (f", {len(ds.ignored)} other files ignored" if ds.ignored else "")]
    patients = {c: len({r.patient for r in ds.records if r.class_name == c}) for c in ds.classes}
    width = max([8, *(len(c) + 2 for c in ds.classes)])
    lines.append(f"  {'class':<{width}}{'images':>8}{'patients':>10}  formats / colour modes / sizes (h x w)")
    for cls in ds.classes:
        n = sum(r.class_name == cls for r in ds.records)
        mark = "  (positive)" if cls == ds.positive_class else ""
        lines.append(f"  {cls:<{width}}{n:>8}{patients[cls]:>10}  {_counter(sv.formats[cls])} / "
                     f"{_counter(sv.modes[cls])} / {_sizes(sv.sizes[cls])}{mark}")
    if sv.unreadable_headers:
        lines.append(f"  unreadable headers: {len(sv.unreadable_headers)}, e.g. {sv.unreadable_headers[0]} "
                     "(prepare will say why, or skip them with data.on_bad_file: skip)")
    if sv.duplicates:
        lines.append(f"duplicate files (same bytes): {len(sv.duplicates)} group(s), e.g. {' = '.join(sv.duplicates[0][:3])}"
                     " (kept in one fold; in two classes they are label conflicts)")
    sources = Counter(r.patient_source for r in ds.records)
    if sources.get("manifest"):
        lines.append(f"patients: from the manifest for {sources['manifest']} images")
    elif ds.patient_regex:
        per = Counter(r.patient for r in ds.records if r.patient_source == "regex")
        how = "(chosen by data.patient_regex auto)" if data.patient_regex == "auto" else "(data.patient_regex)"
        lines.append(f"patients: '{ds.patient_regex}' {how}: {len(per)} patients, "
                     f"{min(per.values(), default=0)}-{max(per.values(), default=0)} images each")
        if ds.unmatched:
            lines.append(f"  {len(ds.unmatched)} file names do not match it, e.g. {Path(ds.unmatched[0]).name}")
    else:
        lines.append("patients: each image its own patient (no manifest, and the file names share no patient id); "
                     "if a patient has several images, give a manifest or data.patient_regex, or one patient "
                     "may sit in a training fold and its test fold")
    lines.append(f"boxes: {boxed} of {len(ds.records)} images -> prepare.mode {params.prepare.mode}"
                 + (f" -> {sv.settings['mode']}" if params.prepare.mode == "auto" else ""))
    st = sv.settings
    if "size" in st:
        store = f"store: {len(ds.records)} x {st['size'][0]}x{st['size'][1]} {params.prepare.dtype}"
        if st["mode"] == "full":
            how = ("prepare.full.size" if params.prepare.full.size else
                   f"prepare.full.downscale {params.prepare.full.downscale}" if params.prepare.full.downscale else
                   f"prepare.full.long_side {params.prepare.full.long_side}, median h/w {st['median_aspect']:.2f}")
            store += f" ({how})"
        store += f", {human_bytes(st['store_bytes'])}; {human_bytes(free_bytes(params.prepare.out))} free at " \
                 f"{params.prepare.out}"
        lines.append(store)
    lines += [f"note: {n}" for n in sv.notes]
    folds = params.prepare.folds
    short = {c: n for c, n in patients.items() if n < folds}
    lines.append(f"folds: prepare.folds {folds}: " + ("every class has enough patients" if not short else
                 f"too few patients in {', '.join(f'{c} ({n})' for c, n in short.items())}: lower prepare.folds"))
    if sv.positive_ok:
        lines.append(f"positive class: {ds.positive_class} (data.positive_class)")
    else:
        lines.append(f"positive class: data.positive_class {ds.positive_class!r} is not a class here: set the disease "
                     f"class, e.g. --set data.positive_class={ds.classes[-1]}")
    lines += ["", "to version the data with DVC (from the repository root):"]
    if ds.root.resolve().is_relative_to(Path.cwd().resolve()):
        lines += [f"  dvc add {ds.root}", f"  git add {ds.root}.dvc .gitignore && git commit -m 'data: {ds.root.name}'"]
    else:
        lines.append(f"  {ds.root} is outside this repository: copy it under data/ (e.g. data/{ds.root.name}), "
                     f"then dvc add data/{ds.root.name}")
    lines += ["then prepare it:",
              f"  python -m src.prepare --set data.root={ds.root}"
              + ("" if sv.positive_ok else " --set data.positive_class=<disease class>")
              + "   (or --inspect --write-overlay FILE, then --params params.yaml --params FILE)"]
    return "\n".join(lines)


def overlay(sv: Survey, params: Params) -> dict[str, Any]:
    """The settings the survey found, as a params overlay (only what differs from reading them again)."""
    data: dict[str, Any] = {"root": str(sv.ds.root), "positive_class": sv.ds.positive_class}
    if sv.ds.patient_regex or params.data.patient_regex is None:
        data["patient_regex"] = sv.ds.patient_regex  # pinned: new files could change what auto would pick
    prepare: dict[str, Any] = {"mode": sv.settings["mode"]}
    if sv.settings["mode"] == "full" and "size" in sv.settings:
        prepare["full"] = {"size": sv.settings["size"]}
    return {"data": data, "prepare": prepare}


def write_overlay(sv: Survey, params: Params, path: str | Path) -> Path:
    path = Path(path)
    if not sv.positive_ok:
        raise BoneHealthError(f"--write-overlay {path}: choose the positive class first (one of "
                              f"{', '.join(sv.ds.classes)}): add --set data.positive_class=...")
    if path.exists() and not path.read_text(errors="replace").startswith(OVERLAY_HEADER):
        raise BoneHealthError(f"--write-overlay {path}: the file exists and was not written by --inspect; "
                              "choose another name")
    body = yaml.safe_dump(overlay(sv, params), sort_keys=False)
    return atomic_write_text(path, OVERLAY_HEADER + "# use: python -m src.prepare --params params.yaml --params "
                             f"{path}\n" + body)
