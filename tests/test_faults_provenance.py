"""Metrics provenance: register and promote refuse metrics computed for another CV run.

The fault (issue): `register` read whatever metrics.json existed, so after
`train --set train.out=B` without `evaluate` the new version carried CV A's numbers and the
promotion gate judged them.  evaluate and gradcam now write the CV parent run id and a hash of
the fold checkpoints into their metrics.json; register and promote check them.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from gradcam_helpers import cam_params, make_cam_inputs, make_parent_run
from mlflow import MlflowClient
from registry_helpers import (
    GOOD_METRICS,
    make_checkpoints,
    make_cv_run,
    make_params,
    write_metrics,
    write_metrics_file,
)

from src.artifacts.cv_run import (
    CvRun,
    checkpoints_sha256,
    cv_provenance,
    fold_dir,
    read_cv,
    write_fold_predictions,
)
from src.core.cli import run_main
from src.core.errors import BoneHealthError
from src.core.tracking import configure
from src.evaluation.report import evaluate
from src.explain.oof_explain import run_gradcam
from src.promote import main as promote_main
from src.register import main as register_main
from src.serving.promotion import promote
from src.serving.registry import register
from tests.train_helpers import write_params

PROVENANCE_KEYS = {"cv_parent_run_id", "checkpoints_sha256"}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One MLflow store for the module (creating one costs seconds); names differ per test."""
    return tmp_path_factory.mktemp("mlruns")


def train_cv(params, seed: int, n: int = 16) -> str:
    """What `python -m src.train` leaves in train.out, cheaply: tiny fold checkpoints, a CV
    parent run in the store, cv.json, and fixed informative test-fold predictions."""
    make_checkpoints(params, folds=2, seed=seed)
    run_id = make_cv_run(params, folds=2)
    rng = np.random.default_rng(seed)
    label = np.arange(n) % 2
    p3 = np.clip(0.3 + 0.4 * label + rng.normal(0, 0.2, n), 0.01, 0.99)
    frame = pd.DataFrame({"index": np.arange(n), "file": [f"C{1 + 2 * y}/img{i}.png" for i, y in enumerate(label)],
                          "patient": [f"P{i:03d}" for i in range(n)], "fold": (np.arange(n) // 2) % 2,
                          "label": label, "prob_C1": 1 - p3, "prob_C3": p3})
    for k in range(2):
        write_fold_predictions(fold_dir(params.train.out, k), frame[frame["fold"] == k])
    return run_id


def pointed_at(params, train_out: Path):
    """The params of `--set train.out=...`."""
    other = params.model_copy(deep=True)
    other.train.out = str(train_out)
    return other


def error_line(capsys) -> str:
    """The CLI's one error line (library log lines may precede it on stderr)."""
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert sum(line.startswith("error: ") for line in err) == 1
    return err[-1]


# ------------------------------------------------------------------ the issue, for real
def test_register_refuses_evaluate_metrics_of_another_cv_run(tmp_path, store, capsys):
    params_a = make_params(tmp_path, store=store, name="prov-evaluate")
    params_a.train.out = str(tmp_path / "models_a")
    params_a.evaluate.bootstrap = 50
    run_a = train_cv(params_a, seed=0)
    metrics_a = evaluate(params_a)
    params_b = pointed_at(params_a, tmp_path / "models_b")
    run_b = train_cv(params_b, seed=1)  # `train --set train.out=B`, no evaluate

    # metrics.json: every number as before, plus the two provenance strings; MLflow got numbers only.
    on_disk = json.loads((Path(params_a.evaluate.out) / "metrics.json").read_text())
    assert on_disk == metrics_a and PROVENANCE_KEYS <= set(on_disk)
    assert on_disk["cv_parent_run_id"] == run_a
    assert on_disk["checkpoints_sha256"] == checkpoints_sha256(params_a.train.out, read_cv(params_a.train.out))
    assert all(v is None or isinstance(v, (int, float)) for k, v in on_disk.items()
               if k not in PROVENANCE_KEYS | {"data_warnings"})  # the one text: train's small-data warnings
    logged = MlflowClient(tracking_uri=params_a.mlflow.tracking_uri).get_run(run_a).data.metrics
    assert "oof/roc_auc" in logged and not PROVENANCE_KEYS & set(logged)

    argv = ["--params", write_params(params_a, tmp_path / "params.yaml"), "--set", f"train.out={params_b.train.out}"]
    assert run_main(register_main, argv) == 2
    line = error_line(capsys)
    assert f"{params_a.evaluate.out}/metrics.json: metrics of CV run {run_a}" in line
    assert f"models_b/cv.json is CV run {run_b}" in line and "rerun `python -m src.evaluate`" in line
    client = MlflowClient(tracking_uri=params_a.mlflow.tracking_uri)
    with pytest.raises(Exception, match="RESOURCE_DOES_NOT_EXIST|not found"):
        client.get_registered_model("prov-evaluate")  # nothing was registered

    evaluate(params_b)
    assert run_main(register_main, argv) == 0
    tags = client.get_model_version_by_alias("prov-evaluate", "challenger").tags
    want = checkpoints_sha256(params_b.train.out, read_cv(params_b.train.out))
    assert tags["cv_parent_run_id"] == tags["metrics_cv_parent_run_id"] == run_b
    assert tags["checkpoints_sha256"] == tags["metrics_checkpoints_sha256"] == want
    card = json.loads((Path(params_b.register.out) / "model_card.json").read_text())
    assert card["provenance"]["checkpoints_sha256"] == want

    outcome = promote(params_b)  # a version registered with its own metrics passes the check
    assert outcome.moved and outcome.action == "first"


def test_register_refuses_gradcam_metrics_of_another_cv_run(tmp_path, store):
    paths = make_cam_inputs(tmp_path / "cam")
    params_a = cam_params(tmp_path, paths, per_class=1, perturbation="none")
    params_a.mlflow = make_params(tmp_path, store=store).mlflow
    params_a.evaluate.out = str(tmp_path / "reports" / "evaluate")
    params_a.register.out = str(tmp_path / "reports" / "register")
    params_a.register.name = "prov-gradcam"
    params_a.register.example_size = [48, 96]
    run_a = make_parent_run(params_a, paths["models"])
    run_gradcam(params_a, log_to_mlflow=False)

    # B: the same training rerun under a new parent run: identical weights, another CV run.
    params_b = pointed_at(params_a, tmp_path / "models_b")
    shutil.copytree(paths["models"], params_b.train.out)
    run_b = make_parent_run(params_b, Path(params_b.train.out))
    write_metrics(params_b)  # evaluate was rerun for B; gradcam was not
    gradcam_file = Path(params_a.gradcam.out) / "metrics.json"
    with pytest.raises(BoneHealthError) as err:
        register(params_b)
    line = str(err.value)
    assert "\n" not in line and line.startswith(f"{gradcam_file}: metrics of CV run {run_a}")
    assert f"is CV run {run_b}" in line and "rerun `python -m src.gradcam`" in line

    metrics = run_gradcam(params_b)  # logged this time: MLflow gets the numbers, not the provenance strings
    assert metrics["cv_parent_run_id"] == run_b and "gradcam_correct_all" in metrics
    logged = MlflowClient().get_run(run_b).data.metrics
    assert "gradcam/correct_all" in logged and not PROVENANCE_KEYS & set(logged)
    result = register(params_b)
    tags = MlflowClient().get_model_version("prov-gradcam", result.version).tags
    assert tags["cv_parent_run_id"] == tags["metrics_cv_parent_run_id"] == run_b


def test_register_refuses_metrics_without_provenance_or_of_other_checkpoints(tmp_path, store):
    params = make_params(tmp_path, store=store, name="prov-legacy")
    make_checkpoints(params)
    run_id = make_cv_run(params)
    evaluate_file = Path(params.evaluate.out) / "metrics.json"

    write_metrics_file(Path(params.evaluate.out), GOOD_METRICS)  # as the code before this change wrote it
    with pytest.raises(BoneHealthError, match=rf"^{evaluate_file}: no 'cv_parent_run_id'/'checkpoints_sha256' .*"
                                              r"rerun `python -m src\.evaluate`$"):
        register(params)

    write_metrics(params)
    write_metrics_file(Path(params.gradcam.out), {"gradcam_correct_all": 0.9})
    with pytest.raises(BoneHealthError, match=r"gradcam/metrics\.json: no 'cv_parent_run_id'.*`python -m src\.gradcam`"):
        register(params)
    (Path(params.gradcam.out) / "metrics.json").unlink()

    # A fold retrained under the same parent run (resume) after evaluate: same run id, other weights.
    (fold_dir(params.train.out, 1) / "model.pt").write_bytes(b"retrained")
    with pytest.raises(BoneHealthError, match=rf"metrics of CV run {run_id} with checkpoints sha256 [0-9a-f]{{12}}\.\.\., "
                                              rf"but the fold checkpoints of .*cv\.json \(CV run {run_id}\) now hash to"):
        register(params)


def test_checkpoint_hash_covers_every_fold_file_and_its_fold(tmp_path):
    params = make_params(tmp_path)
    make_checkpoints(params)
    cv = CvRun(parent_run_id="r", folds=2)
    first = checkpoints_sha256(params.train.out, cv)
    assert first == checkpoints_sha256(params.train.out, cv) and len(first) == 64
    a, b = fold_dir(params.train.out, 0), fold_dir(params.train.out, 1)
    a.rename(tmp_path / "swap")
    b.rename(a)
    (tmp_path / "swap").rename(b)
    swapped = checkpoints_sha256(params.train.out, cv)
    assert swapped != first  # the same files under other folds
    meta = json.loads((a / "meta.json").read_text())
    (a / "meta.json").write_text(json.dumps({**meta, "best_epoch": 99}))
    assert cv_provenance(params.train.out, cv).checkpoints_sha256 not in (first, swapped)


# ------------------------------------------------------------------------ promote
def challenger(client, tmp_path: Path, name: str, **provenance_tags: str) -> str:
    """A version tagged as register leaves it (this version's register, or with no
    provenance tags an older one's), holding alias challenger; promote reads only tags, so
    the model behind it is an empty folder."""
    (tmp_path / "model").mkdir(exist_ok=True)
    tags = {**{f"metric.{k}": repr(v) for k, v in GOOD_METRICS.items()},
            "cv_parent_run_id": "a" * 32, "checkpoints_sha256": "1" * 64, **provenance_tags}
    mv = client.create_model_version(name, source=str(tmp_path / "model"), tags=tags)
    client.set_registered_model_alias(name, "challenger", mv.version)
    return str(mv.version)


def test_promote_refuses_metrics_of_another_cv_and_legacy_versions(tmp_path, store, capsys):
    name = "prov-promote"
    params = make_params(tmp_path, store=store, name=name)
    configure(params.mlflow)
    client = MlflowClient()
    client.create_registered_model(name)

    v1 = challenger(client, tmp_path, name, metrics_cv_parent_run_id="b" * 32, metrics_checkpoints_sha256="2" * 64)
    argv = ["--params", write_params(params, tmp_path / "params.yaml")]
    for extra in ([], ["--force"]):  # --force cannot make another CV's numbers this version's
        assert run_main(promote_main, argv + extra) == 2
        line = error_line(capsys)
        assert f"{name} version {v1}: tag metrics_cv_parent_run_id={'b' * 32}" in line
        assert f"registered from CV run {'a' * 32}" in line
    assert "champion" not in client.get_registered_model(name).aliases

    v2 = challenger(client, tmp_path, name, metrics_cv_parent_run_id="a" * 32, metrics_checkpoints_sha256="3" * 64)
    with pytest.raises(BoneHealthError, match=rf"version {v2}: tag metrics_checkpoints_sha256 differs from checkpoints_sha256"):
        promote(params, force=True)

    v3 = challenger(client, tmp_path, name)  # registered before the provenance tags existed
    with pytest.raises(BoneHealthError, match=rf"version {v3}: no 'metrics_cv_parent_run_id' tag .*--force$"):
        promote(params)
    forced = promote(params, force=True)
    assert forced.moved and forced.action == "force" and forced.champion == v3
    assert any("no 'metrics_cv_parent_run_id' tag" in r for r in forced.reasons)
    assert str(client.get_model_version_by_alias(name, "champion").version) == v3
