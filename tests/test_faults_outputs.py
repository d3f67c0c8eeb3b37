"""Output folders pointed at data: every stage refuses (one line, exit 2, nothing touched) an
output that overlaps its inputs or a non-empty folder it did not write (src/core/outputs.py),
and still replaces its own outputs, marked or written by an earlier, unmarked version."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import src.evaluate
import src.gradcam
import src.phantom
import src.prepare
import src.register
import src.train
from src.core.cli import run_main
from src.core.config import load_params
from src.core.errors import BoneHealthError
from src.core.fileio import atomic_dir
from src.core.outputs import (
    MARKER_NAME,
    check_replaceable,
    is_legacy_output,
    marker_owner,
)
from tests.prepare_helpers import make_dataset, make_params
from tests.train_helpers import write_params

ROOT = Path(__file__).resolve().parents[1]
PHANTOM_YAML = "phantom:\n  width: 512\n  height: 256\n  patients_per_class: 2\n  followup_fraction: 0\n"


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root, byte for byte (hidden ones too)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def user_folder(path: Path) -> Path:
    """A folder of someone's own files, nested, that no stage wrote."""
    (path / "sub").mkdir(parents=True)
    (path / "notes.txt").write_text("keep me\n")
    (path / "sub" / "scan.png").write_bytes(b"\x89PNG not really")
    return path


def refused(code: int, capsys, *names: str) -> str:
    """Exit 2 with exactly one stderr line naming each of `names`; returns the line."""
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: ") and all(n in err[0] for n in names), err[0]
    return err[0]


@pytest.fixture()
def data(tmp_path) -> dict[str, Path]:
    return make_dataset(tmp_path / "user", patients_per_class=3, visits=1)


def prepare_args(data: dict[str, Path], tmp_path: Path, out: Path, *sets: str) -> list[str]:
    params_file = write_params(make_params(data, out, folds=2), tmp_path / "params.yaml")
    return ["--params", params_file, *[a for s in sets for a in ("--set", s)]]


def phantom_args(tmp_path: Path, out: Path, masks: Path) -> list[str]:
    params_file = tmp_path / "phantom.yaml"
    params_file.write_text(PHANTOM_YAML)
    return ["--params", str(params_file), "--set", f"phantom.out={out}", "--set", f"phantom.masks_out={masks}"]


# ----------------------------------------------------------------- the reproductions
def test_prepare_out_equal_to_data_root_deletes_nothing(tmp_path, data, capsys):
    root = data["root"]
    before = snapshot(tmp_path / "user")
    code = run_main(src.prepare.main, prepare_args(data, tmp_path, root, f"data.root={root}", f"prepare.out={root}"))
    line = refused(code, capsys, f"prepare.out {root}", f"data.root {root}", "must not equal, contain or lie inside")
    assert line.count("\n") == 0
    assert snapshot(tmp_path / "user") == before
    assert sorted(p.name for p in root.parent.iterdir()) == ["annotations.json", "images", "manifest.csv"]


@pytest.mark.parametrize("where, key", [
    ("user", "data.root"),                     # contains the data: the swap would take it along
    ("user/images/store", "data.root"),        # inside the data: would become a class folder
    ("user/manifest.csv", "data.manifest"),    # the manifest file itself
    ("user/annotations.json/x", "data.annotations"),
])
def test_prepare_out_overlapping_an_input_is_refused(tmp_path, data, capsys, where, key):
    before = snapshot(tmp_path / "user")
    code = run_main(src.prepare.main, prepare_args(data, tmp_path, tmp_path / where))
    refused(code, capsys, "prepare.out", key)
    assert snapshot(tmp_path / "user") == before


def test_overlap_is_judged_on_resolved_paths(tmp_path, data, capsys):
    link = tmp_path / "link"
    link.symlink_to(data["root"], target_is_directory=True)
    before = snapshot(tmp_path / "user")
    code = run_main(src.prepare.main, prepare_args(data, tmp_path, link))
    refused(code, capsys, f"prepare.out {link} (-> {data['root']})", "data.root")
    assert snapshot(tmp_path / "user") == before and link.is_symlink()


def test_phantom_out_on_a_folder_with_files_deletes_nothing(tmp_path, capsys):
    folder = user_folder(tmp_path / "mine")
    before = snapshot(folder)
    code = run_main(src.phantom.main, phantom_args(tmp_path, folder, tmp_path / "masks"))
    refused(code, capsys, str(folder), "not written by bone-health", "choose another phantom.out")
    assert snapshot(folder) == before
    assert not (tmp_path / "masks").exists()
    code = run_main(src.phantom.main, phantom_args(tmp_path, tmp_path / "ph", folder))
    refused(code, capsys, str(folder), "choose another phantom.masks_out")
    assert snapshot(folder) == before and not (tmp_path / "ph").exists()


def test_phantom_outputs_must_stay_apart(tmp_path, capsys):
    code = run_main(src.phantom.main, phantom_args(tmp_path, tmp_path / "ph", tmp_path / "ph" / "masks"))
    refused(code, capsys, "phantom.out", "phantom.masks_out", "must not equal or contain each other")
    assert not (tmp_path / "ph").exists()


def test_prepare_refuses_a_non_empty_foreign_out(tmp_path, data, capsys):
    folder = user_folder(tmp_path / "mine")
    before = snapshot(folder)
    code = run_main(src.prepare.main, prepare_args(data, tmp_path, folder))
    refused(code, capsys, str(folder), "not written by bone-health", "choose another prepare.out")
    assert snapshot(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "params.yaml", "user"]  # no temp folders


def test_a_file_at_the_out_path_is_refused(tmp_path, data, capsys):
    (tmp_path / "store").write_text("a file\n")
    code = run_main(src.prepare.main, prepare_args(data, tmp_path, tmp_path / "store"))
    refused(code, capsys, "is not a folder", "prepare.out")
    assert (tmp_path / "store").read_text() == "a file\n"


# ------------------------------------------------------------- the later stages' overlaps
@pytest.fixture()
def stage_params(tmp_path) -> str:
    """Every output and input of the later stages in its own folder under tmp_path."""
    params_file = tmp_path / "stages.yaml"
    params_file.write_text(
        f"data:\n  root: {tmp_path / 'data'}\n"
        f"prepare:\n  out: {tmp_path / 'prepared'}\n"
        f"train:\n  out: {tmp_path / 'models'}\n"
        f"evaluate:\n  out: {tmp_path / 'reports'}\n"
        f"gradcam:\n  out: {tmp_path / 'reports' / 'gradcam'}\n  masks: null\n"
        f"register:\n  out: {tmp_path / 'reports' / 'register'}\n")
    return str(params_file)


@pytest.mark.parametrize("stage, out_key, where, in_key", [
    ("train", "train.out", "prepared", "prepare.out"),
    ("train", "train.out", "data/models", "data.root"),
    ("evaluate", "evaluate.out", "models", "train.out"),
    ("gradcam", "gradcam.out", "models/gradcam", "train.out"),
    ("gradcam", "gradcam.out", "prepared", "prepare.out"),
    ("register", "register.out", "models", "train.out"),
    ("register", "register.out", "reports", "evaluate.out/metrics.json"),
])
def test_later_stages_refuse_an_out_overlapping_an_input(tmp_path, stage_params, capsys, stage, out_key, where, in_key):
    for folder in ("data", "prepared", "models", "reports"):
        user_folder(tmp_path / folder)
    before = snapshot(tmp_path)
    main = getattr(src, stage).main
    code = run_main(main, ["--params", stage_params, "--set", f"{out_key}={(tmp_path / where).resolve()}"])
    refused(code, capsys, out_key, in_key, "must not equal, contain or lie inside")
    assert snapshot(tmp_path) == before


def test_gradcam_refuses_a_foreign_images_folder(tmp_path, stage_params, capsys):
    images = user_folder(tmp_path / "reports" / "gradcam" / "images")
    before = snapshot(images)
    code = run_main(src.gradcam.main, ["--params", stage_params])
    refused(code, capsys, str(images), "choose another gradcam.out")
    assert snapshot(images) == before


def test_gradcam_single_image_out_must_not_overwrite_the_image(tmp_path, stage_params, capsys):
    image = tmp_path / "scan.png"
    image.write_bytes(b"radiograph")
    code = run_main(src.gradcam.main, ["--params", stage_params, "--image", str(image), "--out", str(image)])
    refused(code, capsys, "--out", "--image")
    assert image.read_bytes() == b"radiograph"


def test_shipped_params_pass_every_stage_check(tmp_path, monkeypatch):
    """The shipped nesting (gradcam.out and register.out inside evaluate.out, data.root =
    phantom.out) is fine: checked in an empty folder, so only the rule decides."""
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    params = load_params("params.yaml")
    src.phantom.check_paths(params.phantom)
    for stage in (src.prepare, src.train, src.evaluate, src.gradcam, src.register):
        stage.check_paths(params)


# ------------------------------------------------- replacing what we wrote ourselves
def test_prepare_reruns_on_its_own_output_marked_or_old(tmp_path, data, capsys):
    out = tmp_path / "store"
    args = prepare_args(data, tmp_path, out)
    assert run_main(src.prepare.main, args) == 0
    assert marker_owner(out) is not None
    first = snapshot(out)
    assert run_main(src.prepare.main, args) == 0  # marked: replaced
    assert snapshot(out) == first
    (out / MARKER_NAME).unlink()  # what a version before the marker left behind
    assert is_legacy_output(out, "prepare.out")
    assert run_main(src.prepare.main, args) == 0
    assert snapshot(out) == first
    capsys.readouterr()
    (out / MARKER_NAME).unlink()
    (out / "mine.txt").write_text("not a store file\n")  # an old layout plus a foreign file: not ours
    code = run_main(src.prepare.main, args)
    refused(code, capsys, "choose another prepare.out")
    assert (out / "mine.txt").is_file()


def test_prepare_replaces_an_empty_folder(tmp_path, data):
    (tmp_path / "store").mkdir()
    assert run_main(src.prepare.main, prepare_args(data, tmp_path, tmp_path / "store")) == 0
    assert (tmp_path / "store" / "images.npy").is_file()


def test_phantom_reruns_on_its_own_output_marked_or_old(tmp_path):
    out, masks = tmp_path / "ph", tmp_path / "ph_masks"
    args = phantom_args(tmp_path, out, masks)
    assert run_main(src.phantom.main, args) == 0
    first, first_masks = snapshot(out), snapshot(masks)
    assert run_main(src.phantom.main, args) == 0
    for folder in (out, masks):
        (folder / MARKER_NAME).unlink()
    assert is_legacy_output(out, "phantom.out") and is_legacy_output(masks, "phantom.masks_out")
    assert run_main(src.phantom.main, args) == 0
    assert snapshot(out) == first and snapshot(masks) == first_masks


def test_a_user_data_folder_does_not_pass_for_an_old_phantom(tmp_path, data):
    """Same names as the phantom's (class folders, manifest.csv, annotations.json), but not its COCO file."""
    user = tmp_path / "user"
    (user / "images" / "C1").rename(user / "C1")
    (user / "images" / "C3").rename(user / "C3")
    (user / "images").rmdir()
    assert not is_legacy_output(user)
    with pytest.raises(BoneHealthError, match="not written by bone-health; move it away or choose another phantom.out"):
        check_replaceable(user, "phantom.out")


def test_old_layouts_pass_only_for_their_own_setting(tmp_path, data):
    out = tmp_path / "store"
    assert run_main(src.prepare.main, prepare_args(data, tmp_path, out)) == 0
    (out / MARKER_NAME).unlink()
    check_replaceable(out, "prepare.out")
    check_replaceable(out)  # atomic_dir without a key: any old layout
    with pytest.raises(BoneHealthError, match="choose another phantom.out"):
        check_replaceable(out, "phantom.out")


def test_a_marker_of_another_setting_is_refused(tmp_path):
    folder = user_folder(tmp_path / "ph")
    (folder / MARKER_NAME).write_text("phantom.out\n")
    with pytest.raises(BoneHealthError, match=r"holds bone-health's phantom.out output, not prepare.out"):
        check_replaceable(folder, "prepare.out")
    check_replaceable(folder, "phantom.out")
    check_replaceable(folder)


# ------------------------------------------------------------------------ atomic_dir
def test_atomic_dir_marks_refuses_and_keeps_the_old_folder_on_failure(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out, "prepare.out") as tmp:
        (tmp / "a.txt").write_text("one")
    assert marker_owner(out) == "prepare.out"
    before = snapshot(out)
    with pytest.raises(RuntimeError, match="midway"), atomic_dir(out, "prepare.out") as tmp:
        (tmp / "a.txt").write_text("two")
        raise RuntimeError("midway")
    assert snapshot(out) == before
    foreign = user_folder(tmp_path / "foreign")
    with pytest.raises(BoneHealthError, match="choose another train.out"), atomic_dir(foreign, "train.out"):
        pytest.fail("the block must not run")
    with pytest.raises(BoneHealthError, match="choose another output folder"), atomic_dir(foreign):
        pytest.fail("the block must not run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign", "out"]  # no temp folders left


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o007, 0o660, 0o770),
                                                        (0o077, 0o600, 0o700)])
def test_atomic_outputs_respect_the_umask(tmp_path, umask, file_mode, dir_mode):
    """Temp files are created 0600 and folders 0700; what is renamed into place must get the
    permissions any new file would, so a lab group can read a shared project's outputs."""
    from src.core.fileio import atomic_dir, atomic_write_text

    old = os.umask(umask)
    try:
        written = atomic_write_text(tmp_path / "metrics.json", "{}\n")
        with atomic_dir(tmp_path / "store", "prepare.out") as tmp:
            (tmp / "meta.json").write_text("{}")
    finally:
        os.umask(old)
    assert written.stat().st_mode & 0o777 == file_mode
    assert (tmp_path / "store").stat().st_mode & 0o777 == dir_mode
