"""K-fold cross-validation, every fold an MLflow run (the train stage's work; also DDP ranks).

One parent run per CV (named like the lab's folders: model, dataset, mode+size, batch,
epochs) carries every parameter and the aggregated metrics; one nested run per fold
carries the per-epoch curves, the test-fold metrics and the chosen checkpoint.

Resume: `{train.out}/cv_state.json` records the parent run, each finished fold (run id
and figures) and the folds in progress.  A rerun with the same parameters and data
continues with the unfinished folds, marks the runs of interrupted folds KILLED (they are
not counted), and reuses the finished folds' checkpoints and predictions.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from src.artifacts.checkpoint import CHECKPOINT_FILE, META_FILE
from src.artifacts.cv_run import (
    CV_FILE,
    PREDICTIONS_FILE,
    STATE_FILE,
    CvRun,
    fold_complete,
    fold_dir,
    peek_cv,
    read_fold_histories,
    read_fold_predictions,
    write_cv,
)
from src.artifacts.store import PreparedStore
from src.core import tracking
from src.core.code_hash import code_fingerprint
from src.core.config import MlflowParams, Params, flatten
from src.core.errors import BoneHealthError
from src.core.fileio import atomic_write_json
from src.core.redact import redact_params
from src.core.runtime import select_device
from src.data.dataset import dataset_name
from src.evaluation.metrics import auc_score, classification_metrics
from src.evaluation.plots import plot_learning_curves
from src.model import distributed
from src.model.data_checks import data_warnings
from src.model.distributed import Dist
from src.model.fit import FoldResult, input_size, train_fold
from src.model.fold_parallel import train_folds_in_parallel

log = logging.getLogger(__name__)
SRC_ROOT = Path(__file__).resolve().parents[1]
# The code a fold's numbers depend on (the train stage's dvc.yaml deps, less the entry module).
TRAINING_PACKAGES = ("core", "artifacts", "data", "evaluation", "model")

EPOCH_METRICS = ("train_loss", "val_loss", "val_auc", "lr", "images_per_s")
RUN_ONLY_TRAIN_KEYS = ("out", "num_workers", "threads", "devices", "fold_parallel")


# ----------------------------------------------------------------------------- naming
def run_name(params: Params, store: PreparedStore) -> str:
    """The lab's folder naming (model, dataset, mode+size, batch, epochs), then the DVC experiment's
    name or, outside one, a short hash of the other training settings that differ from the
    defaults: two runs that differ in lr alone no longer share a name."""
    h, w = input_size(params.train, store)
    size = f"{h}" if h == w else f"{h}x{w}"
    mode = store.meta.get("mode", params.prepare.mode)
    cfg = params.train
    name = f"{cfg.model}_{dataset_name(params)}_{mode}{size}_b{cfg.batch_size}_e{cfg.epochs}"
    if os.environ.get(DVC_EXP_ENV):
        return f"{name}-{os.environ[DVC_EXP_ENV]}"
    changed = {k: v for k, v in changed_settings(params).items() if k not in NAMED_SETTINGS}
    if changed:
        name += "-" + hashlib.sha256(json.dumps(changed, sort_keys=True).encode()).hexdigest()[:6]
    return name


DVC_EXP_ENV = "DVC_EXP_NAME"  # set by `dvc exp run` for the stages it runs
NAMED_SETTINGS = {"train.model", "train.batch_size", "train.epochs"}  # already in the lab's name
KEY_TRAIN_SETTINGS = ("model", "lr", "epochs", "batch_size", "optimizer", "scheduler", "weight_decay",
                      "pretrained", "seed", "augment.strength", "class_balance", "ema_decay", "checkpoint")


def changed_settings(params: Params) -> dict[str, Any]:
    """train.* settings (results-bearing ones: not where or how fast) that differ from the defaults."""
    ours, default = (flatten({"train": p.train.model_dump(mode="json")}) for p in (params, Params()))
    skip = {f"train.{k}" for k in RUN_ONLY_TRAIN_KEYS}
    return {k: v for k, v in ours.items() if k not in skip and v != default.get(k)}


def run_description(params: Params, store: PreparedStore, summary: dict[str, float], warnings: list[str]) -> str:
    """The parent run's description in the UI (Markdown): what was trained on what, and how it did."""
    cfg = params.train
    changed = ", ".join(f"`{k}={v}`" for k, v in changed_settings(params).items()) or "none"
    lines = [f"{store.n_folds}-fold patient-grouped CV of **{cfg.model}** on **{dataset_name(params)}** "
             f"({len(store.images)} images, classes {', '.join(store.classes)}, positive {store.positive_class}).",
             f"Pooled out-of-fold ROC AUC **{summary.get('cv_oof_roc_auc', float('nan')):.3f}**; per-fold test AUC "
             f"{summary.get('cv_test_roc_auc_mean', float('nan')):.3f} ± {summary.get('cv_test_roc_auc_std', float('nan')):.3f}. "
             "`python -m src.evaluate` adds the CIs and calibration.",
             f"Training settings changed from the defaults: {changed}."]
    lines += [f"**Warning:** {w}" for w in warnings]
    return "\n\n".join(lines)


def log_dataset(params: Params, store: PreparedStore) -> None:
    """The prepared store as the run's input dataset (MLflow's Datasets panel): its manifest's
    schema and digest, named like the data, with the store folder as its source."""
    import mlflow
    from mlflow.data.pandas_dataset import from_pandas

    table = store.manifest[[c for c in ("file", "class", "label", "patient", "fold") if c in store.manifest]]
    dataset = from_pandas(table, source=str(store.root), name=dataset_name(params), targets="label",
                          digest=str(store.meta.get("manifest_sha256", ""))[:8] or None)
    mlflow.log_input(dataset, context="training")


def fold_key_params(params: Params) -> dict[str, Any]:
    """The settings people filter fold runs by, on each fold run (the parent has them all)."""
    flat = flatten({"train": params.train.model_dump(mode="json")})
    return {f"train.{k}": flat.get(f"train.{k}") for k in KEY_TRAIN_SETTINGS}


def fingerprint(params: Params, store: PreparedStore, world: int = 1, device_type: str = "cpu") -> str:
    """What makes finished folds reusable: the training settings, the number of data-parallel
    processes (it changes BatchNorm's batches), on the CPU the number of threads (the same seed
    gave 0.948 with 2 threads and 0.910 with 1: float sums split differently), the exact data and
    the training code (`dvc repro` after a code change reruns this stage, which must then train
    anew, not reuse old folds)."""
    train = params.train.model_dump(mode="json")
    # Where results go and how fast they come don't change them; `devices` is counted as `world`.
    for key in RUN_ONLY_TRAIN_KEYS:
        train.pop(key, None)
    payload = {
        "world": world,
        "cpu_threads": (params.train.threads or torch.get_num_threads()) if device_type == "cpu" else None,
        "train": train,
        "threshold": params.evaluate.threshold,
        "manifest_sha256": store.meta.get("manifest_sha256"),
        "n_images": int(len(store.images)),
        "classes": store.classes,
        "code": code_fingerprint(SRC_ROOT, TRAINING_PACKAGES),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------- state
def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _end_if_running(client, run_id: str | None, status: str, cfg: MlflowParams,
                    tags: dict[str, str] | None = None) -> bool:
    """End a run still RUNNING with `status`; finished/failed runs stay as they are."""
    if not run_id:
        return False
    run = tracking.find_run(client, run_id, cfg)
    if run is None or run.info.status != "RUNNING":
        return False
    for key, value in (tags or {}).items():
        client.set_tag(run_id, key, value)
    client.set_terminated(run_id, status=status)
    return True


def _mark_killed(client, run_id: str | None, cfg: MlflowParams) -> bool:
    """KILLED for a run a dead process left RUNNING."""
    return _end_if_running(client, run_id, "KILLED", cfg, {"bone_health.interrupted": "true"})


def _kill_orphans(client, experiment_id: str, parent_id: str, cfg: MlflowParams) -> list[str]:
    """Child runs of `parent_id` still RUNNING (their process died): mark them KILLED."""
    runs = tracking.with_retries(f"listing the fold runs of {parent_id}", lambda: client.search_runs(
        [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}' and attributes.status = 'RUNNING'"),
        cfg)
    return [r.info.run_id for r in runs if _mark_killed(client, r.info.run_id, cfg)]


# ----------------------------------------------------------------------------- logging
def test_metrics(result_predictions: pd.DataFrame, classes: list[str], positive: str, threshold: float) -> dict[str, float]:
    probs = result_predictions[[f"prob_{c}" for c in classes]].to_numpy()
    m = classification_metrics(result_predictions["label"].to_numpy(), probs, classes.index(positive), threshold)
    return {f"test_{k}": v for k, v in m.items()}


def aggregate(folds: dict[str, dict], classes: list[str], out: Path) -> dict[str, float]:
    """Parent-run figures: mean/std over folds and the pooled out-of-fold AUC."""
    out_metrics: dict[str, float] = {}
    vals = [f["best_val_auc"] for f in folds.values()]
    aucs = [f["metrics"].get("test_roc_auc", float("nan")) for f in folds.values()]
    out_metrics["cv_val_auc_mean"] = float(np.nanmean(vals)) if vals else float("nan")
    out_metrics["cv_test_roc_auc_mean"] = float(np.nanmean(aucs)) if aucs else float("nan")
    out_metrics["cv_test_roc_auc_std"] = float(np.nanstd(aucs, ddof=1)) if len(aucs) > 1 else 0.0
    pooled = pd.concat([read_fold_predictions(out, int(k)) for k in folds], ignore_index=True)
    out_metrics["cv_oof_roc_auc"] = auc_score(pooled["label"].to_numpy(),
                                              pooled[[f"prob_{c}" for c in classes]].to_numpy())
    out_metrics["cv_folds_finished"] = float(len(folds))
    return out_metrics


class FoldRun:
    """One fold's nested MLflow run, written through the client: the same calls log a fold
    trained here, under torchrun (rank 0), or in a `train.fold_parallel` worker process."""

    def __init__(self, client, experiment_id: str, parent_id: str, parent_name: str, fold: int,
                 key_params: dict[str, Any] | None = None):
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

        self.client = client
        run = client.create_run(experiment_id, run_name=f"fold_{fold}",
                                tags={"fold": str(fold), MLFLOW_PARENT_RUN_ID: parent_id, MLFLOW_RUN_NAME: f"fold_{fold}"})
        self.run_id = run.info.run_id
        self._log(params={"fold": fold, "parent_run_name": parent_name, **(key_params or {})})

    def _log(self, metrics: dict[str, Any] | None = None, params: dict[str, Any] | None = None, step: int = 0) -> None:
        from mlflow.entities import Metric, Param

        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id,
            metrics=[Metric(k, v, now, step) for k, v in tracking.mlflow_metrics(metrics or {}).items()],
            params=[Param(k, str(v)) for k, v in (params or {}).items()])

    def log_epoch(self, epoch: int, record: dict) -> None:
        self._log(metrics={m: record[m] for m in EPOCH_METRICS}, step=epoch)

    def finish(self, result: FoldResult, metrics: dict[str, float]) -> None:
        self._log(params={f"n_{part}": n for part, n in result.split_sizes.items()},
                  metrics={**metrics, "best_epoch": result.best_epoch, "best_val_auc": result.best_val_auc,
                           "epochs_run": len(result.history), "fold_seconds": result.seconds})
        ckpt = Path(result.checkpoint_dir)
        self.client.log_artifact(self.run_id, str(ckpt / CHECKPOINT_FILE), artifact_path="checkpoint")
        self.client.log_artifact(self.run_id, str(ckpt / META_FILE), artifact_path="checkpoint")
        self.client.log_artifact(self.run_id, str(ckpt / PREDICTIONS_FILE))
        self.client.set_terminated(self.run_id, status="FINISHED")

    def fail(self) -> None:
        try:
            # no retries: the error being reported is what the user needs, and soon
            _end_if_running(self.client, self.run_id, "FAILED", MlflowParams(retries=0))
        except Exception:  # noqa: BLE001 - the original error matters more than this bookkeeping
            pass


def fold_figures(done: dict[str, Any]) -> dict[str, float]:
    """One fold's line in train's closing table: its test-fold figures, best epoch and time."""
    m = done.get("metrics") or {}
    return {"test_roc_auc": m.get("test_roc_auc"), "test_sensitivity": m.get("test_sensitivity"),
            "test_specificity": m.get("test_specificity"), "best_epoch": done.get("best_epoch"),
            "best_val_auc": done.get("best_val_auc"), "seconds": done.get("seconds")}


def _running_run_ids(state: dict) -> list[str]:
    """Runs of folds in progress: `running` is {fold: run_id}."""
    return [r for r in (state.get("running") or {}).values() if r]


def log_learning_curves(out: Path, n_folds: int, folds: dict[str, dict], name: str) -> None:
    """Every fold's learning curve (its history.csv) in one PNG on the active parent run."""
    import mlflow

    histories = read_fold_histories(out, n_folds)
    if not histories:  # folds trained by a version that wrote no history
        return
    best = {int(k): int(f["best_epoch"]) for k, f in folds.items() if f.get("best_epoch")}
    with tempfile.TemporaryDirectory() as tmp:
        path = plot_learning_curves(histories, Path(tmp) / "learning_curves.png",
                                    f"learning curves, {len(histories)} of {n_folds} folds: {name}", best)
        mlflow.log_artifact(str(path), artifact_path="plots")


# ----------------------------------------------------------------------------- the stage
def checked_store(params: Params) -> PreparedStore:
    """The prepared store, and the train settings that cannot work with it or together."""
    cfg = params.train
    store = PreparedStore.open(params.prepare.out)
    if store.positive_class not in store.classes:
        raise BoneHealthError(f"{store.root}/meta.json: positive_class {store.positive_class!r} not in {store.classes}")
    if cfg.fold_parallel > 1 and cfg.devices > 1:
        raise BoneHealthError("train.fold_parallel and train.devices both spread training over devices: "
                              "set one of them to 1")
    if cfg.sync_bn and (cfg.devices > 1 or distributed.launched_by_torchrun()) \
            and select_device(cfg.device).type != "cuda":
        raise BoneHealthError("train.sync_bn: torch's SyncBatchNorm runs on CUDA only; set train.sync_bn=false "
                              "on CPU (each process then normalises its own shard of the batch)")
    return store


def run_cv(params: Params, *, resume: bool = True, ctx: Dist | None = None, device=None) -> CvRun:
    """Train every fold (or the unfinished ones) and write `{train.out}/cv.json`; returns it.

    Under torchrun every rank calls this: rank 0 plans, logs and writes; the others train the
    folds rank 0 names and receive its cv.json at the end.
    """
    ctx = ctx or Dist()
    cfg = params.train
    store = checked_store(params)
    n_folds = store.n_folds
    out = Path(cfg.out)
    device = torch.device(device) if device is not None else select_device(cfg.device)
    if not ctx.is_main:
        for k in ctx.broadcast(None):
            train_fold(params, store, k, fold_dir(out, k), device=device, ctx=ctx)
        return ctx.broadcast(None)

    import mlflow
    from mlflow.tracking import MlflowClient

    out.mkdir(parents=True, exist_ok=True)
    experiment_id = tracking.configure(params.mlflow)
    client = MlflowClient()
    fp = fingerprint(params, store, ctx.world, device.type)
    name = run_name(params, store)

    previous = _read_json(out / STATE_FILE)
    state = previous if resume and previous and previous.get("fingerprint") == fp else None
    if state is not None:
        # Finished folds are deleted below only on the store's own answer that their run is gone:
        # an error that could not be classified stops here (tracking.run_state), folds intact.
        parent_state = tracking.run_state(client, str(state.get("parent_run_id")), params.mlflow) \
            if state.get("parent_run_id") else "missing"
        if parent_state != "active":
            log.info("train: the CV run %s of %s is %s in MLflow: training every fold anew",
                     state.get("parent_run_id"), out / STATE_FILE, parent_state)
            state = None
    elif previous:
        log.info("train: settings, data or code differ from %s (or --no-resume): training every fold anew",
                 out / STATE_FILE)
    if previous and state is None:
        # Not resumable: close what the old run left open.
        for run_id in _running_run_ids(previous) + [previous.get("parent_run_id")]:
            _mark_killed(client, run_id, params.mlflow)
    if state is not None:
        killed = [r for r in _running_run_ids(state) if _mark_killed(client, r, params.mlflow)]
        killed += _kill_orphans(client, experiment_id, state["parent_run_id"], params.mlflow)
        if killed:
            log.info("resume: marked interrupted fold run(s) KILLED: %s", ", ".join(sorted(set(killed))))
        state["running"] = {}
        cv = peek_cv(out)
        if cv and cv.parent_run_id == state["parent_run_id"] and len(state["folds"]) == n_folds \
                and all(fold_complete(out, k) for k in range(n_folds)):
            log.info("train: all %d folds already finished (parent run %s)", n_folds, cv.parent_run_id)
            ctx.broadcast([])
            return ctx.broadcast(cv)
    else:
        for stale in out.glob("fold_*"):
            if stale.is_dir() and re.fullmatch(r"fold_\d+", stale.name):
                shutil.rmtree(stale)
        tags = {
            "git_commit": tracking.git_commit(),
            "manifest_sha256": str(store.meta.get("manifest_sha256", "")),
            "dataset": dataset_name(params),
            "device": str(device),
            "world_size": str(ctx.world),
            "model": cfg.model,
            "store": str(store.root),
            "mode": str(store.meta.get("mode", "")),
            "bone_health.changed": ", ".join(f"{k}={v}" for k, v in changed_settings(params).items())[:5000]
            or "(defaults)",
        }
        if os.environ.get(DVC_EXP_ENV):
            tags["dvc.exp_name"] = os.environ[DVC_EXP_ENV]
        # The client makes runs without the context tags mlflow.start_run adds (user, source, git);
        # the UI's "User" and "Source" columns need them.  Settings-derived values (the store path,
        # say) are shown in the UI: no URL password in them.
        from mlflow.tracking.context.registry import resolve_tags

        parent = client.create_run(experiment_id, run_name=name,
                                   tags=resolve_tags(redact_params(tags)))
        state = {"fingerprint": fp, "parent_run_id": parent.info.run_id, "folds": {}, "running": {},
                 "sessions": 0}
    (out / CV_FILE).unlink(missing_ok=True)  # a cv.json that is present is a finished one
    atomic_write_json(out / STATE_FILE, state)

    classes, positive = store.classes, store.positive_class
    pending = [k for k in range(n_folds) if not (str(k) in state["folds"] and fold_complete(out, k))]
    for k in sorted(set(range(n_folds)) - set(pending)):
        log.info("fold %d: reusing finished fold (run %s)", k, state["folds"][str(k)]["run_id"])
    ctx.broadcast(pending)
    started = time.perf_counter()
    warnings = data_warnings(params, store)
    for line in warnings:
        log.warning("warning: %s", line)
    with mlflow.start_run(run_id=state["parent_run_id"]) as parent:
        state["sessions"] = int(state.get("sessions", 0)) + 1
        if state["sessions"] == 1:
            tracking.log_params_flat(flatten(params))
            log_dataset(params, store)
        else:
            mlflow.set_tag("resumed_sessions", str(state["sessions"] - 1))
        if warnings:
            mlflow.set_tag("bone_health.warnings", "\n".join(warnings)[:5000])
        runs: dict[int, FoldRun] = {}

        def start(k: int) -> dict:
            runs[k] = FoldRun(client, experiment_id, state["parent_run_id"], parent.info.run_name, k,
                              key_params=fold_key_params(params))
            state["running"][str(k)] = runs[k].run_id
            atomic_write_json(out / STATE_FILE, state)
            return {"mlflow_run_id": runs[k].run_id, "parent_run_id": state["parent_run_id"]}

        def done(k: int, result: FoldResult) -> None:
            metrics = test_metrics(result.test_predictions, classes, positive, params.evaluate.threshold)
            runs[k].finish(result, metrics)
            state["folds"][str(k)] = {
                "run_id": runs[k].run_id, "best_epoch": result.best_epoch,
                "best_val_auc": result.best_val_auc, "seconds": result.seconds, "metrics": metrics,
            }
            state["running"].pop(str(k), None)
            atomic_write_json(out / STATE_FILE, state)

        try:
            if cfg.fold_parallel > 1 and len(pending) > 1:
                train_folds_in_parallel(params, pending, out, device, start=start,
                                        epoch=lambda k, e, r: runs[k].log_epoch(e, r), done=done)
            else:
                for k in pending:
                    extra = start(k)
                    done(k, train_fold(params, store, k, fold_dir(out, k), epoch_callback=runs[k].log_epoch,
                                       device=device, extra_meta=extra, ctx=ctx))
        except Exception:
            for k in list(state["running"]):
                runs[int(k)].fail()
                # a fold that failed is trained anew on resume: its partial files only take space
                # (the disk may be what is full)
                shutil.rmtree(fold_dir(out, int(k)), ignore_errors=True)
            raise
        summary = aggregate(state["folds"], classes, out)
        mlflow.log_metrics(tracking.mlflow_metrics({**summary, "cv_seconds_this_session": time.perf_counter() - started}))
        log_learning_curves(out, n_folds, state["folds"], name)
        mlflow.set_tag("mlflow.note.content", run_description(params, store, summary, warnings))
    cv = CvRun(parent_run_id=state["parent_run_id"], folds=n_folds,
               fold_run_ids={str(k): state["folds"][str(k)]["run_id"] for k in range(n_folds)},
               run_name=name, metrics=summary, warnings=warnings,
               fold_figures={k: fold_figures(state["folds"][k]) for k in sorted(state["folds"], key=int)})
    write_cv(out, cv)
    return ctx.broadcast(cv)
