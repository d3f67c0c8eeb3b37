"""Pruning pays: the same seeded Optuna study with and without k-fold pruning.

    python benchmarks/bench_tune.py [--trials 24] [--epochs 12] [--patients 48] [--size 96]
                                    [--model test_efficientnet] [--pruners none,wilcoxon,median]
                                    [--seed 0] [--params params.yaml] [--set section.key=value ...]

Builds a small phantom, prepares it, and runs one study per pruner with the same TPE seed,
search space and fold assignment.  Everything about the search (tune.space, the sampler's
startup count, the pruner settings, the fold order) comes from the params file as shipped; the
benchmark only shrinks the data, the model and the epochs, and trains on one thread
(train.threads=1) so that studies sharing a busy machine compete less.  The defaults are the
smallest setting found in which the models learn the phantom (train loss falls, inner-val AUC
well above chance): where they do not, every fold score is noise, the best score is the luckiest
draw, and no pruner can be judged.  `--set` overrides anything, and the header prints the
pruner settings that were used.

Prints, for each pruner: fold-trainings run, wall time and best objective (mean inner-validation
AUC), then the saving and the best-score change against `none` in the same run, with PASS/FAIL
against issue 6's target: at least 30% fewer fold-trainings at no more than 0.01 loss of best
score.  A pruned study also samples differently (TPE learns from pruned trials), so its best
can move either way for reasons that are not the pruner's decisions.  The replay lines separate
the two: every pruner is replayed over the `none` study's own trials (their fold scores, in each
trial's own fold order, and again in random fold orders), which measures its decisions alone.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from src.core.cli import run_main  # noqa: E402
from src.core.config import (  # noqa: E402
    Params,
    apply_overrides,
    load_params,
    params_from_dict,
    with_values,
)
from src.data.build_store import prepare  # noqa: E402
from src.synthetic.generator import generate  # noqa: E402
from src.tuning import pruners as tuning_pruners  # noqa: E402
from src.tuning import search  # noqa: E402
from src.tuning import study as tuning_study  # noqa: E402

TARGET_SAVING = 0.30
TARGET_MAX_LOSS = 0.01


def bench_params(args: argparse.Namespace, tmp: Path) -> Params:
    shipped = load_params(args.params)
    small = with_values(shipped, {
        "phantom.out": str(tmp / "phantom"), "phantom.masks_out": str(tmp / "masks"),
        "phantom.patients_per_class": args.patients, "phantom.followup_fraction": 0.0,
        "data.root": str(tmp / "phantom"), "data.manifest": str(tmp / "phantom" / "manifest.csv"),
        "data.annotations": str(tmp / "phantom" / "annotations.json"),
        "prepare.out": str(tmp / "prepared"), "prepare.crop.size": args.size,
        "train.model": args.model, "train.epochs": args.epochs, "train.early_stopping_patience": 0,
        "train.out": str(tmp / "models"), "train.threads": 1,
        "mlflow.tracking_uri": f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}",
        "mlflow.artifact_root": str(tmp / "mlruns" / "artifacts"),
        "tune.n_trials": args.trials, "tune.sampler_seed": args.seed, "tune.epochs": None,
        "tune.storage": None, "tune.n_workers": 1,
    }, source="benchmark")
    # --set goes last, through the stages' own parser, so it overrides the benchmark's values too
    return params_from_dict(apply_overrides(small.model_dump(mode="json"), args.overrides), source="--set")


def run_study(base: Params, pruner: str, tmp: Path, trials: int) -> dict:
    params = with_values(base, {"tune.pruner": pruner, "tune.study_name": f"bench-{pruner}",
                                "tune.out": str(tmp / "tune" / pruner)})
    url = tuning_study.storage_url(params)
    tuning_study.open_study(params, url)
    parent = search.study_parent_run(params, url)
    start = time.perf_counter()
    search.run_worker(params, url, target=trials, deadline=None, parent_id=parent)
    seconds = time.perf_counter() - start
    study = tuning_study.open_study(params, url)
    done = study.get_trials()
    return {"pruner": pruner, "seconds": seconds, "best": study.best_value, "best_trial": study.best_trial.number,
            "folds": sum(int(t.user_attrs.get("folds_trained", 0)) for t in done),
            "pruned": sum(t.state.name == "PRUNED" for t in done), "trials": len(done),
            "complete": [t for t in done if t.state.name == "COMPLETE"],
            "pruned_after": sorted(int(t.user_attrs.get("folds_trained", 0)) for t in done
                                   if t.state.name == "PRUNED")}


def replay(base: Params, pruner: str, trials: list, orders: list[list[int]]) -> tuple[int, float]:
    """(fold-trainings, best value) had `pruner` judged these complete trials' fold scores in
    `orders`, one trial after another as they ran: its decisions without any sampler feedback."""
    import optuna
    from optuna.trial import TrialState

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(0),
                                pruner=tuning_pruners.make_pruner(with_values(base, {"tune.pruner": pruner})))
    folds = 0
    for frozen, order in zip(trials, orders):
        trial = study.ask()
        trial.set_user_attr("fold_order", [int(k) for k in order])  # as run_trial does
        for done, fold in enumerate(order, start=1):
            trial.report(frozen.intermediate_values[fold], step=fold)
            folds += 1
            if done < len(order) and trial.should_prune():  # as run_trial: never after the last fold
                study.tell(trial, state=TrialState.PRUNED)
                break
        else:
            study.tell(trial, frozen.value)
    return folds, study.best_value


def print_replays(base: Params, pruners: list[str], trials: list, n_orders: int) -> None:
    k = base.train.folds
    total, best = len(trials) * k, max(t.value for t in trials)
    print(f"\nreplay over the 'none' study's {len(trials)} trials ({total} fold-trainings, best {best:.4f}): "
          f"the pruner's decisions alone")
    print(f"{'pruner':9s} {'own order: saved':>17s} {'delta best':>10s}   "
          f"{n_orders} random orders: saved mean [min, max], delta best mean, share with loss > {TARGET_MAX_LOSS}")
    for pruner in pruners:
        if pruner == "none":
            continue
        own = with_values(base, {"tune.pruner": pruner})
        # the orders this pruner's own study would use (the median pruner keeps 0..K-1)
        folds, got = replay(base, pruner, trials, [search.fold_order(own, t.number, k) for t in trials])
        if not search.shuffles_folds(own):
            print(f"{pruner:9s} {1 - folds / total:17.1%} {got - best:+10.4f}   - (folds in order)")
            continue
        runs = []
        for r in range(n_orders):
            rng = np.random.default_rng(r)
            f, b = replay(base, pruner, trials, [list(rng.permutation(k)) for _ in trials])
            runs.append((1 - f / total, b - best))
        saved, delta = np.array(runs).T
        print(f"{pruner:9s} {1 - folds / total:17.1%} {got - best:+10.4f}   {saved.mean():.1%} "
              f"[{saved.min():.1%}, {saved.max():.1%}], {delta.mean():+.4f}, {np.mean(delta < -TARGET_MAX_LOSS):.1%}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=24)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--patients", type=int, default=48, help="patients per class in the phantom")
    ap.add_argument("--size", type=int, default=96, help="prepared crop size")
    ap.add_argument("--model", default="test_efficientnet", help="timm model (a tiny one keeps 2 x 120 fold-trainings short)")
    ap.add_argument("--replay-orders", type=int, default=200, help="random fold orders per replay")
    ap.add_argument("--pruners", default="none,wilcoxon,median")
    ap.add_argument("--seed", type=int, default=0, help="TPE sampler seed, the same for every pruner")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"), help="the search settings to benchmark")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = ap.parse_args()
    pruners = args.pruners.split(",")
    if "none" not in pruners:
        pruners.insert(0, "none")  # the baseline every saving is measured against

    with tempfile.TemporaryDirectory(prefix="bench_tune_") as tmp_text:
        tmp = Path(tmp_text)
        base = bench_params(args, tmp)
        cfg = base.tune
        print(f"{args.trials} trials, seed {args.seed}, {args.model} at {args.size} px, {args.epochs} epochs, "
              f"{base.train.folds} folds, {2 * args.patients} patients, train.threads={base.train.threads}\n"
              f"sampler n_startup_trials={cfg.n_startup_trials}; pruner_p_threshold={cfg.pruner_p_threshold} "
              f"pruner_startup_steps={cfg.pruner_startup_steps} pruner_startup_trials={cfg.pruner_startup_trials} "
              f"shuffle_folds={cfg.shuffle_folds} prune_unreachable={cfg.prune_unreachable}\n"
              f"space: {', '.join(cfg.space)}", flush=True)
        generate(base.phantom)
        prepare(base)
        rows = []
        for pruner in pruners:
            row = run_study(base, pruner, tmp, args.trials)
            rows.append(row)
            print(f"{pruner:9s} fold-trainings {row['folds']:3d}  pruned {row['pruned']:2d}/{row['trials']} "
                  f"(after folds {row['pruned_after']})  {row['seconds']:7.1f} s  "
                  f"best {row['best']:.4f} (trial {row['best_trial']})", flush=True)

    ref = rows[0]
    print(f"\nagainst 'none' (target: saved >= {TARGET_SAVING:.0%}, best-score loss <= {TARGET_MAX_LOSS}):")
    print(f"{'pruner':9s} {'fold-trainings':>15s} {'saved':>7s} {'wall s':>8s} {'time ratio':>10s} "
          f"{'best':>7s} {'delta best':>10s}  verdict")
    for row in rows:
        saved = 1 - row["folds"] / ref["folds"]
        delta = row["best"] - ref["best"]
        verdict = "(baseline)"
        if row is not ref:
            ok = saved >= TARGET_SAVING and delta >= -TARGET_MAX_LOSS
            verdict = "PASS" if ok else "FAIL"
        print(f"{row['pruner']:9s} {row['folds']:15d} {saved:7.1%} {row['seconds']:8.1f} "
              f"{row['seconds'] / ref['seconds']:10.2f} {row['best']:7.4f} {delta:+10.4f}  {verdict}")
    print_replays(base, pruners, ref["complete"], args.replay_orders)
    return 0  # a measurement, not a gate: `make bench` runs on after a FAIL


if __name__ == "__main__":
    raise SystemExit(run_main(lambda _argv: main()))  # a bad --set: one line, exit 2
