"""Dataset ingestion: find the images, their class, patient and box, and validate them.

Layout: `data.root/<class>/**/<image>` (the lab's C1/ and C3/; any names, any number of
classes).  Patients come from the CSV manifest, else `data.patient_regex`, else each image
is its own patient.  Boxes come from COCO JSON (CVAT export), else the manifest.

`discover` only lists, hashes and links (no decoding); `validate` applies the issue's
rules and returns the report that prepare writes as report.json.  Folds are grouped by
patient, and patients that share an identical image file are merged into one group so a
copy can never sit in a training fold and its test fold at once.
"""
from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from src.artifacts.source_data import ANNOTATIONS_NAME, MANIFEST_NAME, sidecar
from src.core.config import Params
from src.core.errors import DataError
from src.core.fileio import sha256_file
from src.data.imaging import is_dicom, read_image
from src.data.patient_ids import suggest_patient_regex
from src.data.preprocess import Box

MANIFEST_BOX_COLUMNS = ("box_x", "box_y", "box_w", "box_h")
MAX_LISTED = 10  # lines per section in the printed table; report.json lists everything
AUTO_REGEX = "auto"


class ValidationFailed(DataError):
    """A stop rule fired; `.report` holds the full report so the caller can print it."""

    def __init__(self, message: str, report: dict[str, Any]):
        super().__init__(message)
        self.report = report


@dataclass
class ImageRecord:
    path: Path
    file: str  # POSIX path relative to data.root: the key in manifest, report and store
    class_name: str
    label: int
    patient: str
    box: Box | None
    sha256: str
    patient_source: str  # manifest | regex | file
    manifest_class: str | None = None  # a class the manifest claims, when it disagrees with the folder


@dataclass
class Dataset:
    root: Path
    classes: list[str]
    positive_class: str
    records: list[ImageRecord]
    folds: int | None = None
    on_bad_file: str = "stop"
    on_label_conflict: str = "stop"
    ignored: list[dict[str, str]] = field(default_factory=list)  # files that are not images
    broken: dict[str, str] = field(default_factory=dict)  # links that lead nowhere: reported as unreadable
    max_pixels: int | None = None  # data.max_pixels: larger images are unreadable
    notes: dict[str, list] = field(default_factory=lambda: defaultdict(list))  # report-only findings
    patient_regex: str | None = None  # as used (data.patient_regex, or what auto chose)
    patient_regex_auto: bool = False  # chosen by data.patient_regex: auto
    unmatched: list[str] = field(default_factory=list)  # files whose name the patient regex does not match

    def by_file(self) -> dict[str, ImageRecord]:
        return {r.file: r for r in self.records}


# ------------------------------------------------------------------------ discover
def discover(data, folds: int | None = None, *, require_positive: bool = True) -> Dataset:
    """List images under data.root with class, patient, box and content hash (no decoding).
    `require_positive=False` (inspect) lists a folder whose positive class is not chosen yet."""
    root = Path(data.root)
    if not root.exists():
        raise DataError(f"data.root: folder not found: {root}")
    if not root.is_dir():
        raise DataError(f"data.root: {root} is a file; expected a folder with one sub-folder per class")
    classes = _classes(root, data.classes)
    if data.positive_class not in classes and require_positive:
        raise DataError(
            f"data.positive_class: {data.positive_class!r} is not a class under {root} (classes: {', '.join(classes)}); "
            f"set it to the disease class, e.g. --set data.positive_class={classes[-1]}"
        )
    extensions = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in data.extensions}
    ds = Dataset(root=root, classes=classes, positive_class=data.positive_class, records=[], folds=folds,
                 on_bad_file=data.on_bad_file, on_label_conflict=data.on_label_conflict, max_pixels=data.max_pixels)

    manifest_path = sidecar(data.manifest, root, MANIFEST_NAME)
    annotations_path = sidecar(data.annotations, root, ANNOTATIONS_NAME)
    sidecars = {p.resolve() for p in (manifest_path, annotations_path) if p}
    for item in sorted(root.iterdir()):
        if item.is_file() and not item.name.startswith(".") and item.resolve() not in sidecars:
            ds.ignored.append({"file": item.name, "reason": "not inside a class folder"})
    for label, cls in enumerate(classes):
        for path in sorted((root / cls).rglob("*")):
            rel = path.relative_to(root).as_posix()
            if any(part.startswith(".") for part in path.relative_to(root).parts):
                continue  # .DS_Store, editor swap files, a .dvc cache: never data
            if path.is_symlink() and not path.exists():
                # is_file() is False for a link loop or a dangling link: it would vanish unreported.
                ds.broken[rel] = "broken symbolic link or link loop"
                continue
            if not path.is_file():
                continue
            reason = _not_an_image(path, extensions)
            if reason:
                ds.ignored.append({"file": rel, "reason": reason})
                continue
            ds.records.append(ImageRecord(path=path, file=rel, class_name=cls, label=label, patient=rel,
                                          box=None, sha256=sha256_file(path), patient_source="file"))

    manifest = _read_manifest(str(manifest_path), root) if manifest_path else None
    ds.patient_regex = data.patient_regex
    ds.patient_regex_auto = data.patient_regex == AUTO_REGEX
    if ds.patient_regex_auto:
        # A manifest names the patients; otherwise the file names' own patient ids, when they show
        # images sharing one: grouping too much only makes folds stricter, too little leaks patients.
        ds.patient_regex = None if manifest else suggest_patient_regex([Path(r.file).name for r in ds.records])
    regex = _compile_patient_regex(ds.patient_regex) if ds.patient_regex else None
    _assign_patients(ds, manifest, regex, data)
    if manifest:
        _boxes_from_manifest(ds, manifest)
    if annotations_path:
        _boxes_from_coco(ds, annotations_path)
    return ds


def _classes(root: Path, wanted: list[str] | None) -> list[str]:
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if wanted is not None:
        missing = [c for c in wanted if c not in folders]
        if missing:
            raise DataError(f"data.classes: no folder {root / missing[0]} (class folders found: {', '.join(folders) or 'none'})")
        folders = list(wanted)
    if not folders:
        raise DataError(f"data.root {root}: no class sub-folders; expected one folder per class (e.g. C1/ and C3/) holding the images")
    if len(folders) < 2:
        raise DataError(f"data.root {root}: only one class folder ({folders[0]!r}); need at least two (e.g. C1/ and C3/)")
    return folders


def _not_an_image(path: Path, extensions: set[str]) -> str | None:
    suffix = path.suffix.lower()
    if suffix in extensions:
        return None
    if not suffix:
        # DICOM exports often have no extension: accept those with the Part 10 preamble.
        with open(path, "rb") as fh:
            if is_dicom(fh.read(132)):
                return None
        return "no extension and not DICOM"
    return f"extension {suffix!r} not in data.extensions"


# ------------------------------------------------------------------------ patients
def _read_manifest(path_text: str, root: Path) -> dict[str, dict[str, str]]:
    """file (relative to data.root) -> row; `file` may also be relative to the manifest's folder."""
    import pandas as pd

    path = Path(path_text)
    if not path.is_file():
        raise DataError(f"data.manifest: file not found: {path} (set data.manifest: null to go without)")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:  # pandas parser errors come in several types
        raise DataError(f"data.manifest {path}: not a readable CSV ({str(exc).splitlines()[0]})") from None
    df.columns = [c.strip() for c in df.columns]
    missing = [c for c in ("file", "patient_id") if c not in df.columns]
    if missing:
        raise DataError(
            f"data.manifest {path}: missing column {missing[0]!r}; expected file,patient_id[,class][,{','.join(MANIFEST_BOX_COLUMNS)}]"
        )
    rows: dict[str, dict[str, str]] = {}
    for i, row in enumerate(df.to_dict("records"), start=2):  # line 1 is the header
        rel = _relative_to_root(row["file"].strip(), root, path.parent)
        if not row["patient_id"].strip():
            raise DataError(f"data.manifest {path} line {i}: empty patient_id for {row['file']!r}")
        if rel in rows:
            raise DataError(f"data.manifest {path} line {i}: {row['file']!r} is listed twice")
        rows[rel] = dict(row, _line=str(i), _source=str(path))
    return rows


def _relative_to_root(name: str, root: Path, base: Path) -> str:
    """A path from a manifest/COCO file -> POSIX path relative to data.root, if it is under it."""
    name = name.replace("\\", "/")
    candidate = Path(name)
    if (root / candidate).is_file() or candidate.is_absolute():
        try:
            return (root / candidate).resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            return name
    try:  # relative to the manifest's own folder, e.g. images/C1/x.png next to images/
        return (base / candidate).resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return candidate.as_posix()


def _compile_patient_regex(pattern: str) -> re.Pattern:
    try:
        rx = re.compile(pattern)
    except re.error as exc:
        raise DataError(f"data.patient_regex '{pattern}': invalid regular expression ({exc})") from None
    if "patient" not in rx.groupindex and rx.groups < 1:
        raise DataError(f"data.patient_regex '{pattern}': needs a named group (?P<patient>...) or one group")
    return rx


def patient_from_name(rx: re.Pattern, name: str) -> str | None:
    m = rx.search(name)
    if not m:
        return None
    value = m.group("patient") if "patient" in rx.groupindex else m.group(1)
    return value or None


def _assign_patients(ds: Dataset, manifest, regex, data) -> None:
    for rec in ds.records:
        row = manifest.get(rec.file) if manifest else None
        if row is not None:
            rec.patient, rec.patient_source = row["patient_id"].strip(), "manifest"
            claimed = (row.get("class") or "").strip()
            if claimed and claimed != rec.class_name:
                rec.manifest_class = claimed
            continue
        if manifest is not None:
            ds.notes["no_manifest_entry"].append(rec.file)
        if regex is not None:
            patient = patient_from_name(regex, Path(rec.file).name)
            if patient is None:  # counted and listed by validate (stop, or skip with data.on_bad_file)
                ds.unmatched.append(rec.file)
                continue
            rec.patient, rec.patient_source = patient, "regex"
    if manifest:
        known = {r.file for r in ds.records}
        ds.notes["manifest_unknown"] += [f for f in manifest if f not in known]


# --------------------------------------------------------------------------- boxes
def _parse_box(values: Iterable[Any], where: str) -> Box | None:
    vals = [str(v).strip() if v is not None else "" for v in values]
    if all(v in ("", "nan", "None") for v in vals):
        return None
    try:
        x, y, w, h = (float(v) for v in vals)
    except ValueError:
        raise DataError(f"{where}: box must be four numbers x, y, w, h (got {vals})") from None
    if not (w > 0 and h > 0) or not np.isfinite([x, y, w, h]).all():
        raise DataError(f"{where}: box width and height must be positive (got {vals})")
    return (x, y, w, h)


def _boxes_from_manifest(ds: Dataset, manifest) -> None:
    by_file = ds.by_file()
    for rel, row in manifest.items():
        present = [c for c in MANIFEST_BOX_COLUMNS if c in row]
        if not present or rel not in by_file:
            continue
        if len(present) != 4:
            raise DataError(f"data.manifest {row['_source']}: box columns must be all of {', '.join(MANIFEST_BOX_COLUMNS)}")
        by_file[rel].box = _parse_box([row[c] for c in MANIFEST_BOX_COLUMNS], f"data.manifest {row['_source']} line {row['_line']}")


def _boxes_from_coco(ds: Dataset, path: Path) -> None:
    """COCO boxes (CVAT export) win over manifest boxes; file_name relative to data.root,
    relative to the JSON's folder, or a bare file name when it is unique in the dataset."""
    if not path.is_file():
        raise DataError(f"data.annotations: file not found: {path} (set data.annotations: null to go without)")
    try:
        coco = json.loads(path.read_text())
        images = {img["id"]: str(img["file_name"]) for img in coco["images"]}
        annotations = list(coco.get("annotations", []))
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"data.annotations {path}: not COCO JSON with images[id, file_name] ({type(exc).__name__}: {exc})") from None

    by_file = ds.by_file()
    by_name: dict[str, list[str]] = defaultdict(list)
    for rel in by_file:
        by_name[Path(rel).name].append(rel)

    def resolve(file_name: str) -> str | None:
        rel = _relative_to_root(file_name, ds.root, path.parent)
        if rel in by_file:
            return rel
        matches = by_name.get(Path(file_name.replace("\\", "/")).name, [])
        if len(matches) > 1:
            raise DataError(
                f"data.annotations {path}: file_name {file_name!r} matches {len(matches)} images "
                f"({', '.join(matches[:3])}); use paths relative to data.root"
            )
        return matches[0] if matches else None

    resolved = {image_id: resolve(name) for image_id, name in images.items()}
    if images and not any(resolved.values()):
        example = next(iter(images.values()))
        raise DataError(
            f"data.annotations {path}: none of its {len(images)} images is under data.root {ds.root} "
            f"(e.g. {example!r}); file_name must be relative to data.root or a bare file name"
        )
    boxes: dict[str, list[Box]] = defaultdict(list)
    for ann in annotations:
        image_id = ann.get("image_id")
        if image_id not in images:
            ds.notes["annotations_unknown"].append(
                {"annotation": ann.get("id"), "image": image_id, "reason": "image_id not listed in images"})
            continue
        rel = resolved[image_id]
        if rel is None:
            ds.notes["annotations_unknown"].append(
                {"annotation": ann.get("id"), "image": images[image_id], "reason": "no such image under data.root"})
            continue
        if "bbox" not in ann:
            continue  # a segmentation-only annotation carries no box
        box = _parse_box(ann["bbox"], f"data.annotations {path} annotation {ann.get('id')}")
        if box is not None:
            boxes[rel].append(box)
    for rel, found in boxes.items():
        if len(found) > 1:
            ds.notes["multiple_boxes"].append({"file": rel, "boxes": len(found), "used": "largest"})
        by_file[rel].box = max(found, key=lambda b: b[2] * b[3])


# ------------------------------------------------------------------------ validate
def find_unreadable(records: Iterable[ImageRecord], max_pixels: int | None = None) -> dict[str, str]:
    """Decode every image: file -> reason for those that fail (prepare gets this for free)."""
    bad: dict[str, str] = {}
    for rec in records:
        try:
            read_image(rec.path, max_pixels)
        except DataError as exc:
            bad[rec.file] = _reason(exc, rec)
    return bad


def _reason(exc: Exception, rec: ImageRecord) -> str:
    text = str(exc)
    return text.split(": ", 1)[1] if text.startswith(str(rec.path)) and ": " in text else text


def validate(
    ds: Dataset,
    folds: int | None = None,
    *,
    require_boxes: bool = False,
    unreadable: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Apply the stop/skip rules and return the report; raise ValidationFailed on a stop.

    `unreadable` maps file -> reason when the caller already decoded everything (prepare);
    None decodes every image here.  The report's "kept" lists the files that survive.
    """
    folds = folds if folds is not None else ds.folds
    if unreadable is None:
        unreadable = find_unreadable(ds.records, ds.max_pixels)
    unreadable = {**ds.broken, **unreadable}
    excluded: dict[str, str] = {}
    errors: list[str] = []

    # Label conflicts first: they make every later count wrong.
    groups: dict[str, list[ImageRecord]] = defaultdict(list)
    for rec in ds.records:
        groups[rec.sha256].append(rec)
    within, across = [], []
    for sha, recs in groups.items():
        if len(recs) < 2:
            continue
        classes = sorted({r.class_name for r in recs})
        entry = {"sha256": sha, "files": [r.file for r in recs], "classes": classes}
        (across if len(classes) > 1 else within).append(entry)
    mismatched = [r for r in ds.records if r.manifest_class]
    if across or mismatched:
        if ds.on_label_conflict == "skip":
            for entry in across:
                for f in entry["files"]:
                    excluded[f] = f"label conflict: the same image is in {' and '.join(entry['classes'])}"
            for r in mismatched:
                excluded[r.file] = f"label conflict: folder {r.class_name}, manifest class {r.manifest_class}"
        elif across:
            e = across[0]
            errors.append(
                f"label conflict: the same image is in {' and '.join(e['classes'])}: {' = '.join(e['files'][:3])} "
                f"({len(across)} such image(s)); remove the wrong copy or set data.on_label_conflict: skip"
            )
        else:
            r = mismatched[0]
            errors.append(
                f"label conflict: {r.file} is in folder {r.class_name} but the manifest says class {r.manifest_class} "
                f"({len(mismatched)} such row(s)); fix the manifest or set data.on_label_conflict: skip"
            )

    bad = {f: reason for f, reason in unreadable.items() if f not in excluded}
    missing_box = [r.file for r in ds.records if require_boxes and r.box is None and r.file not in excluded and r.file not in bad]
    unmatched = [f for f in ds.unmatched if f not in excluded and f not in bad]
    candidates = [r for r in ds.records if r.file not in excluded and r.file not in bad]
    if missing_box and len(missing_box) == len(candidates):
        # skipping them all would leave nothing: no box anywhere means full mode, not skip
        errors.append(f"no image has a box ({len(missing_box)} images): prepare.mode crop needs one per image; use "
                      "prepare.mode: full (or auto), or give boxes in data.annotations / the manifest")
        missing_box = []
    if ds.on_bad_file == "skip":
        excluded.update({f: f"unreadable: {reason}" for f, reason in bad.items()})
        excluded.update({f: "no box for crop mode" for f in missing_box})
        excluded.update({f: f"no patient: data.patient_regex '{ds.patient_regex}' does not match" for f in unmatched})
    else:
        if bad:
            f = next(iter(bad))
            errors.append(
                f"{len(bad)} unreadable image(s), e.g. {f}: {bad[f]}; fix or remove them, or set data.on_bad_file: skip"
            )
        if missing_box:
            errors.append(
                f"{len(missing_box)} image(s) have no box for prepare.mode crop, e.g. {missing_box[0]}; "
                "add boxes to data.annotations / the manifest, or set data.on_bad_file: skip"
            )
        if unmatched:
            shown = ", ".join(Path(f).name for f in unmatched[:MAX_LISTED])
            more = f" (+{len(unmatched) - MAX_LISTED} more)" if len(unmatched) > MAX_LISTED else ""
            errors.append(
                f"data.patient_regex '{ds.patient_regex}' does not match {len(unmatched)} of {len(ds.records)} file "
                f"names: {shown}{more}; fix the regex (it is searched in the file name) or set data.on_bad_file: skip"
            )

    kept = [r for r in ds.records if r.file not in excluded]
    counts = {}
    for cls in ds.classes:
        recs_found = [r for r in ds.records if r.class_name == cls]
        recs_kept = [r for r in kept if r.class_name == cls]
        counts[cls] = {"label": ds.classes.index(cls), "images_found": len(recs_found), "images": len(recs_kept),
                       "patients": len({r.patient for r in recs_kept})}
    if folds is not None:
        for cls, c in counts.items():
            if c["patients"] < folds:
                errors.append(
                    f"class {cls!r} has {c['patients']} patient(s) but prepare.folds={folds} needs at least {folds} "
                    f"per class: add {folds - c['patients']} more patient(s) of {cls} or lower prepare.folds"
                )
    per_patient = Counter(r.patient for r in kept)
    classes_of = defaultdict(set)
    for r in kept:
        classes_of[r.patient].add(r.class_name)

    report: dict[str, Any] = {
        "status": "failed" if errors else "ok",
        "errors": errors,
        "data_root": str(ds.root),
        "classes": ds.classes,
        "positive_class": ds.positive_class,
        "folds": folds,
        "policy": {"on_bad_file": ds.on_bad_file, "on_label_conflict": ds.on_label_conflict},
        "n_found": len(ds.records),
        "n_kept": len(kept),
        "counts": counts,
        "patient_source": dict(Counter(r.patient_source for r in ds.records)),
        "images_per_patient": dict(sorted(per_patient.items())),
        "patients_in_several_classes": sorted(p for p, c in classes_of.items() if len(c) > 1),
        "ignored": ds.ignored,
        "unreadable": [{"file": f, "reason": r} for f, r in unreadable.items()],
        "duplicates_within_class": within,
        "duplicates_across_classes": across,
        "manifest_class_mismatch": [{"file": r.file, "folder": r.class_name, "manifest": r.manifest_class} for r in mismatched],
        "missing_box": missing_box if require_boxes else [],
        "patient_regex": ds.patient_regex,
        "patient_regex_auto": ds.patient_regex_auto,
        "patient_regex_unmatched": list(ds.unmatched),
        "excluded": [{"file": f, "reason": r} for f, r in excluded.items()],
        "kept": [r.file for r in kept],
    }
    for key, values in ds.notes.items():
        report[key] = list(values)
    if errors:
        more = f" (+{len(errors) - 1} more problem(s) in the report)" if len(errors) > 1 else ""
        raise ValidationFailed(errors[0] + more, report)
    return report


# --------------------------------------------------------------------------- naming
# Names of data folders that say nothing about the dataset; the parent folder names it instead.
_GENERIC_DIRS = {"images", "image", "raw", "data", "png", "dicom", "img"}


def dataset_name(params: Params) -> str:
    """data.name, else the innermost folder of data.root that is not a generic name (raw, images...)."""
    if params.data.name:
        return params.data.name
    root = Path(params.data.root)
    parts = [p for p in root.parts if p not in ("", ".", "/")]
    for part in reversed(parts):
        if part.lower() not in _GENERIC_DIRS:
            return part
    return root.name or "dataset"


# --------------------------------------------------------------------------- folds
def fold_summary(records: list[ImageRecord], fold: np.ndarray, classes: list[str]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for k in range(int(fold.max()) + 1 if len(fold) else 0):
        members = [r for r, f in zip(records, fold) if f == k]
        row = {cls: sum(r.class_name == cls for r in members) for cls in classes}
        row["patients"] = len({r.patient for r in members})
        out[str(k)] = row
    return out


# --------------------------------------------------------------------------- table
def format_report(report: dict[str, Any]) -> str:
    """The report as the table printed by prepare (report.json keeps every entry)."""
    lines = [f"dataset {report['data_root']}: {len(report['classes'])} classes, "
             f"{report['n_found']} images found, {report['n_kept']} kept"]
    name_w = max([12, *(len(c) + 2 for c in report["classes"])])  # long class names keep their columns
    lines.append(f"  {'class':<{name_w}}{'label':>6}{'found':>8}{'kept':>8}{'patients':>10}")
    for cls, c in report["counts"].items():
        mark = "  (positive)" if cls == report["positive_class"] else ""
        lines.append(f"  {cls:<{name_w}}{c['label']:>6}{c['images_found']:>8}{c['images']:>8}{c['patients']:>10}{mark}")
    if report.get("patient_regex"):
        how = " (auto: the file names share patient ids; null counts each image as its own patient)" \
            if report.get("patient_regex_auto") else ""
        lines.append(f"  patients from file names: data.patient_regex '{report['patient_regex']}'{how}")
    if report.get("mode"):
        lines.append(f"  prepare.mode {report['mode']}")
    per_patient = list(report.get("images_per_patient", {}).values())
    if per_patient:
        lines.append(f"  images per patient: min {min(per_patient)}, max {max(per_patient)}, "
                     f"mean {sum(per_patient) / len(per_patient):.2f}")

    def section(title: str, items: list, fmt) -> None:
        if not items:
            return
        lines.append(f"{title}: {len(items)}")
        lines.extend(f"  {fmt(it)}" for it in items[:MAX_LISTED])
        if len(items) > MAX_LISTED:
            lines.append(f"  ... and {len(items) - MAX_LISTED} more (see report.json)")

    section("ignored (not images)", report.get("ignored", []), lambda i: f"{i['file']}: {i['reason']}")
    section("unreadable", report.get("unreadable", []), lambda i: f"{i['file']}: {i['reason']}")
    section("duplicates within a class (kept, held in one fold)", report.get("duplicates_within_class", []),
            lambda i: " = ".join(i["files"]))
    section("label conflicts (same image in two classes)", report.get("duplicates_across_classes", []),
            lambda i: f"{' = '.join(i['files'])} ({' vs '.join(i['classes'])})")
    section("manifest class differs from folder", report.get("manifest_class_mismatch", []),
            lambda i: f"{i['file']}: folder {i['folder']}, manifest {i['manifest']}")
    section("images without a box", report.get("missing_box", []), str)
    section("annotations for unknown images", report.get("annotations_unknown", []),
            lambda i: f"annotation {i['annotation']} -> {i['image']}: {i['reason']}")
    section("manifest rows for unknown files", report.get("manifest_unknown", []), str)
    section("images missing from the manifest (patient from regex or file)", report.get("no_manifest_entry", []), str)
    section("images with several boxes (largest used)", report.get("multiple_boxes", []),
            lambda i: f"{i['file']}: {i['boxes']} boxes")
    section("file names the patient regex does not match", report.get("patient_regex_unmatched", []), str)
    section("excluded", report.get("excluded", []), lambda i: f"{i['file']}: {i['reason']}")
    if report.get("fold_counts"):
        classes = report["classes"]
        lines.append("images per fold:")
        widths = [max(8, len(c) + 2) for c in classes]  # headers never run together
        lines.append(f"  {'fold':<6}" + "".join(f"{c:>{w}}" for c, w in zip(classes, widths)) + f"{'patients':>10}")
        for k, row in report["fold_counts"].items():
            lines.append(f"  {k:<6}" + "".join(f"{row[c]:>{w}}" for c, w in zip(classes, widths))
                         + f"{row['patients']:>10}")
    for err in report.get("errors", []):
        lines.append(f"STOP: {err}")
    return "\n".join(lines)
