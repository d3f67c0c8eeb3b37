"""Optuna search over the same folds and the same trainer as the `train` stage.

    python -m src.tune [--n-trials N] [--timeout S] [--study-name NAME] [--storage URL]
                       [--n-workers K] [--apply] [--params FILE] [--set k=v ...]

- Objective: the mean inner-validation ROC-AUC over the K folds of the versioned fold
  assignment (test-fold AUC only when `tune.objective: test_auc`, with a warning).
- Pruning per fold (step = fold): Wilcoxon by default, median, or none.
- Storage: a journal file by default (safe for several processes on one machine); any RDB
  URL for several machines.  Rerunning the same command continues the same study.
- Crash safety: every running trial writes a heartbeat into its user attributes; a trial
  silent for `tune.grace_period` is failed and its parameters re-enqueued (Optuna's own
  heartbeat exists only for RDB storages, so one mechanism serves both).
- MLflow: one parent run per study, one child run per trial, logged directly through
  MlflowClient (optuna-integration's MLflowCallback is deprecated).
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import optuna
import yaml
from optuna.trial import TrialState

from src.cli import run_main
from src.config import (Params, add_params_args, flatten, load_params, params_from_args, params_from_dict,
                        with_values)
from src.errors import BoneHealthError
from src.fileio import atomic_write_text

STUDY_TAG = "bone_health.tune_study"
KIND_TAG = "bone_health.kind"
# FAIL trials count as done (a crashing config must not loop forever) unless their
# heartbeat went stale, in which case they are marked RETRIED and re-enqueued.
RETRIED_ATTR = "retried"
HEARTBEAT_ATTR = "heartbeat"


# ------------------------------------------------------------------- storage & study
def storage_url(params: Params) -> str:
    """The storage a study lives in; the default is a journal file under tune.out."""
    if params.tune.storage:
        return params.tune.storage
    return f"journal:///{Path(params.tune.out).resolve() / (params.tune.study_name + '.journal')}"


def open_storage(url: str):
    from optuna.storages.journal import JournalFileBackend

    if url.startswith("journal:///") or url.endswith(".journal") and "://" not in url:
        path = Path(url.removeprefix("journal:///") if url.startswith("journal:///") else url)
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if url.startswith("sqlite:"):
        warnings.warn("SQLite storage is not safe for parallel workers; use the journal default or PostgreSQL",
                      stacklevel=2)
    if "://" not in url:
        raise BoneHealthError(f"tune.storage: {url!r} is neither a journal path (*.journal) nor a database URL")
    try:
        return optuna.storages.RDBStorage(url)
    except Exception as exc:  # driver missing, server down, bad credentials ...
        raise BoneHealthError(f"tune.storage: cannot open {url!r}: {type(exc).__name__}: {exc}".splitlines()[0]) from None


def make_pruner(params: Params):
    cfg = params.tune
    if cfg.pruner == "none":
        return optuna.pruners.NopPruner()
    if cfg.pruner == "wilcoxon":
        with warnings.catch_warnings():  # "experimental since 3.6": known, and pinned in constraints.txt
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            inner = optuna.pruners.WilcoxonPruner(p_threshold=cfg.pruner_p_threshold,
                                                  n_startup_steps=cfg.pruner_startup_steps)
    else:
        # its own startup count: how many trials TPE samples at random says nothing about
        # how many completed trials make a median worth pruning against
        inner = optuna.pruners.MedianPruner(n_startup_trials=cfg.pruner_startup_trials,
                                            n_warmup_steps=cfg.pruner_startup_steps - 1)
    return UnreachablePruner(inner) if cfg.prune_unreachable else inner


# Fold scores are ROC-AUCs (val or test), so no fold can score above this.
MAX_FOLD_SCORE = 1.0


def unreachable(values: list[float], n_folds: int, best: float) -> bool:
    """True when a trial with these fold scores cannot end above `best` even if every fold
    left scores MAX_FOLD_SCORE.  Folds that later give NaN (dropped by the mean) cannot
    lift it either: each fold score is at most the maximum, so adding folds at the maximum
    is the most any remainder can do."""
    if not values or not np.all(np.isfinite(values)) or len(values) >= n_folds:
        return False
    return (sum(values) + (n_folds - len(values)) * MAX_FOLD_SCORE) / n_folds < best


class UnreachablePruner(optuna.pruners.BasePruner):
    """Stops a trial whose K-fold mean can no longer beat the best completed trial's, then asks
    the wrapped pruner.  Exact, not statistical: it never stops a trial that could still have
    become the best, and it needs no startup trials or steps."""

    def __init__(self, inner: optuna.pruners.BasePruner):
        self.inner = inner

    def prune(self, study, trial) -> bool:
        n_folds = len(trial.user_attrs.get("fold_order") or ())  # set by run_trial
        completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if n_folds and completed:
            best = max(t.value for t in completed)  # the study maximises
            if unreachable(list(trial.intermediate_values.values()), n_folds, best):
                return True
        return self.inner.prune(study, trial)


def open_study(params: Params, url: str | None = None):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=params.tune.sampler_seed, n_startup_trials=params.tune.n_startup_trials)
    return optuna.create_study(storage=open_storage(url or storage_url(params)), study_name=params.tune.study_name,
                               direction="maximize", sampler=sampler, pruner=make_pruner(params), load_if_exists=True)


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


def _done_states():
    return (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)


def count_counted(study) -> int:
    """Trials that count towards a target: finished or running, minus stale ones that were retried."""
    return sum(1 for t in study.get_trials(deepcopy=False, states=_done_states()) if not t.user_attrs.get(RETRIED_ATTR))


@contextlib.contextmanager
def study_lock(params: Params, url: str) -> Iterator[None]:
    """Serialise ask/recover between local workers (a file lock; RDB across machines may overshoot by a trial)."""
    lock_path = Path(params.tune.out) / f".{params.tune.study_name}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def recover_stale_trials(study, grace: float, max_retry: int, now: float | None = None) -> list[int]:
    """Fail RUNNING trials whose heartbeat is older than `grace` s and re-enqueue their params."""
    now = time.time() if now is None else now
    recovered = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        beat = t.user_attrs.get(HEARTBEAT_ATTR) or (t.datetime_start.timestamp() if t.datetime_start else now)
        if now - float(beat) <= grace:
            continue
        retries = int(t.user_attrs.get("retries", 0))
        origin = int(t.user_attrs.get("retry_of", t.number))
        study._storage.set_trial_user_attr(t._trial_id, RETRIED_ATTR, retries < max_retry)
        study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
        if retries < max_retry:
            study.enqueue_trial(dict(t.params), user_attrs={"retry_of": origin, "retries": retries + 1})
        recovered.append(t.number)
    return recovered


class Heartbeat:
    """Background thread stamping the trial's user attrs so a dead worker can be told from a slow one."""

    def __init__(self, study, trial, interval: float):
        self._storage, self._trial_id, self._interval = study._storage, trial._trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _beat(self) -> None:
        self._storage.set_trial_user_attr(self._trial_id, HEARTBEAT_ATTR, time.time())

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            with contextlib.suppress(Exception):  # a finished trial refuses updates: nothing to keep alive
                self._beat()

    def __enter__(self):
        self._beat()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)


# --------------------------------------------------------------------------- MLflow
def mlflow_client(params: Params):
    """(experiment id, client) bound to this params' store, whatever MLflow pointed at before."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from src import tracking

    exp_id = tracking.configure(params.mlflow)
    return exp_id, MlflowClient(tracking_uri=mlflow.get_tracking_uri())


def study_parent_run(params: Params, url: str) -> str:
    """The study's MLflow parent run, created once and found again on every rerun/worker."""
    import mlflow

    from src import tracking

    exp_id, client = mlflow_client(params)
    found = client.search_runs([exp_id], filter_string=f"tags.`{STUDY_TAG}` = '{params.tune.study_name}' "
                                                       f"and tags.`{KIND_TAG}` = 'tune-study'", max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(exp_id, run_name=f"tune-{params.tune.study_name}", tags={
        STUDY_TAG: params.tune.study_name, KIND_TAG: "tune-study", "optuna.storage": url.split("@")[-1],
        "mlflow.source.git.commit": tracking.git_commit(), "objective": params.tune.objective,
        "pruner": params.tune.pruner,
    })
    with mlflow.start_run(run_id=run.info.run_id):
        tracking.log_params_flat({k: v for k, v in flatten(params).items() if not k.startswith("tune.space")})
        mlflow.log_dict({k: v.model_dump(exclude_none=True) for k, v in params.tune.space.items()}, "search_space.json")
    return run.info.run_id


class TrialRun:
    """A child MLflow run for one trial, written through the client (safe across processes)."""

    def __init__(self, params: Params, parent_id: str, trial, values: dict[str, Any]):
        exp_id, self.client = mlflow_client(params)
        self.run_id = self.client.create_run(exp_id, run_name=f"trial-{trial.number:04d}", tags={
            "mlflow.parentRunId": parent_id, STUDY_TAG: params.tune.study_name, KIND_TAG: "tune-trial",
            "optuna.trial_number": str(trial.number),
            **({"optuna.retry_of": str(trial.user_attrs["retry_of"])} if "retry_of" in trial.user_attrs else {}),
        }).info.run_id
        for key, value in values.items():
            self.client.log_param(self.run_id, key, value)

    def log_fold(self, fold: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            if value is not None and np.isfinite(value):
                self.client.log_metric(self.run_id, key, float(value), step=fold)

    def finish(self, state: str, value: float | None) -> None:
        self.client.set_tag(self.run_id, "optuna.state", state)
        if value is not None and np.isfinite(value):
            self.client.log_metric(self.run_id, "objective", float(value))
        status = {"complete": "FINISHED", "pruned": "KILLED", "failed": "FAILED"}[state]
        self.client.set_terminated(self.run_id, status=status)


# -------------------------------------------------------------------------- objective
def fold_objective(params: Params, result) -> dict[str, float]:
    from src.metrics import auc_score

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
    from src.trainer import train_fold

    values = suggest(trial, params)
    tparams = trial_params(params, values)
    run = TrialRun(params, parent_id, trial, values)
    key = "fold_test_auc" if params.tune.objective == "test_auc" else "fold_val_auc"
    trial_dir = Path(params.tune.out) / "trials" / params.tune.study_name / f"{trial.number:05d}"
    order = fold_order(params, trial.number, store.n_folds)
    trial.set_user_attr("fold_order", order)
    scores: list[float] = []
    state, value = "failed", None
    try:
        for done, fold in enumerate(order, start=1):
            result = train_fold(tparams, store, fold, trial_dir / f"fold_{fold}")
            metrics = fold_objective(tparams, result)
            run.log_fold(fold, metrics)
            scores.append(metrics[key])
            trial.report(metrics[key], step=fold)  # step = fold id: the pruner pairs folds across trials
            trial.set_user_attr("folds_trained", done)
            # after the last fold there is nothing left to save: a complete value tells TPE more
            if done < store.n_folds and trial.should_prune():
                state, value = "pruned", float(np.nanmean(scores))
                raise optuna.TrialPruned(f"pruned after fold {fold}")
        state, value = "complete", float(np.nanmean(scores))
        return value
    finally:
        run.finish(state, value)
        if not params.tune.keep_checkpoints:
            shutil.rmtree(trial_dir, ignore_errors=True)


def run_worker(params: Params, url: str, target: int, deadline: float | None, parent_id: str) -> int:
    """Ask-and-tell until the study holds `target` counted trials or the deadline passes."""
    from src.store import PreparedStore

    store = PreparedStore.open(params.prepare.out)
    study = open_study(params, url)
    ran = 0
    while deadline is None or time.time() < deadline:
        with study_lock(params, url):
            recover_stale_trials(study, params.tune.grace_period, params.tune.max_retry)
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
                print(f"trial {trial.number} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
                study.tell(trial, state=TrialState.FAIL)
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
        print("no completed trial yet: nothing to write")
        return None
    best = study.best_trial
    fragment = best_fragment(study)
    params_from_dict(_merge(params.model_dump(mode="json"), fragment), source="best params")  # must validate
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ovm

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
                    print(f"plot {name} skipped: {exc}", file=sys.stderr)


def _merge(base: dict, fragment: dict) -> dict:
    for key, value in fragment.items():
        if isinstance(value, dict):
            base[key] = _merge(base.get(key) or {}, value)
        else:
            base[key] = value
    return base


def dvc_command(fragment: dict) -> str:
    flat = flatten(fragment)
    return "dvc exp run " + " ".join(f"-S {k}={v}" for k, v in flat.items())


def apply_to_params_file(path: str | Path, fragment: dict) -> None:
    """Write the best values into params.yaml, keeping its comments and order (ruamel round-trip)."""
    from ruamel.yaml import YAML

    ry = YAML()
    ry.preserve_quotes = True
    path = Path(path)
    doc = ry.load(path.read_text())
    for key, value in flatten(fragment).items():
        node = doc
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    buf = io.StringIO()
    ry.dump(doc, buf)
    atomic_write_text(path, buf.getvalue())
    load_params(path)  # the written file must still validate


# ------------------------------------------------------------------------------ CLI
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m src.tune", description=__doc__.split("\n\n")[0])
    add_params_args(parser)
    parser.add_argument("--n-trials", type=int, help="trials to add in this invocation (tune.n_trials)")
    parser.add_argument("--timeout", type=float, help="stop starting trials after S seconds (tune.timeout)")
    parser.add_argument("--study-name", help="tune.study_name")
    parser.add_argument("--storage", help="tune.storage: journal path or database URL")
    parser.add_argument("--n-workers", type=int, help="worker processes on this machine (tune.n_workers)")
    parser.add_argument("--apply", action="store_true",
                        help="run no trials: write the study's best parameters into the params file")
    parser.add_argument("--worker-target", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-parent", help=argparse.SUPPRESS)
    parser.add_argument("--worker-deadline", type=float, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def resolve(args: argparse.Namespace) -> Params:
    params = params_from_args(args)
    values = {"tune.n_trials": args.n_trials, "tune.timeout": args.timeout, "tune.study_name": args.study_name,
              "tune.storage": args.storage, "tune.n_workers": args.n_workers}
    return with_values(params, {k: v for k, v in values.items() if v is not None}, source="command line")


def spawn_workers(args: argparse.Namespace, params: Params, target: int, parent_id: str, deadline: float | None) -> None:
    cmd = [sys.executable, "-m", "src.tune", "--params", args.params]
    for item in args.overrides:
        cmd += ["--set", item]
    cmd += ["--study-name", params.tune.study_name, "--storage", storage_url(params),
            "--worker-target", str(target), "--worker-parent", parent_id]
    if deadline:
        cmd += ["--worker-deadline", str(deadline)]
    procs = [subprocess.Popen(cmd, start_new_session=True) for _ in range(params.tune.n_workers)]
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        raise
    if any(codes):
        raise BoneHealthError(f"tune: {sum(1 for c in codes if c)} of {len(codes)} workers failed (exit codes {codes})")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    params = resolve(args)
    url = storage_url(params)
    if args.worker_target is not None:  # a child started by spawn_workers
        run_worker(params, url, args.worker_target, args.worker_deadline, args.worker_parent)
        return 0
    if params.tune.objective == "test_auc":
        print("warning: tune.objective=test_auc selects hyperparameters on the test folds; "
              "the resulting CV estimate is optimistic", file=sys.stderr)
    if not params.tune.space:
        raise BoneHealthError("tune.space: empty; declare at least one parameter to search")
    from src.distributed import launched_by_torchrun

    if launched_by_torchrun():
        raise BoneHealthError("src.tune under torchrun would run one study per rank: start it with python, "
                              "and use --n-workers (or several machines on one --storage) for parallel trials")
    if params.train.devices > 1 or params.train.fold_parallel > 1:
        print("note: trials train each fold in one process; train.devices and train.fold_parallel apply to "
              "src.train only (tune's parallelism is --n-workers)", file=sys.stderr)
    from src.store import PreparedStore

    study = open_study(params, url)
    parent_id = study_parent_run(params, url)
    if args.apply:
        return apply_best(args, params, study, parent_id)
    PreparedStore.open(params.prepare.out)  # fail early, before any worker starts
    with study_lock(params, url):
        recover_stale_trials(study, params.tune.grace_period, params.tune.max_retry)
        target = count_counted(study) + params.tune.n_trials
    deadline = time.time() + params.tune.timeout if params.tune.timeout else None
    started = time.time()
    if params.tune.n_workers > 1:
        spawn_workers(args, params, target, parent_id, deadline)
    else:
        run_worker(params, url, target, deadline, parent_id)
    study = open_study(params, url)
    out = write_outputs(params, study, parent_id)
    summary(study, time.time() - started, url, params)
    if out is not None:
        fragment = best_fragment(study)
        print(f"best parameters: {out}\n  try them: {dvc_command(fragment)}\n"
              f"  or keep them: python -m src.tune --apply --study-name {params.tune.study_name}  (edits {args.params})")
    return 0


def apply_best(args: argparse.Namespace, params: Params, study, parent_id: str) -> int:
    if write_outputs(params, study, parent_id) is None:
        raise BoneHealthError(f"tune: study {params.tune.study_name!r} has no completed trial to apply")
    fragment = best_fragment(study)
    apply_to_params_file(args.params, fragment)
    print(f"applied trial {study.best_trial.number} to {args.params}: {flatten(fragment)}")
    return 0


def summary(study, seconds: float, url: str, params: Params) -> None:
    counts = {s.name.lower(): len(study.get_trials(deepcopy=False, states=(s,)))
              for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)}
    folds = sum(int(t.user_attrs.get("folds_trained", 0)) for t in study.get_trials(deepcopy=False))
    print(f"study {params.tune.study_name!r} in {url}: {counts}; fold-trainings {folds}; {seconds:.0f} s this run")
    if url.startswith("journal:///"):
        path = url.removeprefix("journal:///")
        print(f"dashboard: optuna-dashboard {path}  (or: optuna-dashboard --storage-class journal {path})")
    else:
        print(f"dashboard: optuna-dashboard {url}")


if __name__ == "__main__":
    raise SystemExit(run_main(main))
