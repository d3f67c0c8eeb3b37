"""src.data.dataset: discovery (classes, patients, boxes), the validation rules and the folds."""
import json
import shutil

import numpy as np
import pytest

from src.core.config import DataParams
from src.core.errors import DataError
from src.data.dataset import (
    ValidationFailed,
    discover,
    format_report,
    validate,
)
from src.data.patient_ids import CANDIDATES
from src.data.splits import assign_folds, fold_groups
from tests.prepare_helpers import BOX, make_dataset


@pytest.fixture()
def phantom(tmp_path):
    return make_dataset(tmp_path / "phantom", patients_per_class=3, visits=2)


def _data(paths, **kw) -> DataParams:
    base = {"root": str(paths["root"]), "manifest": str(paths.get("manifest")) if paths.get("manifest") else None,
            "annotations": str(paths.get("annotations")) if paths.get("annotations") else None}
    base.update(kw)
    return DataParams(**base)


# --------------------------------------------------------------------- discover
def test_discover_reads_classes_patients_boxes(phantom):
    ds = discover(_data(phantom), folds=3)
    assert ds.classes == ["C1", "C3"] and ds.positive_class == "C3"
    assert len(ds.records) == 12
    rec = ds.by_file()["C3/C3P0001_v2.png"]
    assert (rec.class_name, rec.label, rec.patient, rec.patient_source) == ("C3", 1, "C3P0001", "manifest")
    assert rec.box == BOX
    assert len(rec.sha256) == 64


def test_patients_from_regex_and_default(phantom):
    ds = discover(_data(phantom, manifest=None, patient_regex=r"^(?P<patient>C\dP\d+)_"))
    assert {r.patient for r in ds.records if r.class_name == "C1"} == {"C1P0000", "C1P0001", "C1P0002"}
    assert all(r.patient_source == "regex" for r in ds.records)
    ds = discover(_data(phantom, manifest=None, patient_regex=None))
    assert [r.patient for r in ds.records][:2] == ["C1/C1P0000_v1.png", "C1/C1P0000_v2.png"]


def test_auto_patient_regex_groups_the_visits_of_one_patient(phantom):
    """No manifest: the file names' shared id (C1P0000_v1, C1P0000_v2) groups a patient's images,
    so no patient can sit in a training fold and its test fold."""
    ds = discover(_data(phantom, manifest=None))  # patient_regex: auto is the default
    assert ds.patient_regex == CANDIDATES[1]  # the first token: C1P0000 of C1P0000_v1.png
    assert {r.patient for r in ds.records if r.class_name == "C1"} == {"C1P0000", "C1P0001", "C1P0002"}
    report = validate(ds, folds=3, unreadable={})
    assert report["patient_regex"] == ds.patient_regex
    with_manifest = discover(_data(phantom))  # a manifest names the patients: auto stays out of it
    assert with_manifest.patient_regex is None and {r.patient_source for r in with_manifest.records} == {"manifest"}


def test_suggested_patient_regex_only_when_names_share_ids():
    from src.data.patient_ids import suggest_patient_regex

    assert suggest_patient_regex(["P0042_2019.jpg", "P0042_2021.jpg", "P0043_2020.jpg"]) is not None
    assert suggest_patient_regex(["0001.jpg", "0002.jpg", "0003.jpg"]) is None  # one image each: nothing to group
    assert suggest_patient_regex([f"IMG_{i:04d}.png" for i in range(30)]) is None  # "IMG" is no patient
    assert suggest_patient_regex([f"2019_{i:04d}.png" for i in range(30)]) is None  # one "patient" of 30


def test_regex_that_does_not_match_counts_and_lists_the_files(phantom):
    ds = discover(_data(phantom, manifest=None, patient_regex=r"^X(\d+)"), folds=3)
    with pytest.raises(ValidationFailed, match=r"data.patient_regex '\^X\(\\d\+\)' does not match 12 of 12 file "
                                                r"names: C1P0000_v1.png, C1P0000_v2.png, .*C3P0001_v2.png \(\+2 more\); "
                                                r"fix the regex .* or set data.on_bad_file: skip"):
        validate(ds, unreadable={})


def test_on_bad_file_skip_also_skips_names_the_regex_cannot_match(phantom):
    (phantom["root"] / "C1" / "scan.png").write_bytes((phantom["root"] / "C1" / "C1P0000_v1.png").read_bytes()[:-1])
    shutil.copy(phantom["root"] / "C1" / "C1P0001_v1.png", phantom["root"] / "C1" / "odd-name.png")
    ds = discover(_data(phantom, manifest=None, patient_regex=r"^(C\dP\d+)_", on_bad_file="skip"), folds=3)
    report = validate(ds, unreadable={})
    skipped = {e["file"]: e["reason"] for e in report["excluded"]}
    assert skipped["C1/odd-name.png"].startswith("no patient: data.patient_regex")
    assert "C1/odd-name.png" not in report["kept"] and report["patient_regex_unmatched"] == ["C1/odd-name.png",
                                                                                            "C1/scan.png"]


def test_manifest_boxes_used_without_coco(phantom):
    ds = discover(_data(phantom, annotations=None))
    assert all(r.box == BOX for r in ds.records)


def test_missing_root(tmp_path):
    with pytest.raises(DataError, match=r"data.root: folder not found: .*nowhere"):
        discover(DataParams(root=str(tmp_path / "nowhere"), manifest=None, annotations=None))


def test_root_without_class_folders(tmp_path):
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(b"x")
    with pytest.raises(DataError, match=r"no class sub-folders; expected one folder per class"):
        discover(DataParams(root=str(tmp_path / "flat"), manifest=None, annotations=None))


def test_root_with_one_class_only(phantom):
    shutil.rmtree(phantom["root"] / "C3")
    with pytest.raises(DataError, match=r"only one class folder \('C1'\); need at least two"):
        discover(_data(phantom))


def test_non_image_files_are_ignored_and_reported(phantom):
    (phantom["root"] / "C1" / "notes.txt").write_text("scan log")
    (phantom["root"] / "C1" / ".DS_Store").write_bytes(b"\0")
    (phantom["root"] / "README.md").write_text("readme")
    ds = discover(_data(phantom), folds=3)
    assert len(ds.records) == 12
    report = validate(ds, unreadable={})
    assert {"file": "C1/notes.txt", "reason": "extension '.txt' not in data.extensions"} in report["ignored"]
    assert {"file": "README.md", "reason": "not inside a class folder"} in report["ignored"]
    assert "C1/notes.txt: extension '.txt' not in data.extensions" in format_report(report)


def test_extensionless_dicom_is_found(phantom):
    from tests.prepare_helpers import write_dicom

    write_dicom(phantom["root"] / "C1" / "IM0001", np.zeros((4, 4), np.uint16))
    (phantom["root"] / "C1" / "LOG").write_text("not dicom")
    ds = discover(_data(phantom))
    assert "C1/IM0001" in ds.by_file()
    assert {"file": "C1/LOG", "reason": "no extension and not DICOM"} in ds.ignored


# ------------------------------------------------------------------------ COCO
def test_coco_unknown_images_are_reported(phantom):
    coco = json.loads(phantom["annotations"].read_text())
    coco["images"].append({"id": 999, "file_name": "C1/ghost.png"})
    coco["annotations"].append({"id": 5000, "image_id": 999, "bbox": [1, 1, 2, 2]})
    coco["annotations"].append({"id": 5001, "image_id": 12345, "bbox": [1, 1, 2, 2]})
    phantom["annotations"].write_text(json.dumps(coco))
    report = validate(discover(_data(phantom), folds=3), unreadable={})
    assert {"annotation": 5000, "image": "C1/ghost.png", "reason": "no such image under data.root"} in report["annotations_unknown"]
    assert {"annotation": 5001, "image": 12345, "reason": "image_id not listed in images"} in report["annotations_unknown"]
    assert "annotations for unknown images: 2" in format_report(report)


def test_coco_pointing_only_at_unknown_images_stops(phantom):
    coco = json.loads(phantom["annotations"].read_text())
    for img in coco["images"]:
        img["file_name"] = "other_study/" + img["file_name"].replace("/", "_")
    phantom["annotations"].write_text(json.dumps(coco))
    with pytest.raises(DataError, match=r"annotations.json: none of its 12 images is under data.root"):
        discover(_data(phantom))


def test_coco_bare_basenames_resolve(phantom):
    coco = json.loads(phantom["annotations"].read_text())
    for img, ann in zip(coco["images"], coco["annotations"]):
        img["file_name"] = img["file_name"].split("/")[-1]
        ann["bbox"] = [1, 2, 3, 4]
    phantom["annotations"].write_text(json.dumps(coco))
    ds = discover(_data(phantom))
    assert all(r.box == (1.0, 2.0, 3.0, 4.0) for r in ds.records)


# ---------------------------------------------------------------- validation
def test_label_conflict_stops_by_default_and_skip_excludes(phantom):
    shutil.copy(phantom["root"] / "C1" / "C1P0000_v1.png", phantom["root"] / "C3" / "copy.png")
    ds = discover(_data(phantom), folds=3)
    with pytest.raises(ValidationFailed, match=r"label conflict: the same image is in C1 and C3: "
                       r"C1/C1P0000_v1.png = C3/copy.png .*data.on_label_conflict: skip") as exc:
        validate(ds, unreadable={})
    assert exc.value.report["duplicates_across_classes"][0]["files"] == ["C1/C1P0000_v1.png", "C3/copy.png"]
    ds = discover(_data(phantom, on_label_conflict="skip"), folds=3)
    report = validate(ds, unreadable={})
    assert "C3/copy.png" not in report["kept"] and "C1/C1P0000_v1.png" not in report["kept"]
    assert report["n_kept"] == 11


def test_duplicates_within_class_kept_and_grouped(phantom):
    shutil.copy(phantom["root"] / "C1" / "C1P0000_v1.png", phantom["root"] / "C1" / "C1P0002_v9.png")
    ds = discover(_data(phantom, manifest=None, patient_regex=r"^(C\dP\d+)_"), folds=3)
    report = validate(ds, unreadable={})
    assert report["duplicates_within_class"][0]["files"] == ["C1/C1P0000_v1.png", "C1/C1P0002_v9.png"]
    assert report["n_kept"] == 13
    groups = dict(zip((r.file for r in ds.records), fold_groups(ds.records)))
    # The copy links patients 0 and 2: they must share a fold.
    assert groups["C1/C1P0002_v1.png"] == groups["C1/C1P0000_v2.png"]
    assert groups["C1/C1P0001_v1.png"] != groups["C1/C1P0000_v1.png"]


def test_too_few_patients_says_how_many_are_needed(phantom):
    ds = discover(_data(phantom), folds=5)
    with pytest.raises(ValidationFailed, match=r"class 'C1' has 3 patient\(s\) but prepare.folds=5 needs at least 5 per class: "
                       r"add 2 more patient\(s\) of C1 or lower prepare.folds"):
        validate(ds, unreadable={})


def test_unreadable_files_stop_or_skip(phantom):
    (phantom["root"] / "C1" / "zero.png").write_bytes(b"")
    good = (phantom["root"] / "C3" / "C3P0000_v1.png").read_bytes()
    (phantom["root"] / "C3" / "cut.png").write_bytes(good[: len(good) // 2])
    ds = discover(_data(phantom), folds=3)
    with pytest.raises(ValidationFailed, match=r"2 unreadable image\(s\), e.g. C1/zero.png: empty file \(0 bytes\); .*on_bad_file: skip"):
        validate(ds)  # decodes everything itself
    ds = discover(_data(phantom, on_bad_file="skip"), folds=3)
    report = validate(ds)
    reasons = {u["file"]: u["reason"] for u in report["unreadable"]}
    assert reasons["C1/zero.png"] == "empty file (0 bytes)"
    assert reasons["C3/cut.png"].startswith("cannot decode PNG: truncated or corrupt file")
    assert report["n_kept"] == 12 and "C3/cut.png" not in report["kept"]


def test_link_loops_and_dangling_links_are_reported_as_unreadable(phantom):
    """A symlink loop or a link to nowhere is not a file to rglob: it used to vanish from the report."""
    (phantom["root"] / "C1" / "loop_a.png").symlink_to(phantom["root"] / "C1" / "loop_b.png")
    (phantom["root"] / "C1" / "loop_b.png").symlink_to(phantom["root"] / "C1" / "loop_a.png")
    (phantom["root"] / "C3" / "gone.png").symlink_to(phantom["root"] / "nowhere.png")
    ds = discover(_data(phantom), folds=3)
    with pytest.raises(ValidationFailed, match=r"3 unreadable image\(s\), e.g. C1/loop_a.png: broken symbolic link "
                                               r"or link loop; .*on_bad_file: skip"):
        validate(ds, unreadable={})
    report = validate(discover(_data(phantom, on_bad_file="skip"), folds=3), unreadable={})
    assert {u["file"] for u in report["unreadable"]} == {"C1/loop_a.png", "C1/loop_b.png", "C3/gone.png"}
    assert report["n_kept"] == 12 and "unreadable" in format_report(report)


def test_crop_mode_needs_boxes(phantom):
    ds = discover(_data(phantom, annotations=None), folds=3)
    ds.records[0].box = None
    with pytest.raises(ValidationFailed, match=r"1 image\(s\) have no box for prepare.mode crop, e.g. C1/C1P0000_v1.png"):
        validate(ds, require_boxes=True, unreadable={})
    assert validate(ds, require_boxes=False, unreadable={})["status"] == "ok"


@pytest.mark.parametrize("on_bad_file", ["stop", "skip"])
def test_crop_mode_without_any_box_says_full_mode_not_skip(phantom, on_bad_file):
    """Skipping every image was the old advice: it left 0 patients.  No box anywhere means full mode."""
    ds = discover(_data(phantom, manifest=None, annotations=None, on_bad_file=on_bad_file), folds=3)
    with pytest.raises(ValidationFailed, match=r"no image has a box \(12 images\): prepare.mode crop needs one per "
                                                r"image; use prepare.mode: full \(or auto\)"):
        validate(ds, require_boxes=True, unreadable={})


def test_manifest_class_disagreeing_with_folder_is_a_label_conflict(phantom):
    text = phantom["manifest"].read_text().replace("C1/C1P0001_v1.png,C1P0001,C1", "C1/C1P0001_v1.png,C1P0001,C3")
    phantom["manifest"].write_text(text)
    ds = discover(_data(phantom), folds=3)
    with pytest.raises(ValidationFailed, match=r"C1/C1P0001_v1.png is in folder C1 but the manifest says class C3"):
        validate(ds, unreadable={})


# ------------------------------------------------------------------------- folds
def test_folds_keep_patients_together_and_are_seeded():
    labels = np.array([0] * 20 + [1] * 20)
    groups = [f"p{i // 2}" for i in range(40)]  # 20 patients, 2 images each
    fold = assign_folds(labels, groups, n_splits=5, seed=7)
    assert set(fold) == set(range(5))
    for p in set(groups):
        assert len({f for f, g in zip(fold, groups) if g == p}) == 1
    for k in range(5):  # stratified: both classes in every fold
        assert set(labels[fold == k]) == {0, 1}
    np.testing.assert_array_equal(fold, assign_folds(labels, groups, n_splits=5, seed=7))
    assert not np.array_equal(fold, assign_folds(labels, groups, n_splits=5, seed=8))
