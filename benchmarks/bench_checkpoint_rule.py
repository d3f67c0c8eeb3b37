"""Which epoch should a fold keep?  Rules that pick it from the inner-validation curve, scored on
the test folds of the same training runs.

    python benchmarks/bench_checkpoint_rule.py [--seeds 0,1,2] [--threads 1] [--parallel 3]
                                               [--params params.yaml] [--set section.key=value ...]
                                               [--raw DIR] [--out benchmarks/results/checkpoint_rule.json]

A diagnostic for choosing `train.checkpoint` and `train.checkpoint_from`, not part of the pipeline.
It trains every fold of the default recipe once per seed (`train.checkpoint: last`, so training
runs every epoch) and records each fold's test-fold probabilities after every epoch, which the
train stage never does (it predicts the test fold once, at the end).  Each rule then picks its
epoch from the inner-validation curve alone, and the table says what that epoch scored on the
test fold: pooled OOF AUC per seed, the mean, and the lowest fold.  Keep seeds 3-4 out of it, so
that `bench_recipe.py` can confirm the chosen rule on seeds it never saw.

One process per seed (`--parallel` at a time, `--threads` torch threads each).  `--raw DIR` keeps
each seed's per-epoch record (`seed<N>.json`) there; when DIR already holds one, that seed is not
trained again, so the table can be recomputed without the training.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from src.artifacts.store import PreparedStore  # noqa: E402
from src.core.config import apply_overrides, load_params, params_from_dict  # noqa: E402
from src.core.fileio import atomic_write_json  # noqa: E402
from src.data.splits import fold_split  # noqa: E402
from src.evaluation.metrics import auc_score  # noqa: E402
from src.model import fit  # noqa: E402

SHARES = (0.0, 0.25, 0.5, 0.67)


def record_seed(params_files: list[str], sets: list[str], seed: int, threads: int, out: Path) -> None:
    """Train every fold of one seed; write {fold: {labels, history, epoch_probs}} to `out`."""
    torch.set_num_threads(threads)
    overrides = [*sets, f"train.seed={seed}", f"train.threads={threads}", "train.checkpoint=last"]
    params = params_from_dict(apply_overrides(load_params(params_files).model_dump(mode="json"), overrides))
    store = PreparedStore.open(params.prepare.out)
    engines = []
    build = fit.build_engine

    def keep_engine(*args, **kwargs):  # the fold's engine, so the callback can predict with its (EMA) weights
        engines.append(build(*args, **kwargs))
        return engines[-1]

    fit.build_engine = keep_engine
    record = {}
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as tmp:
        for k in range(store.n_folds):
            test = fold_split(store, k, params.train.val_fraction, params.train.seed).test
            images = np.asarray(store.images[test])
            probs: list[list[float]] = []

            def after_epoch(epoch: int, _record: dict, images=images, probs=probs) -> None:
                probs.append(engines[-1].predict(images, 32)[:, 1].tolist())

            result = fit.train_fold(params, store, k, Path(tmp) / f"fold_{k}", epoch_callback=after_epoch)
            record[str(k)] = {"labels": store.labels[test].tolist(), "history": result.history, "epoch_probs": probs}
    atomic_write_json(out, record)


def chosen_epoch(history: list[dict], criterion: str, share: float) -> int:
    """0-based index of the epoch `train.checkpoint=criterion`, `checkpoint_from=share` keeps."""
    n = len(history)
    if criterion == "last":
        return n - 1
    first = fit.first_checkpoint_epoch(SimpleNamespace(checkpoint=criterion, checkpoint_from=share, epochs=n)) - 1
    loss = [h["val_loss"] for h in history]
    if criterion == "val_loss":
        return min(range(first, n), key=lambda i: loss[i])
    auc = [h["val_auc"] for h in history]
    return max(range(first, n), key=lambda i: (auc[i], -loss[i]))


def score(records: dict[int, dict]) -> dict:
    rules = [("last", 0.0)] + [(c, s) for c in ("val_loss", "val_auc") for s in SHARES]
    table = {}
    for criterion, share in rules:
        name = criterion if criterion == "last" else f"{criterion} from {share:g}"
        per_seed = {}
        for seed, record in records.items():
            probs, labels, fold_auc, epochs = [], [], [], []
            for k in sorted(record, key=int):
                f = record[k]
                e = chosen_epoch(f["history"], criterion, share)
                p, y = np.asarray(f["epoch_probs"][e]), np.asarray(f["labels"])
                probs.append(p)
                labels.append(y)
                fold_auc.append(round(auc_score(y, p), 4))
                epochs.append(e + 1)
            per_seed[seed] = {"oof_roc_auc": round(auc_score(np.concatenate(labels), np.concatenate(probs)), 4),
                              "fold_auc": fold_auc, "epochs": epochs}
        table[name] = {"criterion": criterion, "checkpoint_from": share, "seeds": per_seed,
                       "mean": round(float(np.mean([s["oof_roc_auc"] for s in per_seed.values()])), 4),
                       "min_fold_auc": min(min(s["fold_auc"]) for s in per_seed.values())}
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--parallel", type=int, default=3)
    parser.add_argument("--params", action="append", default=None)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--raw", help="folder for the per-seed records (reused when present)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "checkpoint_rule.json"))
    parser.add_argument("--one-seed", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--record", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.params = args.params or [str(ROOT / "params.yaml")]
    if args.one_seed is not None:
        record_seed(args.params, args.set, args.one_seed, args.threads, Path(args.record))
        return 0

    seeds = [int(s) for s in args.seeds.split(",")]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-raw-") as tmp:
        raw = Path(args.raw) if args.raw else Path(tmp)
        raw.mkdir(parents=True, exist_ok=True)

        def run(seed: int) -> None:
            path = raw / f"seed{seed}.json"
            if path.is_file():
                return
            cmd = [sys.executable, __file__, "--one-seed", str(seed), "--record", str(path),
                   "--threads", str(args.threads)]
            for f in args.params:
                cmd += ["--params", f]
            for item in args.set:
                cmd += ["--set", item]
            with open(raw / f"seed{seed}.log", "w") as log:
                subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)

        with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
            list(pool.map(run, seeds))
        records = {s: json.loads((raw / f"seed{s}.json").read_text()) for s in seeds}
    table = score(records)
    for name, row in table.items():
        seeds_text = " | ".join(f"s{s} {r['oof_roc_auc']:.3f} epochs {r['epochs']}" for s, r in row["seeds"].items())
        print(f"{name:<20} mean {row['mean']:.3f}  lowest fold {row['min_fold_auc']:.3f}  | {seeds_text}")
    atomic_write_json(args.out, {"settings": {"seeds": seeds, "threads": args.threads, "sets": args.set,
                                              "params": args.params},
                                 "rules": table, "seconds": round(time.perf_counter() - started, 1)})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
