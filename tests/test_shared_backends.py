"""Beyond one machine: Optuna on a real PostgreSQL server, MLflow through a real tracking server."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from src.core.config import with_values
from src.tuning import study as tuning_study
from tests.servers import mlflow_server, postgres_server
from tests.train_helpers import make_tiny_store, tiny_params, write_params

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_tiny_store(tmp_path_factory.mktemp("store"), n_per_class=8, size=32, folds=2)



@pytest.mark.slow
def test_two_tune_workers_on_postgresql_add_up(tmp_path, store):
    with postgres_server() as url:
        params = with_values(tiny_params(tmp_path, store, epochs=1), {
            "tune.out": str(tmp_path / "tune"), "tune.pruner": "none", "tune.n_startup_trials": 1,
            "tune.space": {"train.lr": {"type": "float", "low": 0.001, "high": 0.05, "log": True}}})
        path = write_params(params, tmp_path / "params.yaml")
        for n_workers, n_trials in ((2, 3), (1, 1)):  # two workers, then a rerun adding one trial
            out = subprocess.run(
                [sys.executable, "-m", "src.tune", "--params", str(path), "--storage", url,
                 "--n-trials", str(n_trials), "--n-workers", str(n_workers)],
                cwd=ROOT, capture_output=True, text=True, timeout=600)
            assert out.returncode == 0, out.stdout + out.stderr
        study = tuning_study.open_study(params, url)
        trials = study.get_trials()
        assert len(trials) == 4
        assert all(t.state == TrialState.COMPLETE for t in trials)
        assert sorted(t.number for t in trials) == [0, 1, 2, 3]
        assert len({t.user_attrs["worker_pid"] for t in trials}) >= 2  # both workers did work


@pytest.mark.slow
def test_cv_run_is_logged_through_a_real_mlflow_server(tmp_path, store):
    backend = f"sqlite:///{tmp_path / 'server' / 'mlflow.db'}"
    (tmp_path / "server").mkdir()
    with mlflow_server(backend, tmp_path / "server" / "artifacts") as url:
        params = tiny_params(tmp_path, store, epochs=1)
        path = write_params(params, tmp_path / "params.yaml")
        env = {**os.environ, "MLFLOW_TRACKING_URI": url}
        out = subprocess.run([sys.executable, "-m", "src.train", "--params", str(path)], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        cv = json.loads((Path(params.train.out) / "cv.json").read_text())

        client = MlflowClient(tracking_uri=url)
        parent = client.get_run(cv["parent_run_id"])
        assert parent.info.status == "FINISHED"
        children = client.search_runs([parent.info.experiment_id],
                                      filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        assert len(children) == 2
        for child in children:
            names = {a.path for a in client.list_artifacts(child.info.run_id, "checkpoint")}
            assert {"checkpoint/model.pt", "checkpoint/meta.json"} <= names
    # the local SQLite file of params.mlflow was not used: everything went through the server
    assert not Path(params.mlflow.tracking_uri.removeprefix("sqlite:///")).exists()
