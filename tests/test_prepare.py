"""src.data.preprocess (the one transform shared with inference) and the prepare stage end to end."""
import csv
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from src.artifacts.store import MANIFEST_COLUMNS, PreparedStore
from src.core.cli import run_main
from src.core.config import PrepareParams
from src.core.errors import DataError
from src.data.build_store import prepare
from src.data.dataset import ValidationFailed
from src.data.imaging import read_image
from src.data.preprocess import (
    apply_clahe,
    crop_geometry,
    preprocess_image,
    rolling_ball_background,
    square_crop,
    subtract_background,
)
from src.prepare import main
from tests.prepare_helpers import H, W, make_dataset, make_params, write_dicom
from tests.train_helpers import write_params


def _prep(**kw) -> dict:
    return PrepareParams(**kw).model_dump(mode="json")


# ------------------------------------------------------------------ preprocess
def test_full_mode_downscale_and_fixed_size():
    img = np.linspace(0, 1, 60 * 120, dtype=np.float32).reshape(60, 120)
    out, info = preprocess_image(img, _prep(mode="full", full={"downscale": 3}), None)
    assert out.shape == (20, 40) and out.dtype == np.uint8
    assert info == {"src_height": 60, "src_width": 120, "crop_x0": None, "crop_y0": None, "crop_side": None,
                    "size": [20, 40]}
    assert abs(int(out.mean()) - 128) <= 1  # area averaging keeps the mean of a ramp
    out, _ = preprocess_image(img, _prep(mode="full", full={"size": [30, 50]}, dtype="uint16"), None)
    assert out.shape == (30, 50) and out.dtype == np.uint16 and out.max() > 60000


def test_crop_is_centred_on_the_box_and_scaled_by_resolution():
    # side 600 at reference width 2900 -> 60 px on a 290-px-wide image
    x0, y0, side = crop_geometry((100, 290), (100, 40, 20, 10), side=600, reference_width=2900)
    assert side == 60 and (x0 + side / 2, y0 + side / 2) == (110, 45)
    _, _, side = crop_geometry((100, 290), (100, 40, 20, 10), side=50, reference_width=None)
    assert side == 50


def test_crop_leaving_the_image_is_edge_padded_not_shifted():
    img = np.tile(np.arange(10, dtype=np.float32), (10, 1))  # value = column index
    patch = square_crop(img, -3, 2, 6)  # 3 columns left of the image
    assert patch.shape == (6, 6)
    np.testing.assert_array_equal(patch[0], [0, 0, 0, 0, 1, 2])
    box = (0.0, 4.0, 2.0, 2.0)  # centre (1, 5) near the left edge
    out, info = preprocess_image(img / 10, _prep(mode="crop", crop={"side": 8, "reference_width": None, "size": 8}), box)
    assert (info["crop_x0"], info["crop_y0"], info["crop_side"]) == (-3, 1, 8)  # centre kept at (1, 5)
    assert out.shape == (8, 8)


def test_crop_mode_without_box_and_box_outside_image():
    img = np.zeros((20, 20), np.float32)
    with pytest.raises(DataError, match=r"crop mode needs a box"):
        preprocess_image(img, _prep(mode="crop"), None)
    with pytest.raises(DataError, match=r"centre \(45, 5\) lies outside the 20x20 image"):
        preprocess_image(img, _prep(mode="crop"), (40, 0, 10, 10))


def test_preprocess_accepts_store_and_checkpoint_meta_shapes():
    img = np.random.default_rng(0).random((40, 80), dtype=np.float32)
    prep = _prep(mode="full", full={"size": [10, 20]})
    direct, _ = preprocess_image(img, prep, None)
    store_meta = {"mode": "full", "size": [10, 20], "preprocessing": prep}
    checkpoint_copy = {"mode": "full", "size": [10, 20], "dtype": "uint8", "preprocessing": prep,
                       "data_root": "x", "manifest_sha256": "y"}
    for wrapped in (store_meta, checkpoint_copy):
        np.testing.assert_array_equal(preprocess_image(img, wrapped, None)[0], direct)
    with pytest.raises(DataError, match=r"preprocessing settings: mode"):
        preprocess_image(img, {"mode": "zoom"}, None)


def test_rolling_ball_removes_smooth_background_keeps_small_detail():
    yy, xx = np.mgrid[:64, :128].astype(np.float32)
    background = 0.2 + 0.3 * xx / 128  # a smooth ramp
    img = background.copy()
    img[30:33, 60:63] += 0.4  # a small bright detail
    out = subtract_background(img, radius=10, shrink=1)
    assert out[31, 61] == pytest.approx(0.4, abs=0.02)
    assert np.abs(np.delete(out.ravel(), np.ravel_multi_index(([31], [61]), out.shape))).mean() < 0.01
    # the shrunken (fast) ball stays close to the exact one
    exact = rolling_ball_background(img, radius=20, shrink=1)
    fast = rolling_ball_background(img, radius=20, shrink=2)
    assert np.abs(exact - fast).mean() < 2 / 255


def test_ball_background_is_skimage_rolling_ball():
    from skimage.restoration import rolling_ball

    from src.data.preprocess import ball_background

    img = (np.random.default_rng(1).random((40, 70)) * 200).astype(np.float32)
    for radius in (3, 7.5):
        np.testing.assert_array_equal(ball_background(img, radius), rolling_ball(img, radius=radius))


def test_clahe_raises_local_contrast():
    rng = np.random.default_rng(0)
    img = (0.45 + 0.05 * rng.random((64, 64))).astype(np.float32)
    out = apply_clahe(img, clip_limit=2.0, tile_grid=4)
    assert out.std() > 2 * img.std() and out.dtype == np.float32


# ---------------------------------------------------------------- prepare stage
@pytest.fixture()
def phantom(tmp_path):
    return make_dataset(tmp_path / "phantom", patients_per_class=4, visits=2)


def _rows(store_dir):
    with open(store_dir / "manifest.csv") as fh:
        return list(csv.DictReader(fh))


def test_prepare_crop_mode_writes_the_contract(tmp_path, phantom, capsys):
    params_file = write_params(make_params(phantom, tmp_path / "prepared", folds=2), tmp_path / "params.yaml")
    assert run_main(main, ["--params", params_file]) == 0
    out = tmp_path / "prepared"
    store = PreparedStore.open(out)
    assert store.images.shape == (16, 16, 16) and store.images.dtype == np.uint8
    assert list(store.manifest.columns) == MANIFEST_COLUMNS
    meta = json.loads((out / "meta.json").read_text())
    assert {k: meta[k] for k in ("mode", "size", "dtype", "classes", "positive_class", "folds", "fold_seed", "n_images")} == {
        "mode": "crop", "size": [16, 16], "dtype": "uint8", "classes": ["C1", "C3"], "positive_class": "C3",
        "folds": 2, "fold_seed": 42, "n_images": 16}
    from src.core.fileio import sha256_file
    assert meta["manifest_sha256"] == sha256_file(out / "manifest.csv")
    # every patient in exactly one fold, both classes in each fold
    assert store.manifest.groupby("patient")["fold"].nunique().max() == 1
    assert (store.manifest.groupby("fold")["label"].nunique() == 2).all()
    # row i is exactly what inference would compute from the raw file with the stored settings
    row = store.manifest.iloc[5]
    box = (row.box_x, row.box_y, row.box_w, row.box_h)
    expected, info = preprocess_image(read_image(phantom["root"] / row.file), meta["preprocessing"], box)
    np.testing.assert_array_equal(store.images[5], expected)
    assert (row.crop_x0, row.crop_y0, row.crop_side, row.src_height, row.src_width) == (36, 12, 24, H, W)
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "ok" and report["counts"]["C3"] == {"label": 1, "images_found": 8, "images": 8, "patients": 4}
    printed = capsys.readouterr().out
    assert "C3" in printed and "(positive)" in printed and "prepared 16 images" in printed


def test_prepare_full_mode_resolves_the_size_for_inference(tmp_path, phantom):
    out = prepare(make_params(phantom, tmp_path / "p", prepare={"mode": "full", "full": {"downscale": 3}}))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["size"] == [16, 32] and meta["preprocessing"]["full"]["size"] == [16, 32]
    rows = _rows(out)
    assert rows[0]["crop_x0"] == "" and rows[0]["box_x"] == "40.0"
    # a new image of another size comes out at the trained size
    arr, _ = preprocess_image(np.zeros((90, 180), np.float32), meta["preprocessing"], None)
    assert arr.shape == (16, 32)


def test_prepare_with_16bit_rgba_and_dicom_images(tmp_path, phantom):
    root = phantom["root"]
    Image.fromarray(np.full((H, W), 65535, np.uint16)).save(root / "C1" / "C1P0000_v1.png")
    rgba = np.zeros((H, W, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = 255, 0
    Image.fromarray(rgba).save(root / "C1" / "C1P0000_v2.png")
    write_dicom(root / "C3" / "C3P0000_v3.dcm", np.full((H, W), 4095, np.uint16), bits_stored=12)
    text = phantom["manifest"].read_text() + "C3/C3P0000_v3.dcm,C3P0000,C3,40,20,16,8\n"
    phantom["manifest"].write_text(text)
    out = prepare(make_params(phantom, tmp_path / "p", data={"annotations": None}))
    store = PreparedStore.open(out)
    for name in ("C1/C1P0000_v1.png", "C1/C1P0000_v2.png", "C3/C3P0000_v3.dcm"):
        i = int(store.manifest.index[store.manifest.file == name][0])
        assert store.images[i].min() == 255, name  # white in every encoding


def test_truncated_png_stops_and_leaves_previous_store_intact(tmp_path, phantom, capsys):
    params = make_params(phantom, tmp_path / "p")
    out = prepare(params)
    before = (out / "manifest.csv").read_bytes()
    good = (phantom["root"] / "C1" / "C1P0001_v1.png").read_bytes()
    (phantom["root"] / "C1" / "C1P0001_v1.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(ValidationFailed, match=r"1 unreadable image\(s\), e.g. C1/C1P0001_v1.png: cannot decode PNG: "
                       r"truncated or corrupt file"):
        prepare(params)
    assert run_main(main, ["--params", write_params(params, tmp_path / "params.yaml")]) == 2
    assert (out / "manifest.csv").read_bytes() == before  # the old store, whole
    # no temp leftovers (the lock file beside the output stays by design: src/core/locks.py)
    left = sorted(p.name for p in out.parent.iterdir() if not p.name.endswith(".bh-lock"))
    assert left == ["p", "params.yaml", "phantom"]
    captured = capsys.readouterr()
    assert "unreadable: 1" in captured.out  # the whole report, then the one-line error
    assert captured.err.strip().splitlines()[-1].startswith("error: ") and "1 unreadable image(s)" in captured.err


def test_images_above_max_pixels_are_unreadable_not_decoded(tmp_path, phantom):
    params = make_params(phantom, tmp_path / "p", data={"max_pixels": 1000, "on_bad_file": "stop"})
    with pytest.raises(ValidationFailed, match=r"16 unreadable image\(s\), e.g. C1/C1P0000_v1.png: \d+x\d+ pixels .* "
                                               r"exceed data\.max_pixels"):
        prepare(params)


def test_bad_files_skipped_and_store_compacted(tmp_path, phantom):
    (phantom["root"] / "C1" / "C1P0001_v1.png").write_bytes(b"")
    write_dicom(phantom["root"] / "C3" / "C3P0002_v1.dcm", None)  # no pixel data
    params = make_params(phantom, tmp_path / "p", data={"on_bad_file": "skip", "annotations": None})
    # the DICOM has no manifest row, so it is its own patient and has no box: skipped too
    out = prepare(params)
    store = PreparedStore.open(out)
    assert len(store.manifest) == 15 and store.images.shape[0] == 15
    report = json.loads((out / "report.json").read_text())
    excluded = {e["file"]: e["reason"] for e in report["excluded"]}
    assert excluded["C1/C1P0001_v1.png"] == "unreadable: empty file (0 bytes)"
    assert excluded["C3/C3P0002_v1.dcm"] == "no box for crop mode"
    # after compaction every row still matches its file
    for i in (0, 7, 14):
        row = store.manifest.iloc[i]
        expected, _ = preprocess_image(read_image(phantom["root"] / row.file), store.meta["preprocessing"],
                                       (row.box_x, row.box_y, row.box_w, row.box_h))
        np.testing.assert_array_equal(store.images[i], expected)


def test_dicom_without_pixel_data_stops_with_its_reason(tmp_path, phantom):
    write_dicom(phantom["root"] / "C3" / "C3P0002_v1.dcm", None)
    params = make_params(phantom, tmp_path / "p", prepare={"mode": "full", "full": {"size": [16, 32]}})
    with pytest.raises(DataError, match=r"C3/C3P0002_v1.dcm: DICOM has no pixel data"):
        prepare(params)
    assert not (tmp_path / "p").exists()


def test_crop_mode_image_without_box_stops_before_decoding(tmp_path, phantom):
    shutil.copy(phantom["root"] / "C1" / "C1P0000_v1.png", phantom["root"] / "C1" / "extra.png")
    with pytest.raises(DataError, match=r"1 image\(s\) have no box for prepare.mode crop, e.g. C1/extra.png"):
        prepare(make_params(phantom, tmp_path / "p", data={"on_label_conflict": "stop"}))
    assert not (tmp_path / "p").exists()


def test_label_conflict_via_cli_is_one_line_exit_2(tmp_path, phantom, capsys):
    shutil.copy(phantom["root"] / "C1" / "C1P0000_v1.png", phantom["root"] / "C3" / "C3P0000_v9.png")
    params_file = tmp_path / "params.yaml"
    params_file.write_text(
        f"data:\n  root: {phantom['root']}\n  manifest: {phantom['manifest']}\n  annotations: {phantom['annotations']}\n"
        f"prepare:\n  out: {tmp_path / 'p'}\n  crop: {{side: 24, reference_width: null, size: 16}}\n  folds: 2\n"
    )
    code = run_main(main, ["--params", str(params_file)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("error: label conflict: the same image is in C1 and C3: C1/C1P0000_v1.png = C3/C3P0000_v9.png")
    # the same run with skip succeeds, and --set works like dvc exp run -S
    code = run_main(main, ["--params", str(params_file), "--set", "data.on_label_conflict=skip",
                           "--set", "data.annotations=null", "--set", "prepare.mode=full", "--set", "prepare.full.size=[8,16]"])
    assert code == 0
    store = PreparedStore.open(tmp_path / "p")
    assert store.images.shape == (15, 8, 16) and "C1/C1P0000_v1.png" not in set(store.manifest.file)


def test_missing_root_via_cli(tmp_path, capsys):
    code = run_main(main, ["--params", "params.yaml", "--set", f"data.root={tmp_path / 'gone'}"])
    assert code == 2
    assert capsys.readouterr().err.strip() == f"error: data.root: folder not found: {tmp_path / 'gone'}"


def test_workers_do_not_change_the_store(tmp_path, phantom):
    one = PreparedStore.open(prepare(make_params(phantom, tmp_path / "a", prepare={"workers": 1})))
    two = PreparedStore.open(prepare(make_params(phantom, tmp_path / "b", prepare={"workers": 2})))
    np.testing.assert_array_equal(np.asarray(one.images), np.asarray(two.images))
    for name in ("manifest.csv", "meta.json"):  # meta leaves out run-only settings (out, workers)
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
