"""Tracking-server faults during resume (issue 13, item 5): a real MLflow server behind a real
fault-injecting proxy (tests/fault_proxy.py).  An error the store did not classify as "run not
found" is retried with backoff and then stops with one line; finished folds are never deleted
because of it.  Only the store's own answer that the run is gone starts the CV anew."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from src.core.config import with_values
from tests.fault_proxy import hits, write_rules
from tests.servers import fault_proxy, mlflow_server
from tests.train_helpers import make_tiny_store, tiny_params, write_params

ROOT = Path(__file__).resolve().parents[1]
RUNS_GET = "/api/2.0/mlflow/runs/get"
pytestmark = pytest.mark.slow


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {p.relative_to(root).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def cv(tmp_path_factory):
    """A finished two-fold CV logged through the proxy; the tests then rerun train (resume)."""
    tmp = tmp_path_factory.mktemp("tracking_faults")
    (tmp / "server").mkdir()
    store = make_tiny_store(tmp / "store", n_per_class=8, folds=2)
    rules = tmp / "rules.json"
    with mlflow_server(f"sqlite:///{tmp / 'server' / 'mlflow.db'}", tmp / "server" / "artifacts") as upstream, \
            fault_proxy(upstream, rules) as url:
        params = with_values(tiny_params(tmp, store, epochs=1),
                             {"mlflow.tracking_uri": url, "mlflow.retries": 2, "mlflow.retry_wait_s": 0.2})
        ctx = {"params": params, "file": write_params(params, tmp / "params.yaml"), "rules": rules,
               "out": Path(params.train.out), "url": url}
        first = train(ctx)
        assert first.returncode == 0, first.stderr[-3000:]
        yield ctx


def train(ctx) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"  # MLflow's own retries off: ours are under test
    return subprocess.run([sys.executable, "-m", "src.train", "--params", ctx["file"]], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def one_error_line(proc: subprocess.CompletedProcess, *names: str) -> str:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert all(n in errors[0] for n in names), errors[0]
    return errors[0]


@pytest.mark.parametrize("action", ["503", "drop"])
def test_an_unreachable_store_during_resume_deletes_no_finished_fold(cv, action):
    before = snapshot(cv["out"])
    write_rules(cv["rules"], {"path": RUNS_GET, "action": action, "times": -1})
    try:
        proc = train(cv)
    finally:
        write_rules(cv["rules"])
    one_error_line(proc, "mlflow.tracking_uri", cv["url"], "looking up run", "after 3 tries", "nothing was deleted")
    assert snapshot(cv["out"]) == before  # same bytes, same mtimes: not even rewritten
    assert proc.stderr.count("retrying in") == 2


def test_a_store_down_at_start_is_one_line_and_touches_nothing(cv):
    before = snapshot(cv["out"])
    write_rules(cv["rules"], {"path": "/", "action": "drop", "times": -1})
    try:
        proc = train(cv)
    finally:
        write_rules(cv["rules"])
    one_error_line(proc, "opening experiment", "after 3 tries")
    assert snapshot(cv["out"]) == before


def test_a_transient_error_is_retried_and_the_finished_folds_reused(cv):
    before = snapshot(cv["out"])
    parent = json.loads((cv["out"] / "cv.json").read_text())["parent_run_id"]
    write_rules(cv["rules"], {"path": RUNS_GET, "action": "503", "times": 2})
    proc = train(cv)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len([h for h in hits(cv["rules"]) if h.startswith("503 " + RUNS_GET)]) >= 2
    assert "retrying in" in proc.stderr and "all 2 folds already finished" in proc.stderr
    assert json.loads((cv["out"] / "cv.json").read_text())["parent_run_id"] == parent
    after = snapshot(cv["out"])
    for k in range(2):
        assert after[f"fold_{k}/model.pt"] == before[f"fold_{k}/model.pt"]


def test_only_the_stores_answer_that_the_run_is_gone_starts_anew(cv):
    """The classified case: the user deleted the CV run in MLflow, so its folds are not reused."""
    old = json.loads((cv["out"] / "cv.json").read_text())["parent_run_id"]
    MlflowClient(tracking_uri=cv["url"]).delete_run(old)
    proc = train(cv)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"the CV run {old}" in proc.stderr and "is deleted in MLflow: training every fold anew" in proc.stderr
    assert json.loads((cv["out"] / "cv.json").read_text())["parent_run_id"] != old
