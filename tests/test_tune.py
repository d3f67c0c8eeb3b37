"""Optuna search on tiny data: pruning, resuming, parallel workers, crash recovery, MLflow layout."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from src import tune
from src.core import params_file
from src.core.config import load_params, params_from_dict, with_values
from src.tuning import pruners, search
from src.tuning import study as tuning_study
from tests.train_helpers import make_tiny_store, tiny_params, write_params

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_tiny_store(tmp_path_factory.mktemp("store"), n_per_class=12, size=32, folds=3)


def tune_params(tmp_path, store, **tune_cfg):
    base = tiny_params(tmp_path, store, epochs=1)
    values = {"tune.out": str(tmp_path / "tune"), "tune.n_trials": 3, "tune.n_startup_trials": 1,
              "tune.pruner": "median", "tune.pruner_startup_steps": 1, "tune.pruner_startup_trials": 2,
              "tune.space": {"train.lr": {"type": "categorical", "choices": [0.01, 1.0e-9]}},
              "tune.heartbeat_interval": 0.5, "tune.grace_period": 3.0}
    values.update({f"tune.{k}": v for k, v in tune_cfg.items()})
    return with_values(base, values)



def child_runs(params, parent_id):
    mlflow.set_tracking_uri(params.mlflow.tracking_uri)
    client = MlflowClient()
    exp = client.get_experiment_by_name(params.mlflow.experiment)
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")


def test_space_entries_are_validated(tmp_path, store):
    params = tiny_params(tmp_path, store)
    with pytest.raises(Exception, match="low < high"):
        with_values(params, {"tune.space": {"train.lr": {"type": "float", "low": 1.0, "high": 0.1}}})
    with pytest.raises(Exception, match="not a parameter"):
        with_values(params, {"tune.space": {"train.learning_rate": {"type": "float", "low": 0.1, "high": 1}}})
    with pytest.raises(Exception, match="choices"):
        with_values(params, {"tune.space": {"train.optimizer": {"type": "categorical"}}})


@pytest.mark.slow
def test_study_prunes_a_bad_trial_logs_mlflow_and_resumes(tmp_path, store):
    params = with_values(tune_params(tmp_path, store), {"train.epochs": 4})
    url = tuning_study.storage_url(params)
    study = tuning_study.open_study(params, url)
    # Two sensible trials, then one that cannot learn (lr 1e-9): the median pruner stops it after fold 0.
    for lr in (0.01, 0.01, 1.0e-9):
        study.enqueue_trial({"train.lr": lr})
    parent = search.study_parent_run(params, url)
    search.run_worker(params, url, target=3, deadline=None, parent_id=parent)

    study = tuning_study.open_study(params, url)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED]
    assert trials[2].user_attrs["folds_trained"] < store_folds(store)
    assert trials[0].user_attrs["folds_trained"] == store_folds(store)
    assert sorted(trials[0].intermediate_values) == list(range(store_folds(store)))  # step = fold
    for t in trials:  # each trial reported exactly the folds it trained, in its own order
        trained = t.user_attrs["fold_order"][:t.user_attrs["folds_trained"]]
        assert sorted(trained) == sorted(t.intermediate_values)

    out = search.write_outputs(params, study, parent)
    fragment = yaml.safe_load(out.read_text())
    assert fragment == {"train": {"lr": 0.01}}
    merged = params_file.merge_fragment(params.model_dump(mode="json"), fragment)
    assert params_from_dict(merged).train.lr == 0.01

    runs = child_runs(params, parent)
    assert len(runs) == 3
    states = {r.data.tags["optuna.trial_number"]: r.data.tags["optuna.state"] for r in runs}
    assert states == {"0": "complete", "1": "complete", "2": "pruned"}
    # a pruned trial did what was asked: FINISHED with its tag, not KILLED like a crash
    assert {r.info.status for r in runs} == {"FINISHED"}
    for r in runs:
        assert "fold/val_auc" in r.data.metrics
        assert r.data.params["train.lr"] in ("0.01", "1e-09")
    best = [r for r in runs if r.data.tags.get("best_trial") == "true"]
    assert len(best) == 1 and best[0].data.tags["optuna.trial_number"] == str(study.best_trial.number)
    client = MlflowClient()
    artifacts = {a.path for a in client.list_artifacts(parent, "plots")}
    assert "plots/optimization_history.png" in artifacts
    history = client.get_metric_history(best[0].info.run_id, "fold/val_auc")
    assert sorted(m.step for m in history) == list(range(store_folds(store)))

    # the same command again continues the same study and adds trials to it
    params2 = with_values(params, {"tune.n_trials": 1})
    search.run_worker(params2, url, target=tuning_study.count_counted(study) + 1, deadline=None, parent_id=parent)
    assert len(tuning_study.open_study(params, url).get_trials()) == 4
    assert search.study_parent_run(params, url) == parent  # one parent run per study


def test_each_trial_trains_its_folds_in_its_own_reproducible_order(tmp_path, store):
    assert load_params(ROOT / "params.yaml").tune.shuffle_folds  # shipped on
    params = tune_params(tmp_path, store, pruner="wilcoxon")
    orders = [search.fold_order(params, n, 5) for n in range(8)]
    assert all(sorted(order) == list(range(5)) for order in orders)
    assert len({tuple(order) for order in orders}) > 1  # not one order for every trial
    assert orders == [search.fold_order(params, n, 5) for n in range(8)]  # reproducible from the seed
    other_seed = with_values(params, {"tune.sampler_seed": 1})
    assert [search.fold_order(other_seed, n, 5) for n in range(8)] != orders
    assert search.fold_order(with_values(params, {"tune.shuffle_folds": False}), 3, 5) == [0, 1, 2, 3, 4]
    # the median pruner reads steps as progress: folds in order whatever shuffle_folds says
    assert search.fold_order(with_values(params, {"tune.pruner": "median"}), 3, 5) == [0, 1, 2, 3, 4]


def add_complete(study, folds: list[float]) -> None:
    """A finished trial with these per-fold scores (what the pruners compare against)."""
    import optuna

    study.add_trial(optuna.trial.create_trial(value=sum(folds) / len(folds),
                                              intermediate_values=dict(enumerate(folds))))


def prune_decisions(study, folds: list[float], n_folds: int | None = None) -> list[bool]:
    """should_prune() after each fold of a new trial reporting these scores; with `n_folds`
    the trial says how many folds it has (as run_trial does), which arms the exact bound."""
    trial = study.ask()
    if n_folds:
        trial.set_user_attr("fold_order", list(range(n_folds)))
    decisions = []
    for fold, score in enumerate(folds):
        trial.report(score, step=fold)
        decisions.append(trial.should_prune())
    return decisions


def test_median_pruner_waits_for_its_own_startup_trials_not_the_samplers(tmp_path, store):
    # TPE samples 10 trials at random; the pruner must still start after 3 completed trials
    params = tune_params(tmp_path, store, pruner="median", n_startup_trials=10, pruner_startup_trials=3,
                         pruner_startup_steps=1)
    study = tuning_study.open_study(params, tuning_study.storage_url(params))
    for _ in range(2):
        add_complete(study, [0.9, 0.9, 0.9])
    assert prune_decisions(study, [0.1, 0.1]) == [False, False]  # 2 completed: too few
    add_complete(study, [0.9, 0.9, 0.9])
    assert prune_decisions(study, [0.1]) == [True]  # the 3rd completed trial arms it


def test_default_wilcoxon_stops_a_trial_that_lost_its_first_two_folds(tmp_path, store):
    shipped = load_params(ROOT / "params.yaml").tune
    assert shipped.pruner == "wilcoxon"
    params = tune_params(tmp_path, store, pruner="wilcoxon", pruner_p_threshold=shipped.pruner_p_threshold,
                         pruner_startup_steps=shipped.pruner_startup_steps)
    study = tuning_study.open_study(params, tuning_study.storage_url(params))
    add_complete(study, [0.8, 0.7, 0.9, 0.8, 0.75])
    # 2 lost folds of 2: one-sided p = 0.25 < 0.3, so it stops with 3 of 5 folds saved
    assert prune_decisions(study, [0.6, 0.5]) == [False, True]
    # one fold lost, one won: no evidence, it goes on
    assert prune_decisions(study, [0.6, 0.9, 0.7]) == [False, False, False]
    # the old threshold 0.2 could not stop the same trial before its 3rd fold
    strict = tuning_study.open_study(with_values(params, {"tune.pruner_p_threshold": 0.2}), tuning_study.storage_url(params))
    assert prune_decisions(strict, [0.6, 0.5, 0.7]) == [False, False, True]


def test_unreachable_bound_is_exact():
    # (0.8 + 4 x 1.0) / 5 = 0.96: below a best of 0.97, not below 0.96 (a tie could still win)
    assert pruners.unreachable([0.8], 5, best=0.97)
    assert not pruners.unreachable([0.8], 5, best=0.96)
    assert not pruners.unreachable([0.8, float("nan")], 5, best=0.99)  # NaN folds: the mean is not a plain sum
    assert not pruners.unreachable([0.1] * 5, 5, best=0.99)  # every fold done: nothing left to save
    assert not pruners.unreachable([], 5, best=0.99)


def test_a_trial_that_cannot_beat_the_best_stops_at_once(tmp_path, store):
    shipped = load_params(ROOT / "params.yaml").tune
    assert shipped.prune_unreachable
    params = tune_params(tmp_path, store, pruner="wilcoxon", pruner_p_threshold=shipped.pruner_p_threshold,
                         pruner_startup_steps=shipped.pruner_startup_steps)
    study = tuning_study.open_study(params, tuning_study.storage_url(params))
    add_complete(study, [0.99, 0.98, 1.0, 0.99, 0.99])  # best mean 0.99
    # 0.9 then four perfect folds would give 0.98: stopped after one fold, before Wilcoxon may speak
    assert prune_decisions(study, [0.9], n_folds=5) == [True]
    # 0.97 could still reach 0.994: only the statistics decide, and one fold is too few for them
    assert prune_decisions(study, [0.97], n_folds=5) == [False]
    off = tuning_study.open_study(with_values(params, {"tune.prune_unreachable": False}), tuning_study.storage_url(params))
    assert prune_decisions(off, [0.9], n_folds=5) == [False]


def test_unreachable_bound_never_stops_the_trial_that_would_have_won():
    # Random studies replayed through the bound alone: whatever it stops, the best trial of
    # the unpruned study always completes, so the best score is kept exactly.
    import optuna

    rng = np.random.default_rng(0)
    for _ in range(40):
        scores = np.clip(rng.normal(rng.uniform(0.6, 0.95, (20, 1)), 0.08, (20, 5)), 0, 1)
        study = optuna.create_study(direction="maximize", pruner=pruners.UnreachablePruner(optuna.pruners.NopPruner()))
        stopped = 0
        for row in scores:
            trial = study.ask()
            trial.set_user_attr("fold_order", list(range(5)))
            for fold in rng.permutation(5):
                trial.report(float(row[fold]), step=int(fold))
                if trial.should_prune():
                    study.tell(trial, state=TrialState.PRUNED)
                    stopped += 1
                    break
            else:
                study.tell(trial, float(row.mean()))
        assert study.best_value == pytest.approx(scores.mean(axis=1).max())
        assert stopped > 0 or scores.mean(axis=1).max() < 0.75  # it does stop trials where it can


@pytest.mark.slow
def test_no_pruning_after_the_last_fold(tmp_path, store):
    # the pruner may only speak after the last fold, when nothing is left to save: the bad
    # trial must complete with all folds rather than be thrown away as pruned
    n = store_folds(store)
    params = tune_params(tmp_path, store, n_trials=2, pruner_startup_trials=1, pruner_startup_steps=n)
    url = tuning_study.storage_url(params)
    study = tuning_study.open_study(params, url)
    for lr in (0.01, 1.0e-9):
        study.enqueue_trial({"train.lr": lr})
    search.run_worker(params, url, target=2, deadline=None, parent_id=search.study_parent_run(params, url))
    study = tuning_study.open_study(params, url)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE]
    assert [t.user_attrs["folds_trained"] for t in trials] == [n, n]
    assert pruners.make_pruner(params).prune(study, trials[1])  # it would have been pruned


def store_folds(store) -> int:
    import json

    return json.loads((Path(store) / "meta.json").read_text())["folds"]


def test_stale_trial_is_failed_and_requeued(tmp_path, store):
    params = tune_params(tmp_path, store)
    url = tuning_study.storage_url(params)
    study = tuning_study.open_study(params, url)
    trial = study.ask({"train.lr": __import__("optuna").distributions.CategoricalDistribution([0.01, 1e-9])})
    study._storage.set_trial_user_attr(trial._trial_id, tuning_study.HEARTBEAT_ATTR, time.time())
    assert tuning_study.recover_stale_trials(study, grace=60, max_retry=1) == []  # alive: left alone
    assert tuning_study.recover_stale_trials(study, grace=60, max_retry=1, now=time.time() + 120) == [trial.number]
    frozen = study.get_trials()
    assert frozen[0].state == TrialState.FAIL and frozen[0].user_attrs[tuning_study.RETRIED_ATTR] is True
    assert frozen[1].state == TrialState.WAITING and frozen[1].user_attrs["retry_of"] == trial.number
    assert frozen[1].params == {} or frozen[1].system_attrs.get("fixed_params") == frozen[0].params
    assert tuning_study.count_counted(study) == 0  # the failed-and-retried trial does not count


def run_cli(args, cwd=ROOT, env=None, **kw):
    return subprocess.Popen([sys.executable, "-m", "src.tune", *args], cwd=cwd, env={**os.environ, **(env or {})},
                            start_new_session=True, **kw)


@pytest.mark.slow
def test_two_workers_share_a_journal_and_run_exactly_n_trials(tmp_path, store):
    params = tune_params(tmp_path, store, pruner="none",
                         space={"train.lr": {"type": "float", "low": 0.001, "high": 0.05, "log": True}})
    path = write_params(params, tmp_path / "params.yaml")
    proc = run_cli(["--params", str(path), "--n-trials", "4", "--n-workers", "2"],
                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    study = tuning_study.open_study(params, tuning_study.storage_url(params))
    trials = study.get_trials()
    assert len(trials) == 4 and all(t.state == TrialState.COMPLETE for t in trials)
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert len({t.user_attrs.get("worker_pid") for t in trials}) >= 1
    assert (tmp_path / "tune" / "best_params.yaml").is_file()
    assert "dvc exp run -S train.lr=" in out
    assert len(child_runs(params, search.study_parent_run(params, tuning_study.storage_url(params)))) == 4


@pytest.mark.slow
def test_killed_worker_trial_is_retried_not_lost(tmp_path, store):
    params = tune_params(tmp_path, store, pruner="none", heartbeat_interval=0.5, grace_period=4.0,
                         space={"train.lr": {"type": "float", "low": 0.001, "high": 0.05, "log": True}})
    # long enough to be killed mid-trial: at 30 epochs the whole tiny trial takes seconds, and the
    # 1 s poll (which also reads the journal) can miss the window between fold 0 and the end
    params = with_values(params, {"train.epochs": 200})
    path = write_params(params, tmp_path / "params.yaml")
    proc = run_cli(["--params", str(path), "--n-trials", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = tuning_study.storage_url(params)
    deadline = time.time() + 300
    running = []
    # Killed once its first fold is on disk: the folder the retry must clean up (16 MB at full size).
    def first_fold_written() -> bool:
        return bool(running) and (search.trial_folder(params, running[0].number) / "fold_0").is_dir()

    while time.time() < deadline and not first_fold_written():
        time.sleep(1)
        if Path(url.removeprefix("journal:///")).exists():
            running = [t for t in tuning_study.open_study(params, url).get_trials(states=(TrialState.RUNNING,))
                       if t.params]  # sampled: it is training now
    assert running, "the worker never started a trial"
    killed = running[0]
    folder = search.trial_folder(params, killed.number)
    assert folder.is_dir()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    time.sleep(params.tune.grace_period + 1)

    quick = with_values(params, {"train.epochs": 1})
    path = write_params(quick, tmp_path / "params.yaml")
    proc = run_cli(["--params", str(path), "--n-trials", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                   text=True)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    trials = tuning_study.open_study(params, url).get_trials()
    assert trials[killed.number].state == TrialState.FAIL
    retry = [t for t in trials if t.user_attrs.get("retry_of") == killed.number]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE
    assert retry[0].params == killed.params == trials[killed.number].params
    # the killed trial's bookkeeping is closed: its MLflow run KILLED, its folder gone
    _, client = search.mlflow_client(params)
    run = client.get_run(trials[killed.number].user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED" and run.data.tags["optuna.state"] == "killed"
    assert not folder.exists()
    assert f"trial {killed.number}'s worker died" in out


def test_apply_writes_best_params_into_params_file_keeping_comments(tmp_path, store):
    params = tune_params(tmp_path, store, pruner="none")
    url = tuning_study.storage_url(params)
    study = tuning_study.open_study(params, url)
    study.enqueue_trial({"train.lr": 0.01})
    parent = search.study_parent_run(params, url)
    search.run_worker(params, url, target=1, deadline=None, parent_id=parent)

    text = (ROOT / "params.yaml").read_text()
    path = tmp_path / "params.yaml"
    # the repo's commented params.yaml, pointed at the tiny store and tmp dirs
    path.write_text(text)
    params_file.apply_to_params_file(path, {"train": {"lr": 0.0123}})
    written = path.read_text()
    assert "lr: 0.0123" in written
    assert "# bone-health: every setting, one section per stage" in written  # comments survive
    assert "# K of the K-fold CV" in written
    assert load_params(path).train.lr == 0.0123


def test_tune_refuses_torchrun_with_one_line(tmp_path, store, monkeypatch, capsys):
    from src.core.cli import run_main

    pfile = write_params(tune_params(tmp_path, store), tmp_path / "params.yaml")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert run_main(tune.main, ["--params", str(pfile)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "src.tune under torchrun would run one study per rank" in err[0]
    assert not (tmp_path / "tune").exists() or not any((tmp_path / "tune").iterdir())
