"""Pruning pays: the same seeded Optuna study with and without k-fold pruning.

    python benchmarks/bench_tune.py [--trials 12] [--epochs 4] [--patients 24] [--size 64]
                                    [--model efficientnet_b0] [--pruners none,wilcoxon,median]

Builds a small phantom, prepares it, and runs one study per pruner with the same TPE seed,
search space and fold assignment.  Prints, for each: fold-trainings run, wall time and best
objective (mean inner-validation AUC), then the saving against `none` in the same run.
The target (issue 6): at least 30% fewer fold-trainings at no more than 0.01 loss of best score.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src import tune  # noqa: E402
from src.config import Params, with_values  # noqa: E402
from src.phantom import generate  # noqa: E402
from src.prepare import prepare  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--patients", type=int, default=24, help="patients per class in the phantom")
    ap.add_argument("--size", type=int, default=64, help="prepared crop size")
    ap.add_argument("--model", default="efficientnet_b0")
    ap.add_argument("--pruners", default="none,wilcoxon,median")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_tune_") as tmp_text:
        tmp = Path(tmp_text)
        base = with_values(Params(), {
            "phantom.out": str(tmp / "phantom"), "phantom.masks_out": str(tmp / "masks"),
            "phantom.patients_per_class": args.patients, "phantom.followup_fraction": 0.0,
            "data.root": str(tmp / "phantom"), "data.manifest": str(tmp / "phantom" / "manifest.csv"),
            "data.annotations": str(tmp / "phantom" / "annotations.json"),
            "prepare.out": str(tmp / "prepared"), "prepare.crop.size": args.size,
            "train.model": args.model, "train.epochs": args.epochs, "train.early_stopping_patience": 0,
            "train.out": str(tmp / "models"),
            "mlflow.tracking_uri": f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}",
            "mlflow.artifact_root": str(tmp / "mlruns" / "artifacts"),
            "tune.n_trials": args.trials, "tune.sampler_seed": args.seed, "tune.n_startup_trials": 4,
            "tune.space": {
                "train.lr": {"type": "float", "low": 1e-5, "high": 3e-2, "log": True},
                "train.weight_decay": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True},
                "train.augment.strength": {"type": "float", "low": 0.0, "high": 2.0},
            },
        })
        generate(base.phantom)
        prepare(base)
        rows = []
        for pruner in args.pruners.split(","):
            params = with_values(base, {"tune.pruner": pruner, "tune.study_name": f"bench-{pruner}",
                                        "tune.out": str(tmp / "tune" / pruner)})
            url = tune.storage_url(params)
            study = tune.open_study(params, url)
            parent = tune.study_parent_run(params, url)
            start = time.perf_counter()
            tune.run_worker(params, url, target=args.trials, deadline=None, parent_id=parent)
            seconds = time.perf_counter() - start
            study = tune.open_study(params, url)
            trials = study.get_trials()
            folds = sum(int(t.user_attrs.get("folds_trained", 0)) for t in trials)
            pruned = sum(t.state.name == "PRUNED" for t in trials)
            rows.append((pruner, folds, pruned, seconds, study.best_value))
            print(f"{pruner:9s} fold-trainings {folds:3d}  pruned {pruned:2d}/{len(trials)}  "
                  f"{seconds:7.1f} s  best {study.best_value:.4f}", flush=True)

    ref = next((r for r in rows if r[0] == "none"), None)
    print(f"\n{args.trials} trials, {args.model} at {args.size} px, {args.epochs} epochs, 5 folds, "
          f"{2 * args.patients} patients; saving and best-score change against 'none':")
    print(f"{'pruner':9s} {'fold-trainings':>15s} {'saved':>7s} {'wall s':>8s} {'time ratio':>10s} "
          f"{'best':>7s} {'delta best':>10s}")
    for pruner, folds, pruned, seconds, best in rows:
        if ref is None:
            print(f"{pruner:9s} {folds:15d}")
            continue
        saved = 1 - folds / ref[1]
        print(f"{pruner:9s} {folds:15d} {saved:7.1%} {seconds:8.1f} {seconds / ref[3]:10.2f} "
              f"{best:7.4f} {best - ref[4]:+10.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
