"""One trial and one worker: the searched values, the K folds trained in the trial's order with
a report after each (so the pruner can stop it), a child MLflow run per trial under the
study's parent run, and the study's outputs (best_params.yaml, plots) once trials finish."""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import yaml
from optuna.trial import TrialState

from src.artifacts.store import PreparedStore
from src.core import tracking
from src.core.config import Params, flatten, params_from_dict, with_values
from src.core.diskspace import as_output_error
from src.core.errors import BoneHealthError
from src.core.fileio import atomic_write_text
from src.core.params_file import merge_fragment
from src.core.plotting import pyplot
from src.core.redact import redact_params, redact_url
from src.evaluation.metrics import auc_score
from src.model.fit import train_fold
from src.tuning.study import (
    KIND_TAG,
    MLFLOW_RUN_ATTR,
    STUDY_TAG,
    Heartbeat,
    count_counted,
    open_study,
    recover_stale_trials,
    study_lock,
)

log = logging.getLogger(__name__)


def suggest(trial, params: Params) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, entry in params.tune.space.items():
        if entry.type == "categorical":
            values[name] = trial.suggest_categorical(name, entry.choices)
        elif entry.type == "int":
            values[name] = trial.suggest_int(name, int(entry.low), int(entry.high), step=int(entry.step or 1), log=entry.log)
        else:
            values[name] = trial.suggest_float(name, entry.low, entry.high, step=entry.step, log=entry.log)
    return values


def trial_params(params: Params, values: dict[str, Any]) -> Params:
    extra = {"train.epochs": params.tune.epochs} if params.tune.epochs else {}
    return with_values(params, {**values, **extra}, source="tune trial")


# --------------------------------------------------------------------------- MLflow
def mlflow_client(params: Params):
    """(experiment id, client) bound to this params' store, whatever MLflow pointed at before."""
    import mlflow
    from mlflow.tracking import MlflowClient

    exp_id = tracking.configure(params.mlflow)
    return exp_id, MlflowClient(tracking_uri=mlflow.get_tracking_uri())


def study_parent_run(params: Params, url: str) -> str:
    """The study's MLflow parent run, created once and found again on every rerun/worker."""
    import mlflow

    exp_id, client = mlflow_client(params)
    found = client.search_runs([exp_id], filter_string=f"tags.`{STUDY_TAG}` = '{params.tune.study_name}' "
                                                       f"and tags.`{KIND_TAG}` = 'tune-study'", max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(exp_id, run_name=f"tune-{params.tune.study_name}", tags=redact_params({
        STUDY_TAG: params.tune.study_name, KIND_TAG: "tune-study", "optuna.storage": redact_url(url),
        "mlflow.source.git.commit": tracking.git_commit(), "objective": params.tune.objective,
        "pruner": params.tune.pruner,
    }))
    with mlflow.start_run(run_id=run.info.run_id):
        tracking.log_params_flat({k: v for k, v in flatten(params).items() if not k.startswith("tune.space")})
        mlflow.log_dict({k: v.model_dump(exclude_none=True) for k, v in params.tune.space.items()}, "search_space.json")
    return run.info.run_id


def trial_folder(params: Params, number: int) -> Path:
    """Where a trial's fold checkpoints go while it runs (removed when it ends, unless keep_checkpoints)."""
    return Path(params.tune.out) / "trials" / params.tune.study_name / f"{number:05d}"


def clean_up_killed(params: Params, study, numbers: list[int]) -> None:
    """A trial whose worker was killed left its MLflow run RUNNING and its folder behind: mark the
    run KILLED and remove the folder (its retry trains anew under another number)."""
    if not numbers:
        return
    _, client = mlflow_client(params)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    for number in numbers:
        run_id = trials[number].user_attrs.get(MLFLOW_RUN_ATTR) if number in trials else None
        if run_id and (run := tracking.find_run(client, run_id, params.mlflow)) is not None \
                and run.info.status == "RUNNING":
            client.set_tag(run_id, "optuna.state", "killed")
            client.set_terminated(run_id, status="KILLED")
        if not params.tune.keep_checkpoints:
            shutil.rmtree(trial_folder(params, number), ignore_errors=True)
        log.info("tune: trial %d's worker died: its run is KILLED, its folder removed, its parameters re-queued",
                 number)


class TrialRun:
    """A child MLflow run for one trial, written through the client (safe across processes)."""

    def __init__(self, params: Params, parent_id: str, trial, values: dict[str, Any]):
        exp_id, self.client = mlflow_client(params)
        self.run_id = self.client.create_run(exp_id, run_name=f"trial-{trial.number:04d}", tags={
            "mlflow.parentRunId": parent_id, STUDY_TAG: params.tune.study_name, KIND_TAG: "tune-trial",
            "optuna.trial_number": str(trial.number),
            **({"optuna.retry_of": str(trial.user_attrs["retry_of"])} if "retry_of" in trial.user_attrs else {}),
        }).info.run_id
        for key, value in redact_params(values).items():  # a categorical could list URLs
            self.client.log_param(self.run_id, key, value)

    def log_fold(self, fold: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            if value is not None and np.isfinite(value):
                self.client.log_metric(self.run_id, tracking.metric_name(key), float(value), step=fold)

    def finish(self, state: str, value: float | None) -> None:
        self.client.set_tag(self.run_id, "optuna.state", state)
        if value is not None and np.isfinite(value):
            self.client.log_metric(self.run_id, "objective", float(value))
        # A pruned trial did what it was asked: MLflow's KILLED would read as a crash.  It ends
        # FINISHED, and its tag optuna.state=pruned (filter: tags.`optuna.state` = 'pruned') tells it apart.
        status = {"complete": "FINISHED", "pruned": "FINISHED", "failed": "FAILED"}[state]
        self.client.set_terminated(self.run_id, status=status)


# -------------------------------------------------------------------------- objective
def fold_objective(params: Params, result) -> dict[str, float]:
    preds = result.test_predictions
    prob_cols = [c for c in preds.columns if c.startswith("prob_")]
    test_auc = auc_score(preds["label"].to_numpy(), preds[prob_cols].to_numpy()) if len(preds) else float("nan")
    return {"fold_val_auc": float(result.best_val_auc), "fold_test_auc": float(test_auc)}


def shuffles_folds(params: Params) -> bool:
    return params.tune.shuffle_folds and params.tune.pruner != "median"


def fold_order(params: Params, trial_number: int, n_folds: int) -> list[int]:
    """The order one trial trains its folds in: 0..K-1, or a permutation seeded by the
    sampler seed and the trial number (reproducible, different for every trial).  The median
    pruner keeps 0..K-1: it reads a step as progress (its warm-up counts steps, it compares a
    trial's best step so far with the others at the last step), not as a fold to pair."""
    if not shuffles_folds(params):
        return list(range(n_folds))
    rng = np.random.default_rng([params.tune.sampler_seed, trial_number])
    return [int(k) for k in rng.permutation(n_folds)]


def run_trial(params: Params, study, trial, parent_id: str, store) -> float:
    """Train the K folds of one trial, reporting after each fold so the pruner can stop it."""
    values = suggest(trial, params)
    tparams = trial_params(params, values)
    run = TrialRun(params, parent_id, trial, values)
    trial.set_user_attr(MLFLOW_RUN_ATTR, run.run_id)  # so a later start can close it if this worker dies
    key = "fold_test_auc" if params.tune.objective == "test_auc" else "fold_val_auc"
    trial_dir = trial_folder(params, trial.number)
    order = fold_order(params, trial.number, store.n_folds)
    trial.set_user_attr("fold_order", order)
    scores: list[float] = []
    state, value = "failed", None
    try:
        for done, fold in enumerate(order, start=1):
            result = train_fold(tparams, store, fold, trial_dir / f"fold_{fold}",
                                label=f"trial {trial.number} fold {fold}")
            metrics = fold_objective(tparams, result)
            run.log_fold(fold, metrics)
            scores.append(metrics[key])
            trial.report(metrics[key], step=fold)  # step = fold id: the pruner pairs folds across trials
            trial.set_user_attr("folds_trained", done)
            log.info("trial %d fold %d (%d/%d): %s %.4f", trial.number, fold, done, store.n_folds, key, metrics[key])
            # after the last fold there is nothing left to save: a complete value tells TPE more
            if done < store.n_folds and trial.should_prune():
                state, value = "pruned", float(np.nanmean(scores))
                raise optuna.TrialPruned(f"pruned after fold {fold}")
        state, value = "complete", float(np.nanmean(scores))
        return value
    finally:
        run.finish(state, value)
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in redact_params(values).items())
        log.info("trial %d %s: %s %s after %d fold(s); %s", trial.number,
                 "finished" if state == "complete" else state, params.tune.objective,
                 "n/a" if value is None else f"{value:.4f}", len(scores), shown)
        if not params.tune.keep_checkpoints:
            shutil.rmtree(trial_dir, ignore_errors=True)


def run_worker(params: Params, url: str, target: int, deadline: float | None, parent_id: str) -> int:
    """Ask-and-tell until the study holds `target` counted trials or the deadline passes."""
    store = PreparedStore.open(params.prepare.out)
    study = open_study(params, url)
    ran = 0
    while deadline is None or time.time() < deadline:
        with study_lock(params, url):
            clean_up_killed(params, study, recover_stale_trials(study, params.tune.grace_period, params.tune.max_retry))
            if count_counted(study) >= target:
                break
            trial = study.ask()
        trial.set_user_attr("worker_pid", os.getpid())
        with Heartbeat(study, trial, params.tune.heartbeat_interval):
            try:
                value = run_trial(params, study, trial, parent_id, store)
                study.tell(trial, value)
            except optuna.TrialPruned:
                study.tell(trial, state=TrialState.PRUNED)
            except BoneHealthError:
                study.tell(trial, state=TrialState.FAIL)
                raise
            except Exception as exc:  # one bad configuration must not end the study
                study.tell(trial, state=TrialState.FAIL)
                if isinstance(exc, OSError) and as_output_error(exc) is not exc:
                    raise  # but a full, read-only or forbidden disk fails every trial alike
                log.warning("trial %d failed: %s: %s", trial.number, type(exc).__name__, exc)
        ran += 1
    return ran


# ------------------------------------------------------------------------- outputs
def best_fragment(study) -> dict[str, Any]:
    """{'train': {'lr': ...}} from the best trial: a params.yaml fragment."""
    fragment: dict[str, Any] = {}
    for key, value in study.best_trial.params.items():
        node = fragment
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return fragment


def write_outputs(params: Params, study, parent_id: str) -> Path | None:
    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not completed:
        log.info("no completed trial yet: nothing to write")
        return None
    best = study.best_trial
    fragment = best_fragment(study)
    params_from_dict(merge_fragment(params.model_dump(mode="json"), fragment), source="best params")  # must validate
    out = Path(params.tune.out) / "best_params.yaml"
    header = (f"# best trial {best.number} of study {params.tune.study_name!r}: "
              f"{params.tune.objective} = {best.value:.4f}\n")
    atomic_write_text(out, header + yaml.safe_dump(fragment, sort_keys=False))

    _, client = mlflow_client(params)
    client.set_tag(parent_id, "best_trial_number", str(best.number))
    client.log_metric(parent_id, "best_value", float(best.value))
    for run in client.search_runs([client.get_run(parent_id).info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=5000):
        is_best = run.data.tags.get("optuna.trial_number") == str(best.number)
        if is_best or run.data.tags.get("best_trial") == "true":
            client.set_tag(run.info.run_id, "best_trial", "true" if is_best else "false")
    client.log_artifact(parent_id, str(out))
    _log_plots(study, parent_id, client)
    return out


def _log_plots(study, parent_id: str, client) -> None:
    import optuna.visualization.matplotlib as ovm

    plt = pyplot()
    plots = {"optimization_history": ovm.plot_optimization_history,
             "param_importances": ovm.plot_param_importances,
             "parallel_coordinate": ovm.plot_parallel_coordinate,
             "intermediate_values": ovm.plot_intermediate_values}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna marks these plots experimental
        with tempfile.TemporaryDirectory() as tmpdir:
            for name, fn in plots.items():
                try:
                    ax = fn(study)
                    fig = (ax[0] if isinstance(ax, np.ndarray) else ax).figure
                    fig.set_size_inches(9, 5)
                    path = Path(tmpdir) / f"{name}.png"
                    fig.savefig(path, dpi=110, bbox_inches="tight")
                    plt.close(fig)
                    client.log_artifact(parent_id, str(path), artifact_path="plots")
                except (ValueError, RuntimeError) as exc:  # e.g. importances need >1 completed trial
                    log.info("plot %s skipped: %s", name, exc)


