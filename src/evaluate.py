"""`python -m src.evaluate`: out-of-fold metrics, tables and plots of a finished CV.

Reads `{train.out}/cv.json` and each fold's test_predictions.csv (every image predicted
exactly once, by the one fold model that never saw it) and writes under `evaluate.out`:

- oof_predictions.csv   pooled predictions: index, file, patient, fold, label, prob_<class>...
- metrics.json          flat keys, identical in every run (MLflow, the register gate)
- headline.json         the 9 numbers people compare (`dvc metrics show`, `dvc exp show`, `make exp`)
- fold_metrics.csv      one row per fold (+ per_class_metrics.csv with more than two classes)
- plots/*.csv           ROC, PR, confusion, calibration data for `dvc plots`
- plots/*.png           the same figures, also logged to the CV's MLflow parent run with the metrics

In crop mode it also scores the whole chain (chain_* keys, src/localise/chain.py): the fold
models on crops cut at the boxes the locate stage found, next to the annotated-box figures.
"""
from __future__ import annotations

import argparse
import functools
import sys

from src.core.cli import run_main
from src.core.config import Params, add_params_args, params_from_args
from src.core.locks import output_locks
from src.core.outputs import check_output
from src.evaluation.report import evaluate
from src.localise.chain import chain_metrics


def check_paths(params: Params) -> None:
    """Before any work: evaluate.out must not overlap the CV it reads (src/core/outputs.py).
    gradcam.out and register.out may lie inside it: evaluate never reads them."""
    check_output("evaluate.out", params.evaluate.out, {"train.out": params.train.out, "locate.out": params.locate.out})


def main(argv: list[str] | None = None) -> int:
    parser = add_params_args(argparse.ArgumentParser(prog="python -m src.evaluate", description=__doc__.splitlines()[0]))
    params = params_from_args(parser.parse_args(argv))
    check_paths(params)
    with output_locks({"evaluate.out": params.evaluate.out}):
        m = evaluate(params, chain=functools.partial(chain_metrics, params))

    def f(key: str) -> str:
        v = m.get(key)
        return "n/a" if v is None else f"{v:.3f}"

    print(f"evaluate: pooled OOF ROC-AUC {f('oof_roc_auc')} ({params.evaluate.ci:.0%} CI {f('oof_roc_auc_ci_low')}-{f('oof_roc_auc_ci_high')}), "
          f"fold mean {f('fold_mean_roc_auc')} ± {f('fold_std_roc_auc')}; sensitivity {f('oof_sensitivity')}, "
          f"specificity {f('oof_specificity')}; written to {params.evaluate.out}/", file=sys.stdout)
    if m.get("chain_oof_roc_auc") is not None:
        print(f"  whole chain (crops at the found boxes, {m['chain_sides']}): OOF ROC-AUC {f('chain_oof_roc_auc')} "
              f"({f('chain_oof_roc_auc_ci_low')}-{f('chain_oof_roc_auc_ci_high')}), {f('chain_auc_gap')} below the "
              f"annotated boxes; {m['chain_n_not_found']} radiograph(s) without a cortex found", file=sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
