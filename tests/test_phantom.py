"""The synthetic panoramic phantom (src.phantom): layout, determinism, class signal, no shortcut."""
from __future__ import annotations

import csv
import json
from collections import Counter, defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest

from src.core.config import PhantomParams, load_params, params_from_dict
from src.core.errors import BoneHealthError
from src.phantom import main
from src.synthetic.anatomy import Field, Patient, Visit, acquire, draw_anatomy
from src.synthetic.generator import (
    MANIFEST_COLUMNS,
    field_of,
    generate,
    plan,
    quantize,
    render,
)
from src.synthetic.measurement import cortex_profile, global_intensity_features

SMALL = dict(width=512, height=256, patients_per_class=4, followup_fraction=0.5, max_images_per_patient=3)


def small(tmp_path: Path, name: str = "ph", **overrides) -> PhantomParams:
    fields = {**SMALL, "out": str(tmp_path / name), "masks_out": str(tmp_path / f"{name}_masks"), **overrides}
    return PhantomParams(**fields)


def read_manifest(out: Path) -> list[dict[str, str]]:
    with open(out / "manifest.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def box_of(row: dict[str, str]) -> tuple[int, ...]:
    return tuple(int(row[k]) for k in ("box_x", "box_y", "box_w", "box_h"))


def all_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> PhantomParams:
    p = small(tmp_path_factory.mktemp("phantom"))
    generate(p)
    return p


# ------------------------------------------------------------------------------ layout
def test_layout_manifest_coco_and_masks_agree(dataset: PhantomParams):
    out, masks = Path(dataset.out), Path(dataset.masks_out)
    with open(out / "manifest.csv", newline="") as fh:
        assert next(csv.reader(fh)) == MANIFEST_COLUMNS
    rows = read_manifest(out)
    coco = json.loads((out / "annotations.json").read_text())
    assert coco["categories"] == [{"id": 1, "name": "cortex", "supercategory": ""}]
    by_id = {im["id"]: im for im in coco["images"]}
    assert all((im["width"], im["height"]) == (dataset.width, dataset.height) for im in coco["images"])
    coco_boxes = {by_id[a["image_id"]]["file_name"]: a["bbox"] for a in coco["annotations"]}
    assert sorted(coco_boxes) == sorted(r["file"] for r in rows)
    images_on_disk = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert images_on_disk == sorted(r["file"] for r in rows)
    for row in rows:
        cls, name = row["file"].split("/")
        assert cls == row["class"] and name.startswith(f"{row['patient_id']}_v")
        image = cv2.imread(str(out / row["file"]), cv2.IMREAD_UNCHANGED)
        mask = cv2.imread(str(masks / row["file"]), cv2.IMREAD_UNCHANGED)
        assert image.shape == mask.shape == (dataset.height, dataset.width) and image.dtype == np.uint8
        assert set(np.unique(mask)) == {0, 255}
        x, y, w, h = box_of(row)
        assert coco_boxes[row["file"]] == [x, y, w, h]
        assert 0 <= x and 0 <= y and x + w <= dataset.width and y + h <= dataset.height
        # a thin box (wider than tall) that sits on the mask of its side
        assert w > h > 0 and mask[y:y + h, x:x + w].any()
    assert (masks / "truth.csv").is_file()


def test_patient_ids_repeat_as_configured(dataset: PhantomParams):
    rows = read_manifest(Path(dataset.out))
    per_patient = Counter(r["patient_id"] for r in rows)
    classes_of = defaultdict(set)
    for r in rows:
        classes_of[r["patient_id"]].add(r["class"])
    n = dataset.patients_per_class
    assert len(per_patient) == 2 * n
    assert all(len(c) == 1 for c in classes_of.values())  # a patient never changes class
    for cls in dataset.classes:
        counts = [per_patient[p] for p in per_patient if classes_of[p] == {cls}]
        assert sum(c > 1 for c in counts) == round(dataset.followup_fraction * n)
        assert max(counts) <= dataset.max_images_per_patient
    for pid, count in per_patient.items():  # visits are numbered 1..count
        assert sorted(r["file"].rsplit("_v", 1)[1] for r in rows if r["patient_id"] == pid) == [
            f"{v}.png" for v in range(1, count + 1)]
    single = plan(PhantomParams(**{**SMALL, "followup_fraction": 0.0}))
    assert len(single) == 2 * n and len({im.patient_id for im in single}) == 2 * n


def test_followups_show_the_same_jaw_in_another_pose(dataset: PhantomParams):
    follow = [im for im in plan(dataset) if im.visit == 2]
    assert follow
    im2 = follow[0]
    im1 = next(im for im in plan(dataset) if im.patient_id == im2.patient_id and im.visit == 1)
    assert im1.patient == im2.patient and im1.acquisition != im2.acquisition
    a = cv2.imread(str(Path(dataset.out) / im1.file), cv2.IMREAD_UNCHANGED)
    b = cv2.imread(str(Path(dataset.out) / im2.file), cv2.IMREAD_UNCHANGED)
    assert not np.array_equal(a, b)


def test_dataset_is_accepted_by_prepare_like_real_data(dataset: PhantomParams, tmp_path: Path):
    from src.artifacts.store import PreparedStore
    from src.data.build_store import prepare

    out = Path(dataset.out)
    params = params_from_dict({
        "data": {"root": str(out), "manifest": str(out / "manifest.csv"),
                 "annotations": str(out / "annotations.json")},
        "prepare": {"out": str(tmp_path / "prepared"), "mode": "crop", "folds": 2},
    })
    store = PreparedStore.open(prepare(params))
    rows = {r["file"]: r for r in read_manifest(out)}
    assert len(store.manifest) == len(rows)
    for rec in store.manifest.to_dict("records"):
        row = rows[rec["file"]]
        assert rec["patient"] == row["patient_id"] and rec["class"] == row["class"]
        assert (rec["box_x"], rec["box_y"], rec["box_w"], rec["box_h"]) == box_of(row)
    # no patient is split across folds
    assert store.manifest.groupby("patient")["fold"].nunique().max() == 1


# ------------------------------------------------------------------------- determinism
def test_same_seed_gives_byte_identical_files_and_another_seed_differs(tmp_path: Path):
    params = dict(patients_per_class=2, followup_fraction=0.5)
    first, second = small(tmp_path, "a", **params), small(tmp_path, "b", **params)
    generate(first)
    generate(second)
    for a, b in ((first.out, second.out), (first.masks_out, second.masks_out)):
        files_a, files_b = all_files(Path(a)), all_files(Path(b))
        assert files_a.keys() == files_b.keys() and len(files_a) > 4
        assert files_a == files_b
    other = small(tmp_path, "c", seed=1, **params)
    generate(other)
    pngs = lambda root: {k: v for k, v in all_files(Path(root)).items() if k.endswith(".png")}  # noqa: E731
    shared = pngs(first.out).keys() & pngs(other.out).keys()
    assert all(pngs(first.out)[k] != pngs(other.out)[k] for k in shared)
    assert read_manifest(Path(first.out)) != read_manifest(Path(other.out))


def test_a_failed_run_leaves_the_previous_dataset_whole(tmp_path: Path, monkeypatch):
    import src.synthetic.generator as phantom

    p = small(tmp_path, patients_per_class=2)
    generate(p)
    before = all_files(Path(p.out))
    calls = {"n": 0}
    real = phantom.acquire

    def failing(*args, **kwargs):  # fault injection in our own code, midway through the run
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(phantom, "acquire", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        generate(p.model_copy(update={"seed": 5}))
    assert all_files(Path(p.out)) == before
    assert sorted(x.name for x in tmp_path.iterdir()) == ["ph", "ph_masks"]  # no temp folders left


def test_sixteen_bit_output(tmp_path: Path):
    p = small(tmp_path, patients_per_class=1, followup_fraction=0.0, bit_depth=16)
    generate(p)
    row = read_manifest(Path(p.out))[0]
    image = cv2.imread(str(Path(p.out) / row["file"]), cv2.IMREAD_UNCHANGED)
    assert image.dtype == np.uint16 and image.max() > 255 * 16  # the full 16-bit range is used


# ----------------------------------------------------------------------- class signal
def test_measured_width_matches_the_drawn_cortex():
    """The image analysis recovers widths across the clinical range (0.283 mm/px)."""
    f = Field(1024, 512)
    visit = Visit(rotation_deg=2.0, blur_mm=0.25, noise=0.02, box_side=1)
    for drawn in (1.8, 3.0, 4.8):
        patient = Patient(severity=0.2, cortex_mm=drawn, seed=3)  # no erosion: the width is well defined
        rad = acquire(draw_anatomy(patient, f), visit, f)
        measured = cortex_profile(rad.image, rad.box, f.mm_per_px).width_mm
        assert measured == pytest.approx(drawn, abs=0.35)
    # the profile is bright in the cortex and dark in the soft tissue below it
    m = cortex_profile(rad.image, rad.box, f.mm_per_px)
    assert m.profile[(m.offsets_mm > 0.5) & (m.offsets_mm < 4)].min() > m.profile[m.offsets_mm < -1.5].max()
    assert abs(m.slope_deg) < 20 and m.columns > 0.8 * rad.box[2]


def test_measured_width_differs_between_classes_as_intended(tmp_path: Path):
    """Healthy cortex ~3-5 mm, osteoporotic < 3 mm (OSTEODENT cut-off), overlapping a little."""
    p = small(tmp_path, patients_per_class=12, followup_fraction=0.0)
    f = field_of(p)
    widths = defaultdict(list)
    for im, rad in render(plan(p), f):
        widths[im.cls].append(cortex_profile(quantize(rad.image, 8), rad.box, f.mm_per_px).width_mm)
    c1, c3 = np.array(widths["C1"]), np.array(widths["C3"])
    assert 3.0 < np.median(c1) < 5.5 and np.median(c3) < 3.0
    assert c1.mean() - c3.mean() > 1.2
    # not a perfect split: the distributions touch, so the task is learnable but not trivial
    weaker = [cortex_profile(rad.image, rad.box, f.mm_per_px).width_mm
              for _, rad in render(plan(p.model_copy(update={"separation": 0.0})), f)]
    assert np.std(weaker) > 0.3


def test_no_global_shortcut_but_a_local_signal():
    """Global intensity statistics stay near chance; the cortex profile in the box does not."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    p = PhantomParams(width=256, height=128, patients_per_class=150, followup_fraction=0.0, seed=11)
    f = field_of(p)
    glob, local, labels = [], [], []
    for im, rad in render(plan(p), f):
        image = quantize(rad.image, 8)
        glob.append(global_intensity_features(image))
        prof = cortex_profile(image, rad.box, f.mm_per_px).profile
        local.append((prof - prof.mean()) / (prof.std() + 1e-9))
        labels.append(im.label)
    y = np.array(labels)

    def cv_auc(x):
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
        folds = StratifiedKFold(5, shuffle=True, random_state=0)
        return roc_auc_score(y, cross_val_predict(model, np.array(x), y, cv=folds, method="predict_proba")[:, 1])

    assert cv_auc(glob) < 0.65
    assert cv_auc(local) > 0.85


def test_masks_align_with_the_bright_cortex_band(dataset: PhantomParams):
    out, masks = Path(dataset.out), Path(dataset.masks_out)
    mm = field_of(dataset).mm_per_px
    ring = lambda m, r: cv2.dilate(m, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)))  # noqa: E731
    for row in read_manifest(out):
        image = cv2.imread(str(out / row["file"]), cv2.IMREAD_UNCHANGED).astype(np.float32)
        mask = cv2.imread(str(masks / row["file"]), cv2.IMREAD_UNCHANGED)
        near = (ring(mask, int(4 / mm)) > 0) & ~(ring(mask, int(1 / mm)) > 0)
        assert image[mask > 0].mean() > image[near].mean() + 10  # cortex brighter than bone and soft tissue around it
        # both sides, under the premolars (about 38% and 62% of the width)
        cols = np.flatnonzero(mask.any(axis=0)) / dataset.width
        assert cols.min() < 0.4 and cols.max() > 0.6 and not ((cols > 0.47) & (cols < 0.53)).any()


# ------------------------------------------------------------------------ params, CLI
def test_bad_params_are_one_line_errors(tmp_path: Path):
    with pytest.raises(BoneHealthError, match="phantom.masks_out .* must lie outside phantom.out"):
        generate(small(tmp_path, masks_out=str(tmp_path / "ph" / "masks")))
    params_file = tmp_path / "params.yaml"
    params_file.write_text("phantom:\n  width: 1024\n  height: 256\n")
    with pytest.raises(BoneHealthError, match="phantom.height/phantom.width must be between 0.45 and 0.75"):
        load_params(params_file)


def test_cli_writes_the_dataset_and_the_figure(tmp_path: Path, capsys):
    params_file = tmp_path / "params.yaml"
    params_file.write_text("phantom:\n  width: 512\n  height: 256\n  patients_per_class: 2\n  followup_fraction: 0\n")
    sets = ["--set", f"phantom.out={tmp_path / 'out'}", "--set", f"phantom.masks_out={tmp_path / 'masks'}"]
    assert main(["--params", str(params_file), *sets]) == 0
    assert "4 images of 4 patients" in capsys.readouterr().out
    assert len(read_manifest(tmp_path / "out")) == 4
    figure = tmp_path / "fig.png"
    assert main(["--params", str(params_file), "--figure", str(figure)]) == 0
    assert cv2.imread(str(figure)).shape[1] >= 1000
    assert not (tmp_path / "out" / "figure").exists()
