"""How much the default training recipe's figures move with the seed, the thread count and small data.

    python benchmarks/bench_recipe.py [--seeds 0,1,2,3,4] [--threads 1,2] [--small-patients 20]
                                      [--parallel 2] [--params params.yaml] [--set section.key=value ...]
                                      [--out benchmarks/results/recipe.json]

Runs the shipped pipeline (prepare's store, then `python -m src.train` and `python -m src.evaluate`
as a user runs them) for every seed (train.seed) and thread count (train.threads), on the default
phantom's prepared store (prepare.out, built if missing) and on a small phantom (the same
generator with `--small-patients` patients per class, prepared with the same settings).  Each run
goes to its own folder and MLflow store under a temporary directory.

Prints per run: the pooled out-of-fold ROC AUC with its 95% CI, the per-fold test AUCs, the best
epoch of each fold, the narrowest spread of a fold's test probabilities (a collapsed fold answers
one probability for everyone) and the wall time; then mean, sd, min and max of the OOF AUC per
phantom, and the goals of issue 19 as PASS/FAIL.  Writes every record and the summary to `--out`.

Wall time: runs with one thread go `--parallel` at a time (two on two cores), runs with more
threads one at a time, so no run's threads compete with another's; the seconds printed are each
run's own, with whatever ran beside it.

Each finished run is appended to `--out` + `.records.jsonl` at once, under the settings it ran
with; a rerun with the same settings skips those runs, so an interrupted or failed benchmark
resumes where it stopped (the file is removed once `--out` is written).  The runs score the
classifier alone: each gets its own empty `locate.out`, so evaluate scores no localiser chain.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from src.artifacts.store import PreparedStore  # noqa: E402
from src.core.config import apply_overrides, load_params, params_from_dict  # noqa: E402
from src.core.fileio import atomic_write_json  # noqa: E402

GOAL_MEAN, GOAL_MIN, GOAL_FOLD = 0.94, 0.92, 0.85
COLLAPSE_SPREAD = 0.05  # evaluate.collapse_spread's default: below it a fold "answers one probability"


def run(cmd: list[str], log: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    with open(log, "a") as fh:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}); see {log}")


def stage(name: str, params_files: list[str], sets: dict[str, object], log: Path) -> None:
    argv = [sys.executable, "-m", f"src.{name}"]
    for f in params_files:
        argv += ["--params", f]
    for key, value in sets.items():
        argv += ["--set", f"{key}={value}"]
    run(argv, log)


def small_store(args, tmp: Path) -> Path:
    """A phantom with --small-patients per class, prepared like the default one."""
    sets = {"phantom.out": tmp / "small" / "phantom", "phantom.masks_out": tmp / "small" / "masks",
            "phantom.patients_per_class": args.small_patients, **user_sets(args)}
    stage("phantom", args.params, sets, tmp / "small.log")
    stage("prepare", args.params, {**sets, "data.root": tmp / "small" / "phantom", "prepare.out": tmp / "small" / "store"},
          tmp / "small.log")
    return tmp / "small" / "store"


def user_sets(args) -> dict[str, str]:
    return dict(item.split("=", 1) for item in args.set)


def one_run(args, tmp: Path, phantom: str, store: Path, seed: int, threads: int) -> dict:
    out = tmp / f"{phantom}-s{seed}-t{threads}"
    sets = {"prepare.out": store, "train.out": out / "models", "evaluate.out": out / "reports",
            "locate.out": out / "localiser",
            "mlflow.tracking_uri": f"sqlite:///{out / 'mlruns.db'}", "mlflow.artifact_root": out / "artifacts",
            "train.seed": seed, "train.threads": threads, **user_sets(args)}
    started = time.perf_counter()
    stage("train", args.params, sets, out.with_suffix(".log"))
    stage("evaluate", args.params, sets, out.with_suffix(".log"))
    seconds = time.perf_counter() - started
    metrics = json.loads((out / "reports" / "metrics.json").read_text())
    folds = pd.read_csv(out / "reports" / "fold_metrics.csv")
    cv = json.loads((out / "models" / "cv.json").read_text())
    return {
        "phantom": phantom, "seed": seed, "threads": threads,
        "oof_roc_auc": metrics["oof_roc_auc"], "ci_low": metrics["oof_roc_auc_ci_low"],
        "ci_high": metrics["oof_roc_auc_ci_high"],
        "fold_auc": [round(float(v), 4) for v in folds["roc_auc"]],
        "best_epochs": [int(cv["fold_figures"][k]["best_epoch"]) for k in sorted(cv["fold_figures"], key=int)],
        "min_prob_spread": float(folds["prob_spread"].min()),
        "n_collapsed_folds": int(metrics["n_collapsed_folds"]),
        "seconds": round(seconds, 1),
    }


def done_records(path: Path, settings: dict) -> dict[tuple, dict]:
    """The runs a previous invocation with the same settings finished: {(phantom, seed, threads): record}."""
    if not path.is_file():
        return {}
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not lines or lines[0].get("settings") != settings:
        return {}
    return {(r["phantom"], r["seed"], r["threads"]): r for r in lines[1:]}


def append_record(path: Path, settings: dict, record: dict) -> None:
    if not path.is_file() or path.stat().st_size == 0:
        path.write_text(json.dumps({"settings": settings}) + "\n")
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def summary(records: list[dict]) -> dict:
    values = [r["oof_roc_auc"] for r in records]
    if not values:
        return {}
    return {"n": len(values), "mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "min_fold_auc": min(min(r["fold_auc"]) for r in records),
            "min_prob_spread": min(r["min_prob_spread"] for r in records)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--small-patients", type=int, default=20)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--params", action="append", default=None)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "recipe.json"))
    args = parser.parse_args()
    args.params = args.params or [str(ROOT / "params.yaml")]
    params = params_from_dict(apply_overrides(load_params(args.params).model_dump(mode="json"), args.set))
    seeds = [int(s) for s in args.seeds.split(",")]
    thread_counts = [int(t) for t in args.threads.split(",")]

    settings = {"seeds": seeds, "threads": thread_counts, "small_patients_per_class": args.small_patients,
                "parallel": args.parallel, "sets": args.set, "params": args.params,
                "train": params.train.model_dump(mode="json")}
    partial = Path(args.out + ".records.jsonl")
    done = done_records(partial, settings)
    if not done and partial.is_file():
        partial.unlink()  # another benchmark's runs
    if done:
        print(f"resuming: {len(done)} run(s) already in {partial}")

    with tempfile.TemporaryDirectory(prefix="bench-recipe-") as tmp_name:
        tmp = Path(tmp_name)
        default_store = Path(params.prepare.out)
        if not (default_store / "meta.json").is_file():
            stage("prepare", args.params, user_sets(args), tmp / "prepare.log")
        stores = {"default": default_store, "small": small_store(args, tmp)}
        for name, store in stores.items():
            opened = PreparedStore.open(store)
            print(f"{name}: {store} ({len(opened.images)} images, {opened.n_folds} folds)")
        jobs = [(p, s, t) for p in stores for t in thread_counts for s in seeds]
        records: list[dict] = [done[j] for j in jobs if j in done]
        for rec in records:
            print_record(rec)
        todo = [j for j in jobs if j not in done]
        started = time.perf_counter()

        def finish(job: tuple) -> dict:
            rec = one_run(args, tmp, job[0], stores[job[0]], job[1], job[2])
            append_record(partial, settings, rec)
            print_record(rec)
            return rec

        # one-thread runs share the cores two at a time; multi-thread runs go alone
        with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
            records += pool.map(finish, [j for j in todo if j[2] == 1])
        records += [finish(j) for j in todo if j[2] != 1]
        total = time.perf_counter() - started

    records.sort(key=lambda r: (list(stores).index(r["phantom"]), r["threads"], r["seed"]))
    result = {"settings": settings,
              "records": records,
              "summary": summary([r for r in records if r["phantom"] == "default"]),
              "summary_small": summary([r for r in records if r["phantom"] == "small"]),
              "total_seconds": round(total, 1)}
    print_summary(result)
    atomic_write_json(args.out, result)
    partial.unlink(missing_ok=True)
    print(f"wrote {args.out} ({total / 60:.1f} min in this invocation)")
    return 0


def print_record(r: dict) -> None:
    print(f"{r['phantom']:<8} seed {r['seed']} threads {r['threads']}: OOF AUC {r['oof_roc_auc']:.3f} "
          f"(CI {r['ci_low']:.3f}-{r['ci_high']:.3f}); folds {' '.join(f'{a:.3f}' for a in r['fold_auc'])}; "
          f"best epochs {r['best_epochs']}; min prob spread {r['min_prob_spread']:.3f}; {r['seconds']:.0f} s", flush=True)


def print_summary(result: dict) -> None:
    for key in ("summary", "summary_small"):
        s = result[key]
        if not s:
            continue
        print(f"{key}: n {s['n']}, OOF AUC mean {s['mean']:.3f}, sd {s['sd']:.3f}, min {s['min']:.3f}, "
              f"max {s['max']:.3f}; lowest fold {s['min_fold_auc']:.3f}; narrowest fold spread {s['min_prob_spread']:.3f}")
    s = result["summary"]
    if s:
        goals = [(f"mean >= {GOAL_MEAN}", s["mean"] >= GOAL_MEAN), (f"min >= {GOAL_MIN}", s["min"] >= GOAL_MIN),
                 (f"no fold below {GOAL_FOLD}", s["min_fold_auc"] >= GOAL_FOLD)]
        small = result["summary_small"]
        if small:
            goals.append((f"small phantom: no collapsed fold (spread >= {COLLAPSE_SPREAD})",
                          small["min_prob_spread"] >= COLLAPSE_SPREAD))
        for text, ok in goals:
            print(f"  {'PASS' if ok else 'FAIL'}  {text}")


if __name__ == "__main__":
    raise SystemExit(main())
