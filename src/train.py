"""`python -m src.train`: K-fold cross-validation, every fold an MLflow run.

One parent run per CV (named like the lab's folders: model, dataset, mode+size, batch,
epochs) carries every parameter and the aggregated metrics; one nested run per fold
carries the per-epoch curves, the test-fold metrics and the chosen checkpoint.

Resume: `{train.out}/cv_state.json` records the parent run, each finished fold (run id
and figures) and the fold in progress.  A rerun with the same parameters and data
continues from the first unfinished fold, marks the run of the interrupted fold KILLED
(it is not counted), and reuses the finished folds' checkpoints and predictions.
"""
from __future__ import annotations

import argparse
import os
import sys

from src.core.cli import run_main
from src.core.config import Params, add_params_args, params_from_args
from src.core.locks import HELD_ENV, output_locks
from src.core.outputs import check_output
from src.core.text_table import text_table
from src.model import distributed
from src.model.cross_validation import checked_store, run_cv


def check_paths(params: Params) -> None:
    """Before any work: train.out must not overlap what training reads (src/core/outputs.py)."""
    check_output("train.out", params.train.out, {
        "prepare.out": params.prepare.out,
        "data.root": params.data.root,
        "train.weights": params.train.weights,
    })


def main(argv: list[str] | None = None) -> int:
    parser = add_params_args(argparse.ArgumentParser(prog="python -m src.train", description=__doc__.splitlines()[0]))
    parser.add_argument("--no-resume", action="store_true", help="start a new CV even if finished folds match")
    args = parser.parse_args(argv)
    params = params_from_args(args)
    cfg = params.train
    check_paths(params)
    checked_store(params)  # a bad setting fails here, once, not in every relaunched process
    # Under torchrun only rank 0 writes, so only rank 0 locks.
    with output_locks({"train.out": cfg.out} if os.environ.get("RANK", "0") == "0" else {}):
        if cfg.devices > 1 and not distributed.launched_by_torchrun():
            os.environ[HELD_ENV] = "1"  # the torchrun children work under this process's lock
            return distributed.relaunch(cfg.devices, "src.train", sys.argv[1:] if argv is None else list(argv))
        ctx, device = distributed.setup(cfg.device)
        try:
            cv = run_cv(params, resume=not args.no_resume, ctx=ctx, device=device)
        finally:
            distributed.teardown()
    if ctx.is_main:
        m = cv.metrics
        if cv.fold_figures:
            print(fold_table(cv.fold_figures, params.evaluate.threshold))
        print(f"train: {cv.folds} folds finished, parent run {cv.parent_run_id} ({cv.run_name}); "
              f"pooled OOF AUC {m.get('cv_oof_roc_auc', float('nan')):.4f}, fold test AUC "
              f"{m.get('cv_test_roc_auc_mean', float('nan')):.4f} ± {m.get('cv_test_roc_auc_std', float('nan')):.4f}"
              + (f"; {ctx.world} processes" if ctx.active else ""))
    return 0


def fold_table(figures: dict[str, dict], threshold: float) -> str:
    def num(value, fmt: str) -> str:
        return "n/a" if value is None else format(value, fmt)

    rows = [[k, num(f.get("test_roc_auc"), ".3f"), num(f.get("test_sensitivity"), ".3f"),
             num(f.get("test_specificity"), ".3f"), num(f.get("best_epoch"), "d"), num(f.get("best_val_auc"), ".3f"),
             num(f.get("seconds"), ".0f")] for k, f in figures.items()]
    return text_table(["fold", "test AUC", f"sens@{threshold:g}", f"spec@{threshold:g}", "best epoch", "val AUC",
                       "seconds"], rows)


if __name__ == "__main__":
    raise SystemExit(run_main(main))
