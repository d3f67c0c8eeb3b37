"""Beyond one process: DDP under torchrun (gloo on CPU) and `train.fold_parallel` workers.

The DDP equivalence test uses timm's GroupNorm EfficientNet: no layer couples the images of
a batch, so 2 processes with half a global batch each must take exactly the steps one
process takes on the whole batch (up to float summation order).  With BatchNorm each process
normalises its own shard (SyncBatchNorm is CUDA-only in torch), which the second test only
runs end to end.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from src.artifacts.cv_run import CV_FILE
from src.core.cli import run_main
from src.core.errors import BoneHealthError
from src.data.batches import batches_of
from src.model.cross_validation import run_cv
from src.model.distributed import Dist
from src.train import main as train_main
from tests.train_helpers import make_tiny_store, tiny_params, write_params

REPO = Path(__file__).resolve().parents[1]
PROB_COLS = ["prob_C1", "prob_C3"]



def _run(cmd: list[str], log: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a command in its own process group (killed as a group on timeout), output to `log`."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["OMP_NUM_THREADS"] = "1"
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # the test's processes talk over loopback whatever the hostname resolves to
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, log.read_text(), "")


def _runs(params):
    client = MlflowClient(tracking_uri=params.mlflow.tracking_uri)
    exp = client.get_experiment_by_name(params.mlflow.experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


# ----------------------------------------------------------------------------- pieces
def test_global_batches_are_sharded_without_empty_shards():
    order = np.arange(11)
    chunks = list(batches_of(order, 5, world=2))
    assert [len(c) for c in chunks] == [5, 5]  # the last single image would leave rank 1 empty
    assert [len(c) for c in batches_of(np.arange(12), 5, world=2)] == [5, 5, 2]
    r0, r1 = Dist(rank=0, world=2), Dist(rank=1, world=2)
    assert sorted(np.concatenate([r0.shard(chunks[0]), r1.shard(chunks[0])])) == list(chunks[0])
    assert list(Dist().shard(chunks[0])) == list(chunks[0])


def test_sync_batchnorm_keeps_timm_activations():
    import timm

    from src.model.distributed import sync_batchnorm

    torch.manual_seed(0)
    net = timm.create_model("test_efficientnet", num_classes=2, in_chans=1).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        expected = net(x)
        ours = sync_batchnorm(net).eval()(x)
        torch_converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(
            timm.create_model("test_efficientnet", num_classes=2, in_chans=1)).eval()
        torch_converted.load_state_dict(net.state_dict())
        dropped = torch_converted(x)
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in sync_batchnorm(net).modules())
    torch.testing.assert_close(ours, expected)
    # torch's own converter loses BatchNormAct2d's activation: the reason we use timm's.
    assert not torch.allclose(dropped, expected, atol=1e-4)


# ----------------------------------------------------------------------------- DDP
@pytest.mark.slow
def test_two_process_ddp_equals_one_process_with_the_same_global_batch(tmp_path):
    root = make_tiny_store(tmp_path / "s", n_per_class=12, folds=2)
    # batch 5 over 2 processes: uneven shards (3 + 2) and class weights test the loss normaliser.
    common = dict(model="test_efficientnet_gn", epochs=3, batch_size=5, scheduler="cosine", lr=0.005,
                  class_balance="weights", augment={"enabled": False}, drop_rate=0.0)
    single = tiny_params(tmp_path / "one", root, **common)
    cv_one = run_cv(single)

    double = tiny_params(tmp_path / "two", root, **common)
    pfile = write_params(double, tmp_path / "two" / "params.yaml")
    # train.devices=2 relaunches `python -m src.train` under torchrun by itself.
    done = _run([sys.executable, "-m", "src.train", "--params", str(pfile), "--set", "train.devices=2"],
                tmp_path / "two.log")
    assert done.returncode == 0, done.stdout[-3000:]
    assert "relaunching under torchrun: python -m torch.distributed.run" in done.stdout
    cv_two = json.loads((Path(double.train.out) / CV_FILE).read_text())
    assert cv_two["status"] == "FINISHED"

    for k in range(2):
        a = torch.load(Path(single.train.out) / f"fold_{k}" / "model.pt")
        b = torch.load(Path(double.train.out) / f"fold_{k}" / "model.pt")
        assert a.keys() == b.keys()
        worst = max(float((a[n].double() - b[n].double()).abs().max()) for n in a if a[n].is_floating_point())
        # gloo sums the two shards' gradients in another order than one process does, and Adam's
        # per-coordinate scaling turns that rounding in near-zero gradients into a fraction of a
        # step (lr 0.005): seen up to 8e-4 on an AMD EPYC, under 1e-4 on Intel.  A wrong loss
        # normaliser or shard moves every step and ends several steps away.
        assert worst < 2e-3, f"fold {k}: weights differ by {worst}"
        pa = pd.read_csv(Path(single.train.out) / f"fold_{k}" / "test_predictions.csv")
        pb = pd.read_csv(Path(double.train.out) / f"fold_{k}" / "test_predictions.csv")
        assert list(pa["index"]) == list(pb["index"])
        np.testing.assert_allclose(pa[PROB_COLS].to_numpy(), pb[PROB_COLS].to_numpy(), atol=1e-3)
        assert json.loads((Path(double.train.out) / f"fold_{k}" / "meta.json").read_text())["world_size"] == 2
        # rank 0 writes the learning curve, the same as one process's (val figures to rounding)
        ha = pd.read_csv(Path(single.train.out) / f"fold_{k}" / "history.csv")
        hb = pd.read_csv(Path(double.train.out) / f"fold_{k}" / "history.csv")
        assert list(hb["epoch"]) == [1, 2, 3] and list(ha.columns) == list(hb.columns)
        np.testing.assert_allclose(ha[["val_loss", "lr"]].to_numpy(), hb[["val_loss", "lr"]].to_numpy(), atol=1e-3)
    assert cv_two["metrics"]["cv_oof_roc_auc"] == pytest.approx(cv_one.metrics["cv_oof_roc_auc"], abs=1e-6)


@pytest.mark.slow
def test_torchrun_with_batchnorm_logs_once_from_rank_zero(tmp_path):
    root = make_tiny_store(tmp_path / "s", n_per_class=8, folds=2)
    params = tiny_params(tmp_path, root, epochs=2, batch_size=6)
    pfile = write_params(params, tmp_path / "params.yaml")
    done = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                 "-m", "src.train", "--params", str(pfile)], tmp_path / "torchrun.log")
    assert done.returncode == 0, done.stdout[-3000:]
    # Only rank 0 prints, logs and writes: one epoch line each, one parent run, K children.
    assert done.stdout.count("fold 0 epoch 1/2: train_loss") == 1
    assert "2 processes" in done.stdout
    client, parents, children = _runs(params)
    assert len(parents) == 1 and parents[0].data.tags["world_size"] == "2"
    assert sorted(r.data.tags["fold"] for r in children) == ["0", "1"]
    assert all(r.info.status == "FINISHED" for r in children + parents)
    for child in children:
        history = client.get_metric_history(child.info.run_id, "epoch/val_auc")
        assert [m.step for m in history] == [1, 2]
        assert "test/roc_auc" in child.data.metrics
    assert json.loads((Path(params.train.out) / CV_FILE).read_text())["status"] == "FINISHED"


def test_sync_bn_on_cpu_and_conflicting_settings_fail_with_one_line(tmp_path, capsys):
    root = make_tiny_store(tmp_path / "s", n_per_class=6, folds=2)
    pfile = write_params(tiny_params(tmp_path, root), tmp_path / "params.yaml")
    assert run_main(train_main, ["--params", str(pfile), "--set", "train.devices=2", "--set", "train.sync_bn=true"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: train.sync_bn:") and "CUDA only" in err[0]
    assert run_main(train_main, ["--params", str(pfile), "--set", "train.devices=2",
                                 "--set", "train.fold_parallel=2"]) == 2
    assert "train.fold_parallel and train.devices" in capsys.readouterr().err
    assert not (tmp_path / "models").exists()


# ----------------------------------------------------------------------------- fold_parallel
@pytest.mark.slow
def test_fold_parallel_gives_the_sequential_results_and_logs_each_fold(tmp_path):
    root = make_tiny_store(tmp_path / "s", n_per_class=9, folds=3)
    sequential = tiny_params(tmp_path / "seq", root, epochs=2)
    cv_seq = run_cv(sequential)
    parallel = tiny_params(tmp_path / "par", root, epochs=2, fold_parallel=2)
    cv_par = run_cv(parallel)

    assert cv_par.status == "FINISHED" and sorted(cv_par.fold_run_ids) == ["0", "1", "2"]
    for k in range(3):
        a = pd.read_csv(Path(sequential.train.out) / f"fold_{k}" / "test_predictions.csv")
        b = pd.read_csv(Path(parallel.train.out) / f"fold_{k}" / "test_predictions.csv")
        np.testing.assert_allclose(a[PROB_COLS].to_numpy(), b[PROB_COLS].to_numpy(), atol=1e-6)
        # each worker writes its fold's learning curve
        pd.testing.assert_frame_equal(pd.read_csv(Path(sequential.train.out) / f"fold_{k}" / "history.csv"),
                                      pd.read_csv(Path(parallel.train.out) / f"fold_{k}" / "history.csv"),
                                      atol=1e-6)
    assert cv_par.metrics["cv_oof_roc_auc"] == pytest.approx(cv_seq.metrics["cv_oof_roc_auc"])
    client, parents, children = _runs(parallel)
    assert len(parents) == 1 and len(children) == 3
    for child in children:
        assert child.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(child.info.run_id, "epoch/train_loss")] == [1, 2]
        names = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"checkpoint", "test_predictions.csv"} <= names
    state = json.loads((Path(parallel.train.out) / "cv_state.json").read_text())
    assert state["running"] == {} and sorted(state["folds"]) == ["0", "1", "2"]


@pytest.mark.slow
def test_fold_parallel_worker_failure_stops_the_cv_and_fails_its_runs(tmp_path):
    root = make_tiny_store(tmp_path / "s", n_per_class=8, folds=2)
    params = tiny_params(tmp_path, root, fold_parallel=2, model="no_such_model_anywhere")
    with pytest.raises(BoneHealthError, match=r"^fold \d: train.model: unknown timm model 'no_such_model_anywhere'"):
        run_cv(params)
    _, parents, children = _runs(params)
    assert len(children) == 2 and all(r.info.status == "FAILED" for r in children)
    assert not (Path(params.train.out) / CV_FILE).exists()


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


@pytest.mark.slow
def test_fold_parallel_parent_killed_workers_stop_and_rerun_resumes(tmp_path):
    import time

    root = make_tiny_store(tmp_path / "s", n_per_class=8, folds=2)
    params = tiny_params(tmp_path, root, epochs=40, fold_parallel=2)
    pfile = write_params(params, tmp_path / "params.yaml")
    state_file = Path(params.train.out) / "cv_state.json"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    log = open(tmp_path / "train.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "src.train", "--params", str(pfile)], cwd=REPO, env=env,
                            stdout=log, stderr=log, start_new_session=True)
    workers: list[int] = []
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            state = json.loads(state_file.read_text()) if state_file.is_file() else {}
            if len(state.get("running") or {}) == 2 and "epoch 2/40:" in (tmp_path / "train.log").read_text():
                break
            time.sleep(0.2)
        workers = [p for p in _children(proc.pid) if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert len(workers) == 2, (tmp_path / "train.log").read_text()[-2000:]
        proc.kill()  # the parent only, as the OOM killer would
        proc.wait()
        deadline = time.time() + 60
        while time.time() < deadline and any(Path(f"/proc/{p}").exists() for p in workers):
            time.sleep(0.2)
        assert not any(Path(f"/proc/{p}").exists() for p in workers), "orphaned fold workers kept running"
    finally:
        if proc.poll() is None:
            proc.kill()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        log.close()
    killed = json.loads(state_file.read_text())["running"]
    assert sorted(killed) == ["0", "1"]

    cv = run_cv(params)  # the same settings: resumes the parent run, retrains the two killed folds
    client = MlflowClient(tracking_uri=params.mlflow.tracking_uri)
    assert cv.status == "FINISHED" and cv.parent_run_id == json.loads(state_file.read_text())["parent_run_id"]
    assert all(client.get_run(r).info.status == "KILLED" for r in killed.values())
    assert not set(killed.values()) & set(cv.fold_run_ids.values())
