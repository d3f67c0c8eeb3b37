"""Output folders that cannot destroy data: the overlap rule and the ownership marker.

Two rules, checked by every stage before it does any work (and the second again by
`src.core.fileio.atomic_dir` when it swaps a folder in):

1. Overlap (`check_output`): a stage's output must not equal, contain or lie inside any of its
   inputs, compared as resolved absolute paths (symlinks and `..` followed), so a relative
   path and a link to the same folder count as the same place.  An input is what the stage
   reads, at the grain it reads it: a folder it opens whole (data.root, the prepared store,
   train.out, the masks folder) or a single file (data.manifest, `{evaluate.out}/metrics.json`).
   That grain is what lets the shipped nesting pass and still catches real damage:
   register.out=reports/register lies inside evaluate.out=reports, but register reads only
   reports/metrics.json, which reports/register neither equals, contains nor lies inside;
   gradcam.out=reports/gradcam lies inside evaluate.out, but neither stage reads the other's
   files.  `prepare.out=/x` with `data.root=/x` equals an input and is refused; so is
   `prepare.out=/x` with data.root=/x/images (the swap would take the images with it) and
   `prepare.out=/x/images/store` (the store would become a class folder of the data).
   Outputs of one stage that must stay apart (phantom.out, phantom.masks_out) are checked
   pairwise by `check_outputs_apart`.

2. Ownership (`check_replaceable`): a stage replaces a folder whole only when that folder
   does not exist, is empty, carries our marker (`.bone-health-output`, written into every
   folder `atomic_dir` swaps in; it holds the setting that names the folder, e.g.
   `prepare.out`, or `bone-health` when the writer did not say), or has the exact layout an
   earlier, unmarked version of a stage wrote (`LEGACY_LAYOUTS`: without that, the first run
   after upgrading would refuse the pipeline's own data/prepared).  A marker naming another
   setting is refused too: prepare.out pointed at the phantom's folder must not delete it.

Every refusal is one line naming the setting(s), the path(s) and what to do.
"""
from __future__ import annotations

import csv
import json
from collections.abc import Callable, Mapping
from pathlib import Path

from src.core.errors import BoneHealthError

MARKER_NAME = ".bone-health-output"
GENERIC_OWNER = "bone-health"  # what the marker holds when the writer named no setting

PathLike = str | Path


# ------------------------------------------------------------------------ the overlap rule
def resolved(path: PathLike) -> Path:
    """Absolute, symlinks and `..` resolved (as far as the path exists), `~` expanded."""
    return Path(path).expanduser().resolve()


def overlaps(a: PathLike, b: PathLike) -> bool:
    """Whether a equals b, contains it, or lies inside it."""
    ra, rb = resolved(a), resolved(b)
    return ra == rb or ra in rb.parents or rb in ra.parents


def _shown(path: PathLike) -> str:
    """The path as the user gave it, plus where it really points when that differs."""
    real = resolved(path)
    return str(path) if Path(path).expanduser().absolute() == real else f"{path} (-> {real})"


def check_output(out_key: str, out_path: PathLike, inputs: Mapping[str, PathLike | None]) -> None:
    """Refuse an output that equals, contains or lies inside one of `inputs` ({key: path};
    None means the input is not used)."""
    for in_key, in_path in inputs.items():
        if in_path is not None and overlaps(out_path, in_path):
            raise BoneHealthError(f"{out_key} {_shown(out_path)} overlaps {in_key} {_shown(in_path)}: "
                                  "an output must not equal, contain or lie inside an input")


def check_outputs_apart(outputs: Mapping[str, PathLike]) -> None:
    """Refuse two outputs of one stage that equal or contain each other (each is replaced whole)."""
    items = list(outputs.items())
    for i, (key_a, a) in enumerate(items):
        for key_b, b in items[i + 1:]:
            if overlaps(a, b):
                raise BoneHealthError(f"{key_a} {_shown(a)} overlaps {key_b} {_shown(b)}: "
                                      "two outputs of a stage must not equal or contain each other")


# ---------------------------------------------------------------------- the ownership marker
def write_marker(folder: PathLike, key: str | None = None) -> Path:
    """Mark `folder` as written by bone-health (for `key`, the setting that names it)."""
    path = Path(folder) / MARKER_NAME
    path.write_text(f"{key or GENERIC_OWNER}\n", encoding="utf-8")
    return path


def marker_owner(folder: PathLike) -> str | None:
    """What the folder's marker holds, or None when it has none."""
    path = Path(folder) / MARKER_NAME
    if not path.is_file():
        return None
    try:
        return path.read_text(encoding="utf-8").strip() or GENERIC_OWNER
    except (OSError, UnicodeDecodeError):
        return GENERIC_OWNER  # unreadable but present: still ours, by its name


def check_replaceable(path: PathLike, key: str | None = None) -> None:
    """Refuse to replace `path` unless it is absent, empty, marked by us (for `key`) or an
    unmarked output of an earlier version (see the module docstring)."""
    path = Path(path)
    setting = f"another {key}" if key else "another output folder"
    if not path.exists():
        return
    if not path.is_dir():
        raise BoneHealthError(f"{path} exists and is not a folder; move it away or choose {setting}")
    if not any(path.iterdir()):
        return
    owner = marker_owner(path)
    if owner is not None:
        if key and owner not in (key, GENERIC_OWNER):
            raise BoneHealthError(f"{path} holds bone-health's {owner} output, not {key}; "
                                  f"move it away or choose {setting}")
        return
    if is_legacy_output(path, key):
        return
    raise BoneHealthError(f"{path} exists, is not empty and was not written by bone-health; "
                          f"move it away or choose {setting}")


# ----------------------------------------- outputs of versions that wrote no marker yet
# The names are spelled out here, not imported: src.core imports nothing of the project, and
# these describe what *earlier* versions wrote, so they must not follow a later rename.
def _entries(folder: Path) -> tuple[set[str], set[str]]:
    """(file names, folder names) directly inside `folder`."""
    files, dirs = set(), set()
    for item in folder.iterdir():
        (dirs if item.is_dir() else files).add(item.name)
    return files, dirs


def _first_line(path: Path) -> str:
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            return ",".join(next(csv.reader(fh), []))
    except (OSError, UnicodeDecodeError, csv.Error):
        return ""


def _json_object(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _is_prepared_store(folder: Path) -> bool:
    """images.npy, meta.json (with n_images), manifest.csv, report.json and nothing else."""
    files, dirs = _entries(folder)
    return (not dirs and {"images.npy", "meta.json"} <= files
            <= {"images.npy", "meta.json", "manifest.csv", "report.json"}
            and "n_images" in _json_object(folder / "meta.json"))


def _is_phantom_images(folder: Path) -> bool:
    """Class folders, manifest.csv with the phantom's header, and the phantom's COCO file
    (its info.description says so): a user's own data folder never matches all three."""
    files, _ = _entries(folder)
    coco_info = _json_object(folder / "annotations.json").get("info")
    return (files == {"manifest.csv", "annotations.json"}
            and _first_line(folder / "manifest.csv") == "file,patient_id,class,box_x,box_y,box_w,box_h"
            and isinstance(coco_info, dict) and coco_info.get("description") == "bone-health phantom")


def _is_phantom_masks(folder: Path) -> bool:
    files, _ = _entries(folder)
    return files == {"truth.csv"} and _first_line(folder / "truth.csv") == \
        "file,patient_id,class,label,visit,severity,cortex_mm,mm_per_px"


def _is_gradcam_images(folder: Path) -> bool:
    """images.csv (+ example.png) and class folders holding only PNGs ({gradcam.out}/images)."""
    files, dirs = _entries(folder)
    if not ("images.csv" in files and files <= {"images.csv", "example.png"}):
        return False
    return all(item.is_file() and item.suffix == ".png" for d in dirs for item in (folder / d).iterdir())


LEGACY_LAYOUTS: dict[str, Callable[[Path], bool]] = {
    "prepare.out": _is_prepared_store,
    "phantom.out": _is_phantom_images,
    "phantom.masks_out": _is_phantom_masks,
    "gradcam.out": _is_gradcam_images,
}


def is_legacy_output(folder: PathLike, key: str | None = None) -> bool:
    """Whether `folder` is an unmarked output an earlier version wrote for `key` (any key when None)."""
    folder = Path(folder)
    if key is None:
        return any(looks(folder) for looks in LEGACY_LAYOUTS.values())
    looks = LEGACY_LAYOUTS.get(key)
    return looks is not None and looks(folder)
