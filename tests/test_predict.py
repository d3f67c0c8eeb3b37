"""python -m src.predict on phantom PNGs, a DICOM and broken files, by registry alias or folder."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from registry_helpers import (
    expected_probs,
    make_params,
    make_pipeline_outputs,
    radiograph,
    write_dicom,
    write_png,
)

from src.core.cli import run_main
from src.core.tracking import configure
from src.data.imaging import read_image
from src.predict import main as predict_main
from src.serving.registry import register
from tests.train_helpers import write_params

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("predict")
    params = make_params(tmp)
    dirs = make_pipeline_outputs(params)
    register(params)
    params_file = write_params(params, tmp / "params.yaml")
    images = tmp / "incoming"
    write_png(images / "a.png", radiograph(96, 160, seed=11))
    write_png(images / "sub" / "b.png", radiograph(80, 140, seed=12))
    img16 = (radiograph(90, 150, seed=13).astype(np.uint16) * 257)
    write_dicom(images / "c.dcm", img16)
    good = write_png(tmp / "full.png", radiograph(64, 64, seed=14)).read_bytes()
    (images / "broken.png").write_bytes(good[: len(good) // 2])  # truncated mid-stream
    (images / "empty.jpg").write_bytes(b"")
    (images / "notes.txt").write_text("not an image extension: skipped when walking a folder")
    return params, dirs, params_file, images


@pytest.fixture
def ready(setup):
    configure(setup[0].mlflow)
    return setup


def test_batch_with_png_dicom_and_broken_files(ready, capsys):
    params, dirs, params_file, images = ready
    code = predict_main([str(images), "--model", "models:/bone-health@challenger", "--json", "--params", params_file])
    out, err = capsys.readouterr()
    rows = {Path(r["file"]).name: r for r in json.loads(out)}
    assert code == 1  # some files failed, the rest were predicted
    assert sorted(rows) == ["a.png", "b.png", "broken.png", "c.dcm", "empty.jpg"]
    for name in ("a.png", "b.png", "c.dcm"):
        row = rows[name]
        want = expected_probs(dirs, read_image(row["file"]))
        np.testing.assert_allclose([row["prob_C1"], row["prob_C3"]], want, rtol=1e-5, atol=1e-6)
        assert row["predicted"] == ["C1", "C3"][int(np.argmax(want))] and row["error"] is None
    assert "truncated" in rows["broken.png"]["error"]
    assert rows["broken.png"]["predicted"] is None and rows["broken.png"]["prob_C1"] is None
    assert rows["empty.jpg"]["error"] == "empty file (0 bytes)"
    assert "3 of 5 file(s) predicted" in err and f"error: {images / 'empty.jpg'}: empty file (0 bytes)" in err


def test_table_from_a_train_out_folder(ready, capsys):
    params, dirs, params_file, images = ready
    code = predict_main([str(images / "a.png"), str(images / "c.dcm"), "--model", params.train.out,
                         "--params", params_file])
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert code == 0
    assert lines[0].split() == ["file", "predicted", "prob_C1", "prob_C3"]
    want = expected_probs(dirs, read_image(images / "a.png"))
    assert set(lines[1]) == {"-", " "}
    first = lines[2].split()
    assert first[0].endswith("a.png") and float(first[3]) == pytest.approx(want[1], abs=1e-4)


def test_cam_overlays_are_written(ready, tmp_path, capsys):
    params, dirs, params_file, images = ready
    cams = tmp_path / "cams"
    code = predict_main([str(images / "a.png"), str(images / "c.dcm"), "--model", "models:/bone-health@challenger",
                         "--cam", str(cams), "--json", "--params", params_file])
    rows = json.loads(capsys.readouterr().out)
    assert code == 0
    assert sorted(p.name for p in cams.iterdir()) == ["a_cam.png", "c_cam.png"]
    from PIL import Image

    with Image.open(cams / "a_cam.png") as im:
        assert im.size[0] > im.size[1] > 50  # image | heat map | overlay, side by side
    assert [Path(r["cam"]).name for r in rows] == ["a_cam.png", "c_cam.png"]


def test_errors_are_one_line(ready, capsys):
    params, dirs, params_file, images = ready
    # No version holds champion yet: the default model cannot be loaded.
    assert run_main(predict_main, [str(images / "a.png"), "--params", params_file]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --model 'models:/bone-health@champion': no version of 'bone-health' has the alias "
                          "@champion yet (aliases: @challenger -> v") and "\n" not in err
    assert "python -m src.promote" in err
    assert run_main(predict_main, [str(images / "a.png"), "--box", "1,2,3", "--params", params_file]) == 2
    assert "--box: a box is x,y,w,h (four numbers), got 3 values" in capsys.readouterr().err
    assert run_main(predict_main, [str(images / "sub" / "nothing"), "--model", params.train.out,
                                   "--params", params_file]) == 1
    assert "image file not found" in capsys.readouterr().err


def test_crop_model_takes_boxes_per_file(tmp_path, capsys):
    """A crop-mode checkpoint folder: boxes from a manifest-style CSV, --box as the fallback,
    and a file with no box reported instead of cropped somewhere arbitrary."""
    from registry_helpers import make_checkpoints

    params = make_params(tmp_path, mode="crop")
    dirs = make_checkpoints(params)
    a = write_png(tmp_path / "data" / "C1" / "a.png", radiograph(96, 160, seed=31))
    b = write_png(tmp_path / "data" / "C3" / "b.png", radiograph(96, 160, seed=32))
    boxes = tmp_path / "manifest.csv"
    boxes.write_text("file,patient_id,class,box_x,box_y,box_w,box_h\nC1/a.png,P1,C1,60,50,20,16\n")
    argv = [str(a), str(b), "--model", params.train.out, "--json", "--boxes", str(boxes),
            "--params", write_params(params, tmp_path / "params.yaml")]
    assert predict_main(argv) == 1
    rows = json.loads(capsys.readouterr().out)
    np.testing.assert_allclose([rows[0]["prob_C1"], rows[0]["prob_C3"]],
                               expected_probs(dirs, read_image(a), (60, 50, 20, 16)), rtol=1e-5, atol=1e-6)
    assert rows[1]["error"].startswith("crop-mode model: this file needs its cortex box")
    assert predict_main(argv + ["--box", "40,40,30,20"]) == 0
    rows = json.loads(capsys.readouterr().out)
    np.testing.assert_allclose([rows[1]["prob_C1"], rows[1]["prob_C3"]],
                               expected_probs(dirs, read_image(b), (40, 40, 30, 20)), rtol=1e-5, atol=1e-6)
    boxes.write_text("file,box_x\nC1/a.png,60\n")
    assert run_main(predict_main, argv) == 2
    assert "missing column(s) box_y, box_w, box_h" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["crop", "full"])
def test_inference_preprocessing_matches_the_prepared_store(tmp_path, mode):
    """The contract behind every served answer: a raw file through the model's preprocessing
    gives exactly the array `prepare` stored for it (rolling ball and CLAHE on in crop mode)."""
    from registry_helpers import make_checkpoints

    from src.artifacts.store import PreparedStore
    from src.core.config import PhantomParams
    from src.data.build_store import prepare
    from src.serving.inference import box_for, read_boxes
    from src.serving.pyfunc_model import Ensemble
    from src.synthetic.generator import generate

    params = make_params(tmp_path, mode=mode)
    phantom = tmp_path / "phantom"
    params.phantom = PhantomParams(out=str(phantom), masks_out=str(tmp_path / "masks"), patients_per_class=3,
                                   width=512, height=256)
    params.data.root = str(phantom)
    params.data.manifest = str(phantom / "manifest.csv")
    params.data.annotations = str(phantom / "annotations.json")
    if mode == "crop":
        params.prepare.rolling_ball.enabled = True
        params.prepare.rolling_ball.radius = 10
        params.prepare.clahe.enabled = True
    else:
        params.prepare.full.downscale = 4.0
        params.prepare.full.size = None
    generate(params.phantom)
    store = PreparedStore.open(prepare(params))
    ensemble = Ensemble(make_checkpoints(params, folds=1, store_meta=store.meta))
    boxes = read_boxes(params.data.manifest)
    for i, row in store.manifest.iterrows():
        path = Path(params.data.root) / row["file"]
        arr = ensemble.prepare_file(path, box_for(path, boxes, None) if mode == "crop" else None)
        assert arr.dtype == store.images.dtype
        np.testing.assert_array_equal(arr, store.images[i], err_msg=row["file"])


def test_crop_model_finds_missing_boxes_with_the_locate_stage_localisers(tmp_path, capsys):
    """A crop-mode train.out folder with {locate.out}/folds beside it: a given box wins, a file
    without one is cropped where the localisers point (both sides averaged when their meta says
    so), and a radiograph on which they find no cortex is an error row."""
    from registry_helpers import (
        FINDS_NONE,
        expected_found,
        make_checkpoints,
        make_localisers,
        set_localiser_meta,
    )

    params = make_params(tmp_path, mode="crop")
    dirs = make_checkpoints(params)
    localisers = make_localisers(params)
    a = write_png(tmp_path / "in" / "a.png", radiograph(96, 160, seed=41))
    b = write_png(tmp_path / "in" / "b.png", radiograph(100, 170, seed=42))
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("file,box_x,box_y,box_w,box_h\na.png,60,50,20,16\n")
    argv = [str(a), str(b), "--model", params.train.out, "--boxes", str(boxes),
            "--params", write_params(params, tmp_path / "params.yaml")]

    assert predict_main(argv + ["--json"]) == 0
    given, found = json.loads(capsys.readouterr().out)
    assert given["box_source"] == "given" and given["box_confidence"] is None and given["error"] is None
    assert [given[k] for k in ("box_x", "box_y", "box_w", "box_h")] == [60, 50, 20, 16]
    np.testing.assert_allclose([given["prob_C1"], given["prob_C3"]],
                               expected_probs(dirs, read_image(a), (60, 50, 20, 16)), rtol=1e-5, atol=1e-6)
    want, located = expected_found(dirs, localisers, read_image(b))
    assert found["box_source"] == "found" and found["error"] is None
    np.testing.assert_allclose([found[k] for k in ("box_x", "box_y", "box_w", "box_h")], located.box, rtol=1e-6)
    assert found["box_confidence"] == pytest.approx(located.confidence, rel=1e-6)
    np.testing.assert_allclose([found["prob_C1"], found["prob_C3"]], want, rtol=1e-5, atol=1e-6)
    one_side = want

    assert predict_main(argv) == 0  # the table says where each box came from
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["file", "predicted", "prob_C1", "prob_C3", "box_x", "box_y", "box_w", "box_h",
                                "box_source", "box_confidence"]
    assert lines[2].split()[4:] == ["60.0", "50.0", "20.0", "16.0", "given"]
    assert lines[3].split()[-2:] == ["found", f"{located.confidence:.3f}"]

    set_localiser_meta(localisers, both_sides=True)
    cams = tmp_path / "cams"
    assert predict_main(argv + ["--json", "--cam", str(cams)]) == 0
    rows = json.loads(capsys.readouterr().out)
    want, located = expected_found(dirs, localisers, read_image(b))
    assert located.other_box is not None and not np.allclose(want, one_side, atol=1e-4)
    np.testing.assert_allclose([rows[1]["prob_C1"], rows[1]["prob_C3"]], want, rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in cams.iterdir()) == ["a_cam.png", "b_cam.png"]  # the first crop of b

    set_localiser_meta(localisers, min_confidence=FINDS_NONE)
    assert predict_main(argv + ["--json"]) == 1
    out, err = capsys.readouterr()
    given, missed = json.loads(out)
    assert given["error"] is None and given["predicted"] is not None  # the other file is still predicted
    assert missed["error"].startswith("no mandibular cortex found: the localiser's best peak has confidence")
    assert missed["predicted"] is None and missed["prob_C1"] is None and missed["box_source"] is None
    assert "1 of 2 file(s) predicted" in err

    assert predict_main(argv + ["--json", "--no-locate"]) == 1
    assert json.loads(capsys.readouterr().out)[1]["error"].startswith("crop-mode model: this file needs its cortex box")
    (localisers[1] / "meta.json").unlink()  # a locate run killed half way
    assert run_main(predict_main, argv) == 2
    assert "fold_1: unfinished localiser (expected localiser.pt and meta.json)" in capsys.readouterr().err
