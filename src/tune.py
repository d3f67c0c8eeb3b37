"""Optuna search over the same folds and the same trainer as the `train` stage.

    python -m src.tune [--n-trials N] [--timeout S] [--study-name NAME] [--storage URL]
                       [--n-workers K] [--apply] [--params FILE] [--set k=v ...]

- Objective: the mean inner-validation ROC-AUC over the K folds of the versioned fold
  assignment (test-fold AUC only when `tune.objective: test_auc`, with a warning).
- Pruning per fold (step = fold): Wilcoxon by default, median, or none.
- Storage: a journal file by default (safe for several processes on one machine); any RDB
  URL for several machines.  Rerunning the same command continues the same study.  A URL with
  a password can come from BONE_HEALTH_TUNE_STORAGE instead of --storage (kept out of `ps`);
  it is printed and logged masked (user:***@host).
- Crash safety: every running trial writes a heartbeat into its user attributes; a trial
  silent for `tune.grace_period` is failed and its parameters re-enqueued (Optuna's own
  heartbeat exists only for RDB storages, so one mechanism serves both).
- MLflow: one parent run per study, one child run per trial, logged directly through
  MlflowClient (optuna-integration's MLflowCallback is deprecated).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time

from optuna.trial import TrialState

from src.artifacts.store import PreparedStore
from src.core.cli import run_main
from src.core.config import (
    Params,
    add_params_args,
    flatten,
    params_files,
    params_from_args,
    with_values,
)
from src.core.errors import BoneHealthError
from src.core.params_file import apply_to_params_file, dvc_command
from src.core.redact import redact_url
from src.model.distributed import launched_by_torchrun
from src.tuning.search import (
    best_fragment,
    clean_up_killed,
    run_worker,
    study_parent_run,
    write_outputs,
)
from src.tuning.study import (
    count_counted,
    open_study,
    recover_stale_trials,
    storage_url,
    study_lock,
)


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


# Workers get the storage URL and any --set holding a credential through their environment:
# a command line is world-readable (`ps`, /proc/PID/cmdline), an environment is not.
STORAGE_ENV = "BONE_HEALTH_TUNE_STORAGE"
SETS_ENV = "BONE_HEALTH_TUNE_SETS"


def resolve(args: argparse.Namespace) -> Params:
    if args.worker_target is not None and os.environ.get(SETS_ENV):  # a worker's --set items, see worker_command
        args.overrides = json.loads(os.environ[SETS_ENV])
    params = params_from_args(args)
    storage = args.storage or os.environ.get(STORAGE_ENV) or None
    values = {"tune.n_trials": args.n_trials, "tune.timeout": args.timeout, "tune.study_name": args.study_name,
              "tune.storage": storage, "tune.n_workers": args.n_workers}
    return with_values(params, {k: v for k, v in values.items() if v is not None}, source="command line")


def worker_command(args: argparse.Namespace, params: Params, target: int, parent_id: str,
                   deadline: float | None) -> tuple[list[str], dict[str, str]]:
    """A worker's argv, free of credentials, and its environment, which carries them."""
    cmd = [sys.executable, "-m", "src.tune"]
    for path in params_files(args):
        cmd += ["--params", path]
    env = {**os.environ, STORAGE_ENV: storage_url(params)}
    if any(redact_url(item) != item for item in args.overrides):
        env[SETS_ENV] = json.dumps(args.overrides)  # all of them, so their order (later wins) is kept
    else:
        for item in args.overrides:
            cmd += ["--set", item]
    cmd += ["--study-name", params.tune.study_name, "--worker-target", str(target), "--worker-parent", parent_id]
    if deadline:
        cmd += ["--worker-deadline", str(deadline)]
    return cmd, env


def spawn_workers(args: argparse.Namespace, params: Params, target: int, parent_id: str, deadline: float | None) -> None:
    cmd, env = worker_command(args, params, target, parent_id, deadline)
    procs = [subprocess.Popen(cmd, env=env, start_new_session=True) for _ in range(params.tune.n_workers)]
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
    if launched_by_torchrun():
        raise BoneHealthError("src.tune under torchrun would run one study per rank: start it with python, "
                              "and use --n-workers (or several machines on one --storage) for parallel trials")
    if params.train.devices > 1 or params.train.fold_parallel > 1:
        print("note: trials train each fold in one process; train.devices and train.fold_parallel apply to "
              "src.train only (tune's parallelism is --n-workers)", file=sys.stderr)
    study = open_study(params, url)
    parent_id = study_parent_run(params, url)
    if args.apply:
        return apply_best(args, params, study, parent_id)
    PreparedStore.open(params.prepare.out)  # fail early, before any worker starts
    with study_lock(params, url):
        clean_up_killed(params, study, recover_stale_trials(study, params.tune.grace_period, params.tune.max_retry))
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
        print(f"best parameters: {out}\n  try them: {dvc_command(fragment, digits=4)}\n"
              f"  or keep them: python -m src.tune --apply --study-name {params.tune.study_name}  (edits {params_files(args)[-1]})")
    return 0


def apply_best(args: argparse.Namespace, params: Params, study, parent_id: str) -> int:
    if write_outputs(params, study, parent_id) is None:
        raise BoneHealthError(f"tune: study {params.tune.study_name!r} has no completed trial to apply")
    fragment = best_fragment(study)
    target = params_files(args)[-1]  # the file that wins: a value written anywhere else would be overridden
    apply_to_params_file(target, fragment)
    print(f"applied trial {study.best_trial.number} to {target}: {flatten(fragment)}")
    return 0


def summary(study, seconds: float, url: str, params: Params) -> None:
    counts = {s.name.lower(): len(study.get_trials(deepcopy=False, states=(s,)))
              for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)}
    folds = sum(int(t.user_attrs.get("folds_trained", 0)) for t in study.get_trials(deepcopy=False))
    shown = redact_url(url)
    print(f"study {params.tune.study_name!r} in {shown}: {counts}; fold-trainings {folds}; {seconds:.0f} s this run")
    if url.startswith("journal:///"):
        path = url.removeprefix("journal:///")
        print(f"dashboard: optuna-dashboard {path}  (or: optuna-dashboard --storage-class journal {path})")
    else:
        hint = "  (put the password back in place of ***)" if shown != url else ""
        print(f"dashboard: optuna-dashboard {shown}{hint}")


if __name__ == "__main__":
    raise SystemExit(run_main(main))
