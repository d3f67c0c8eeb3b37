"""register -> a pyfunc version with alias challenger and its tags; the gate of promote."""
from __future__ import annotations

import base64
import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from registry_helpers import (
    FINDS_NONE,
    expected_found,
    expected_probs,
    make_localisers,
    make_params,
    make_pipeline_outputs,
    provenance,
    radiograph,
    set_localiser_meta,
    write_gradcam_metrics,
    write_metrics,
    write_metrics_file,
    write_png,
)

from src.artifacts.checkpoint import CheckpointMeta
from src.artifacts.model_ref import checkpoint_dirs, localiser_dirs
from src.core.errors import BoneHealthError
from src.core.tracking import configure
from src.data.imaging import read_image
from src.promote import main as promote_main
from src.serving.promotion import promote, rollback
from src.serving.registry import TAGGED_METRICS, register, store_info
from tests.train_helpers import write_params

CROP_OUTPUTS = ["prob_C1", "prob_C3", "predicted", "box_x", "box_y", "box_w", "box_h", "box_source",
                "box_confidence", "error"]


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One MLflow store for the module; each test registers under its own model name."""
    return tmp_path_factory.mktemp("mlruns")


@pytest.fixture(scope="module")
def registered_once(tmp_path_factory, store):
    tmp = tmp_path_factory.mktemp("reg")
    params = make_params(tmp, store=store)
    dirs = make_pipeline_outputs(params)
    result = register(params)
    return params, dirs, result, tmp


@pytest.fixture
def registered(registered_once):
    configure(registered_once[0].mlflow)  # other tests point MLflow at their own stores
    return registered_once


def test_register_creates_challenger_with_tags_and_card(registered):
    params, dirs, result, tmp = registered
    client = MlflowClient()
    mv = client.get_model_version_by_alias("bone-health", "challenger")
    assert str(mv.version) == result.version == "1"
    tags = mv.tags
    assert float(tags["metric.oof_roc_auc"]) == pytest.approx(0.81)
    assert float(tags["metric.oof_roc_auc_ci_low"]) == pytest.approx(0.74)
    assert float(tags["metric.oof_roc_auc_ci_high"]) == pytest.approx(0.88)
    assert float(tags["metric.oof_sensitivity"]) == pytest.approx(0.78)
    cv = json.loads((Path(params.train.out) / "cv.json").read_text())
    assert tags["cv_parent_run_id"] == cv["parent_run_id"]
    assert tags["manifest_sha256"] == "ab" * 32  # from the checkpoint's copy of the store meta
    assert tags["git_commit"] and tags["strategy"] == "ensemble" and tags["n_models"] == "2"
    assert json.loads(tags["params"])["train.model"] == "test_efficientnet"
    assert json.loads(tags["classes"]) == ["C1", "C3"]
    assert tags["model_card"] == f"runs:/{mv.run_id}/model_card/model_card.md"

    # The version's run sits under the CV parent and carries the card and the CV metrics.
    run = client.get_run(mv.run_id)
    assert run.data.tags["mlflow.parentRunId"] == cv["parent_run_id"]
    assert run.data.metrics["oof/roc_auc"] == pytest.approx(0.81)  # grouped under oof/ in the UI
    card = Path(mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path="model_card/model_card.md",
                                                    dst_path=str(tmp / "card"))).read_text()
    assert "not a diagnosis" in card.lower()
    assert "| oof_roc_auc | 0.8100 | 0.7400 | 0.8800 |" in card
    assert "oof_brier: 0.1700" in card and "oof_ece: 0.0500" in card
    assert "Grad-CAM faithfulness" in card and "Not available" in card
    assert "## Limitations" in card and "v1" in card.splitlines()[0] and "| best_epochs | 2, 3 |" in card
    assert "rolling ball off, CLAHE off" in card
    local = Path(params.register.out)
    assert (local / "model_card.md").read_text() == card
    assert json.loads((local / "registered.json").read_text())["version"] == "1"
    metadata = json.loads((local / "model_card.json").read_text())
    assert metadata["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "C1", "1": "C3"}
    # not the phantom and no data.description: a neutral wording, no dental claim
    assert metadata["intended_use"].startswith("Research aid for studies of radiograph images labelled C1, C3")
    assert "dental" not in card.lower()
    # version tags: the figures people compare and the gate's keys, not a copy of every metric
    assert {k for k in tags if k.startswith("metric.")} <= {f"metric.{k}" for k in TAGGED_METRICS}
    assert "metric.fold_mean_roc_auc" not in tags and run.data.metrics["fold_mean/roc_auc"] is not None
    described = client.get_registered_model("bone-health").description
    assert "@champion" in described and "python -m src.promote" in described and "not a diagnosis" in described.lower()


def test_model_card_wording_comes_from_the_data():
    from src.serving.model_card import INTENDED_USE, wording

    phantom = wording({"synthetic_phantom": True}, ["C1", "C3"], "C3")
    assert phantom["intended_use"] == INTENDED_USE and "dental panoramic" in phantom["task"]
    own = wording({"description": "hand radiographs, RA erosions vs none", "modality": "hand radiograph"},
                  ["none", "erosive"], "erosive")
    assert own["task"] == "Binary screening: hand radiographs, RA erosions vs none"
    assert own["intended_use"].startswith("Research aid for studies of hand radiographs, RA erosions vs none. Not a")
    assert own["modality"] == "hand radiograph" and "dental" not in str(own).lower()


def test_model_holds_checkpoints_only_with_signature_and_requirements(registered):
    params, dirs, result, tmp = registered
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=result.model_uri, dst_path=str(tmp / "dl")))
    files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    assert "artifacts/fold_0/model.pt" in files and "artifacts/fold_1/meta.json" in files
    assert not any("test_predictions" in f for f in files)  # patient ids stay out of the model
    assert "code/src/serving/pyfunc_model.py" in files  # served without a checkout
    reqs = (local / "requirements.txt").read_text().split()
    assert any(r.startswith("torch==") for r in reqs) and any(r.startswith("timm==") for r in reqs)
    info = mlflow.models.get_model_info(result.model_uri)
    assert [c["name"] for c in info.signature.inputs.to_dict()] == ["image", "box_x", "box_y", "box_w", "box_h"]
    assert [c["name"] for c in info.signature.outputs.to_dict()] == ["prob_C1", "prob_C3", "predicted"]
    example = json.loads((local / "serving_input_example.json").read_text())
    assert example["dataframe_split"]["columns"] == ["image"]


def test_pyfunc_by_alias_is_mean_of_fold_checkpoints(registered):
    params, dirs, result, tmp = registered
    model = mlflow.pyfunc.load_model("models:/bone-health@challenger")
    a = write_png(tmp / "a.png", radiograph(96, 160, seed=1))
    b = write_png(tmp / "b.png", radiograph(120, 90, seed=2))  # another size: shapes still agree after prep
    out = model.predict(pd.DataFrame({"image": [b64(a), b64(b)]}))
    assert list(out.columns) == ["prob_C1", "prob_C3", "predicted"]
    for i, path in enumerate((a, b)):
        want = expected_probs(dirs, read_image(path))
        np.testing.assert_allclose(out.loc[i, ["prob_C1", "prob_C3"]].to_numpy(dtype=float), want, rtol=1e-5, atol=1e-6)
        assert out.loc[i, "predicted"] == ["C1", "C3"][int(np.argmax(want))]
    single = expected_probs(dirs[:1], read_image(a))
    assert not np.allclose(single, out.loc[0, ["prob_C1", "prob_C3"]].to_numpy(dtype=float), atol=1e-4)


def test_the_registered_model_keeps_the_pixel_limit(registered):
    params = registered[0]
    loaded = mlflow.pyfunc.load_model("models:/bone-health@challenger").unwrap_python_model()
    assert loaded.ensemble.max_pixels == params.data.max_pixels == 40_000_000


def test_pyfunc_rejects_bad_base64_naming_the_row(registered):
    model = mlflow.pyfunc.load_model("models:/bone-health@challenger")
    with pytest.raises(MlflowException, match=r"row 0: column 'image' is not valid base64") as info:
        model.predict(pd.DataFrame({"image": ["***not base64***"]}))
    assert info.value.error_code == "INVALID_PARAMETER_VALUE"  # served as HTTP 400 with this message


def test_crop_mode_model_uses_the_box(tmp_path, store):
    params = make_params(tmp_path, mode="crop", store=store, name="crop-model")
    dirs = make_pipeline_outputs(params)
    # Optional inputs of the card: a prepared store's meta + manifest, and Grad-CAM metrics.
    prepared = Path(params.prepare.out)
    prepared.mkdir(parents=True)
    phantom_images = str(Path(params.phantom.out) / "images")  # the store was built from the phantom
    (prepared / "meta.json").write_text(json.dumps({"manifest_sha256": "ab" * 32, "n_images": 3,
                                                    "data_root": phantom_images}))
    (prepared / "manifest.csv").write_text("index,file,class,patient\n0,a.png,C1,P1\n1,b.png,C3,P2\n2,c.png,C3,P2\n")
    write_gradcam_metrics(params, {"cam_energy_inside_mean": 0.61, "road_score": None})
    result = register(params)
    card = (Path(params.register.out) / "model_card.md").read_text()
    assert "| cam_energy_inside_mean | 0.6100 |" in card and "road_score" not in card
    assert "- images_per_class: {'C1': 1, 'C3': 2}" in card and "- patients: 2" in card
    assert "- synthetic_phantom: True" in card and "Trained and evaluated on SYNTHETIC phantom" in card
    assert MlflowClient().get_model_version("crop-model", result.version).tags["manifest_sha256"] == "ab" * 32
    # A store rebuilt after training says so instead of lending the model its counts.
    other = store_info(params, CheckpointMeta(model="m", classes=["C1", "C3"],
                                              preprocessing={"manifest_sha256": "ef" * 32}))
    assert other["manifest_sha256"] == "ef" * 32 and "changed since training" in other["note"]
    assert "images_per_class" not in other
    model = mlflow.pyfunc.load_model(result.model_uri)
    path = write_png(tmp_path / "r.png", radiograph(96, 160, seed=3))
    box = (60.0, 50.0, 20.0, 16.0)
    frame = pd.DataFrame({"image": [b64(path)], "box_x": [box[0]], "box_y": [box[1]], "box_w": [box[2]], "box_h": [box[3]]})
    out = model.predict(frame)
    want = expected_probs(dirs, read_image(path), box)
    np.testing.assert_allclose(out.loc[0, ["prob_C1", "prob_C3"]].to_numpy(dtype=float), want, rtol=1e-5, atol=1e-6)
    assert list(out.columns) == CROP_OUTPUTS
    assert tuple(out.loc[0, ["box_x", "box_y", "box_w", "box_h"]]) == box and out.loc[0, "box_source"] == "given"
    assert np.isnan(out.loc[0, "box_confidence"]) and out.loc[0, "error"] is None
    # No localiser was bundled (locate.out has no folds): a box stays required, and the card says so.
    with pytest.raises(MlflowException, match="row 0: crop mode needs a box .* bundles no localiser") as info:
        model.predict(pd.DataFrame({"image": [b64(path)]}))
    assert info.value.error_code == "INVALID_PARAMETER_VALUE"
    assert "- Crop box: boxes must be given: no localiser is bundled" in card
    assert MlflowClient().get_model_version("crop-model", result.version).tags["n_localisers"] == "0"
    assert [c["name"] for c in mlflow.models.get_model_info(result.model_uri).signature.outputs.to_dict()] == CROP_OUTPUTS


def test_crop_model_bundles_the_localiser_and_finds_missing_boxes(tmp_path, store):
    """The locate stage's fold localisers travel as artifacts localiser_<k>; the pyfunc crops
    where they point when a row has no box, a given box still wins, and a radiograph on which
    they find no cortex is an error row while the other rows are answered."""
    params = make_params(tmp_path, mode="crop", store=store, name="located-model")
    dirs = make_pipeline_outputs(params)
    localisers = make_localisers(params)
    write_metrics_file(Path(params.locate.out), {"locate_oof_hit_rate": 0.875, "locate_oof_iou_mean": 0.6})
    result = register(params)

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=result.model_uri, dst_path=str(tmp_path / "dl")))
    files = sorted(p.relative_to(local / "artifacts").as_posix() for p in (local / "artifacts").rglob("*") if p.is_file())
    assert [f for f in files if f.startswith("localiser_")] == [
        "localiser_0/localiser.pt", "localiser_0/meta.json", "localiser_1/localiser.pt", "localiser_1/meta.json"]
    assert localiser_dirs(local) == [local / "artifacts" / "localiser_0", local / "artifacts" / "localiser_1"]
    assert [d.name for d in checkpoint_dirs(local)] == ["fold_0", "fold_1"]  # the readers keep apart
    example = json.loads((local / "serving_input_example.json").read_text())
    assert example["dataframe_split"]["columns"] == ["image"]  # the box is optional now
    card = (Path(params.register.out) / "model_card.md").read_text()
    assert ("- Crop box: given by the caller, else found by the bundled localiser: 2 fold localiser(s), "
            "mobilenetv3_small_100 on 64x128 overviews, centres refined in 48x64 windows of a 128x256 view, "
            "min confidence 1e-06; held-out hit rate 0.875 from "
            f"{Path(params.locate.out) / 'metrics.json'}.") in card
    assert "`box_source` (given or found)" in card
    assert MlflowClient().get_model_version("located-model", result.version).tags["n_localisers"] == "2"

    model = mlflow.pyfunc.load_model(result.model_uri)
    a = write_png(tmp_path / "a.png", radiograph(96, 160, seed=7))
    b = write_png(tmp_path / "b.png", radiograph(110, 150, seed=8))
    out = model.predict(pd.DataFrame({"image": [b64(a), b64(b)]}))  # no box columns at all
    assert list(out.columns) == CROP_OUTPUTS
    for i, path in enumerate((a, b)):
        want, located = expected_found(dirs, localisers, read_image(path))
        np.testing.assert_allclose(out.loc[i, ["prob_C1", "prob_C3"]].to_numpy(dtype=float), want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out.loc[i, ["box_x", "box_y", "box_w", "box_h"]].to_numpy(dtype=float), located.box)
        assert out.loc[i, "box_source"] == "found" and out.loc[i, "error"] is None
        assert out.loc[i, "box_confidence"] == pytest.approx(located.confidence, rel=1e-6)

    box = (60.0, 50.0, 20.0, 16.0)
    mixed = pd.DataFrame({"image": [b64(a), b64(b)], "box_x": [box[0], None], "box_y": [box[1], None],
                          "box_w": [box[2], None], "box_h": [box[3], None]})
    out = model.predict(mixed)
    assert list(out["box_source"]) == ["given", "found"]
    np.testing.assert_allclose(out.loc[0, ["prob_C1", "prob_C3"]].to_numpy(dtype=float),
                               expected_probs(dirs, read_image(a), box), rtol=1e-5, atol=1e-6)

    # The same model with a localiser that trusts no peak: row 1 (no box) cannot be cropped.
    set_localiser_meta(localiser_dirs(local), min_confidence=FINDS_NONE)
    out = mlflow.pyfunc.load_model(str(local)).predict(mixed)
    assert out.loc[0, "error"] is None and out.loc[0, "predicted"] in ("C1", "C3") and out.loc[0, "box_source"] == "given"
    assert out.loc[1, "error"].startswith("no mandibular cortex found: the localiser's best peak has confidence")
    assert "\n" not in out.loc[1, "error"]
    assert out.loc[1, ["prob_C1", "prob_C3", "box_x", "box_confidence"]].isna().all()
    assert out.loc[1, "predicted"] is None and out.loc[1, "box_source"] is None


def test_register_refuses_an_unfinished_localiser(tmp_path, store):
    params = make_params(tmp_path, mode="crop", store=store, name="half-located")
    make_pipeline_outputs(params)
    localisers = make_localisers(params)
    (localisers[1] / "localiser.pt").unlink()
    with pytest.raises(BoneHealthError, match=r"folds/fold_1: unfinished localiser \(expected localiser\.pt and "
                                              r"meta\.json\); finish it with `python -m src\.locate`"):
        register(params)


def test_register_input_errors_are_one_line(tmp_path, store):
    params = make_params(tmp_path, store=store, name="never-complete")
    with pytest.raises(BoneHealthError, match=r"cv\.json: not found; run `python -m src.train` first"):
        register(params)
    make_pipeline_outputs(params)
    write_metrics_file(Path(params.evaluate.out), {"oof_sensitivity": 0.7, **provenance(params)})
    with pytest.raises(BoneHealthError, match=r"metrics\.json: metric 'oof_roc_auc' \(register\.gate\) is missing"):
        register(params)
    write_metrics(params)
    with pytest.raises(BoneHealthError, match=r"prepared/images\.npy: prepared store incomplete"):
        register(params, strategy="refit")  # a refit trains on the prepared store
    (Path(params.train.out) / "fold_1" / "model.pt").unlink()
    with pytest.raises(BoneHealthError, match=r"fold_1: fold checkpoint incomplete \(model\.pt \+ meta\.json\)"):
        register(params)


def test_refit_registers_one_model_trained_on_all_data(tmp_path, store):
    from train_helpers import make_tiny_store

    params = make_params(tmp_path, store=store, name="refit-model")
    params.train.batch_size = 8
    prepared = make_tiny_store(params.prepare.out, n_per_class=6, size=32, folds=2)
    store_meta = json.loads((prepared / "meta.json").read_text())
    make_pipeline_outputs(params, store_meta=store_meta)  # fold best epochs 2 and 3
    result = register(params, strategy="refit")

    mv = MlflowClient().get_model_version("refit-model", result.version)
    assert mv.tags["strategy"] == "refit" and mv.tags["n_models"] == "1"
    dirs = checkpoint_dirs(result.model_uri, dst=tmp_path / "dl")
    assert [d.name for d in dirs] == ["fold_refit"]
    meta = json.loads((dirs[0] / "meta.json").read_text())
    assert meta["trained_on"] == "all" and meta["refit_epochs"] == 3 and meta["fold"] is None
    path = write_png(tmp_path / "r.png", radiograph(96, 160, seed=5))
    box = (70.0, 50.0, 20.0, 16.0)  # the tiny store is in crop mode
    frame = pd.DataFrame({"image": [b64(path)], "box_x": [box[0]], "box_y": [box[1]], "box_w": [box[2]], "box_h": [box[3]]})
    out = mlflow.pyfunc.load_model(result.model_uri).predict(frame)
    np.testing.assert_allclose(out.loc[0, ["prob_C1", "prob_C3"]].to_numpy(dtype=float),
                               expected_probs(dirs, read_image(path), box), rtol=1e-5, atol=1e-6)

    store_meta["manifest_sha256"] = "0" * 64  # the data changed after the CV
    (prepared / "meta.json").write_text(json.dumps(store_meta))
    with pytest.raises(BoneHealthError, match=r"manifest_sha256 differs from the one the CV folds were trained on"):
        register(params, strategy="refit")


def test_register_refuses_a_parent_run_missing_from_the_store(tmp_path, store):
    params = make_params(tmp_path, store=store, name="orphan")
    make_pipeline_outputs(params)
    cv_path = Path(params.train.out) / "cv.json"
    cv = json.loads(cv_path.read_text())
    cv["parent_run_id"] = "0" * 32
    cv_path.write_text(json.dumps(cv))
    write_metrics(params)  # evaluated for that cv.json, so the store is what register trips on
    with pytest.raises(BoneHealthError, match=r"parent run 0{32} is not in the MLflow store"):
        register(params)


NAME = "promoted"


def _champion(client) -> str:
    return str(client.get_model_version_by_alias(NAME, "champion").version)


def test_promote_gate_force_and_rollback(tmp_path, store, capsys):
    params = make_params(tmp_path, store=store, name=NAME)
    make_pipeline_outputs(params)
    client_versions = []

    def register_with(**metrics):
        write_metrics(params, **metrics)
        client_versions.append(register(params).version)
        return client_versions[-1]

    v1 = register_with()  # auc 0.81, sensitivity 0.78
    first = promote(params)
    assert first.moved and first.action == "first" and first.champion == v1
    client = MlflowClient()
    assert _champion(client) == v1

    v2 = register_with(oof_roc_auc=0.79)  # worse: refused
    outcome = promote(params)
    assert not outcome.moved and outcome.action == "refused" and _champion(client) == v1
    assert "oof_roc_auc 0.7900 vs champion 0.8100" in outcome.reasons[0]
    assert f"challenger v{v2}" in outcome.table and f"champion v{v1}" in outcome.table

    v3 = register_with(oof_roc_auc=0.86, oof_sensitivity=0.70)  # better AUC, but misses more disease
    assert promote(params).action == "refused"
    code = promote_main(["--params", write_params(params, tmp_path / "params.yaml")])
    printed = capsys.readouterr().out
    assert code == 0 and "NOT promoted" in printed and "oof_sensitivity drops 0.0800" in printed
    assert "0.8600" in printed and "0.8100" in printed  # the table shows both versions' numbers
    assert _champion(client) == v1

    forced = promote(params, force=True)
    assert forced.moved and forced.action == "force" and _champion(client) == v3
    tags = client.get_model_version(NAME, v3).tags
    assert tags["champion_action"] == "force"
    assert json.loads(tags["champion_periods"])[0]["previous"] == v1
    assert client.get_model_version(NAME, v1).tags["champion_replaced_by"] == v3

    back = rollback(params)
    assert back.moved and back.champion == v1 and back.previous == v3 and _champion(client) == v1

    v4 = register_with(oof_roc_auc=0.83, oof_sensitivity=0.77)  # better, sensitivity within 0.02
    won = promote(params)
    assert won.moved and won.action == "gate" and _champion(client) == v4

    assert rollback(params).champion == v1  # the stack: v1 -> v3 (rolled back) -> v4 -> back to v1
    with pytest.raises(BoneHealthError, match="no previous holder"):
        rollback(params)

    periods = json.loads(client.get_model_version(NAME, v1).tags["champion_periods"])
    assert [p["action"] for p in periods] == ["first", "rollback", "rollback"]
    assert all(p["until"] for p in periods[:-1]) and periods[-1]["until"] is None
    history = json.loads(client.get_registered_model(NAME).tags["champion_history"])
    assert [(e["action"], e["from"], e["to"]) for e in history] == [
        ("first", None, v1), ("force", v1, v3), ("rollback", v3, v1), ("gate", v1, v4), ("rollback", v4, v1)]
    assert str(client.get_model_version_by_alias(NAME, "challenger").version) == v4


def test_gate_min_gain_and_minimize(tmp_path):
    from src.core.config import GateParams
    from src.serving.promotion import gate_decision

    champ = {"oof_roc_auc": 0.80, "oof_sensitivity": 0.80, "oof_brier": 0.20}
    assert not gate_decision({"oof_roc_auc": 0.80, "oof_sensitivity": 0.80}, champ, GateParams()).promote  # a tie
    small = {"oof_roc_auc": 0.805, "oof_sensitivity": 0.80}
    assert gate_decision(small, champ, GateParams()).promote
    assert not gate_decision(small, champ, GateParams(min_gain=0.01)).promote
    lower_brier = {"oof_brier": 0.15, "oof_sensitivity": 0.79}
    assert gate_decision(lower_brier, champ, GateParams(metric="oof_brier", direction="minimize")).promote
    missing = gate_decision({"oof_sensitivity": 0.9}, champ, GateParams())
    assert not missing.promote and "challenger has no usable 'oof_roc_auc'" in missing.reasons[0]


def test_promote_without_registered_model_is_one_line(tmp_path, store):
    params = make_params(tmp_path, store=store, name="never-registered")
    with pytest.raises(BoneHealthError, match=r"no registered model 'never-registered'.*src\.register"):
        promote(params)


def test_the_floor_stops_a_chance_level_model_even_as_the_first_champion(tmp_path, store, capsys):
    """A model whose AUC CI reaches chance is never promoted on its point estimate, first one included."""
    params = make_params(tmp_path, store=store, name="floor-model")
    make_pipeline_outputs(params, oof_roc_auc=0.51, oof_roc_auc_ci_low=0.39, oof_roc_auc_ci_high=0.63)
    version = register(params).version
    refused = promote(params)
    assert not refused.moved and refused.action == "refused" and refused.champion is None
    assert "oof_roc_auc_ci_low 0.3900 is not above register.gate.floor 0.5" in refused.reasons[0]
    code = promote_main(["--params", write_params(params, tmp_path / "params.yaml")])
    printed = capsys.readouterr().out
    assert code == 0 and "NOT promoted" in printed and "champion stays unassigned" in printed
    forced = promote(params, force=True)
    assert forced.moved and forced.action == "force" and forced.champion == version
    assert any("floor" in r for r in forced.reasons)
    # the floor can be switched off for a metric without a chance level
    params.register.gate.floor = None
    assert promote(params).action == "unchanged"


def test_the_card_quotes_the_localiser_hit_rate_only_for_the_bundled_localisers(tmp_path):
    """locate's metrics.json names the localisers it scored; after a retrain without a rescore
    its figure belongs to other networks and the card says it is not available."""
    from types import SimpleNamespace

    from src.core.config import params_from_dict
    from src.serving.registry import localiser_hit_rate

    params = params_from_dict({"locate": {"out": str(tmp_path / "localiser")}})
    finder = SimpleNamespace(metas=[SimpleNamespace(fingerprint="abc")] * 2)
    assert localiser_hit_rate(params, finder) is None                     # no metrics.json
    (tmp_path / "localiser").mkdir()
    path = tmp_path / "localiser" / "metrics.json"
    path.write_text(json.dumps({"locate_oof_hit_rate": 0.954, "locate_fingerprint": "abc"}))
    assert localiser_hit_rate(params, finder) == 0.954
    path.write_text(json.dumps({"locate_oof_hit_rate": 0.954, "locate_fingerprint": "other"}))
    assert localiser_hit_rate(params, finder) is None
