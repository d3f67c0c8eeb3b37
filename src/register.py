"""Register stage: the latest cross-validation becomes a version of `register.name` with alias
`challenger` (`python -m src.register`, the last DVC stage).

The version is an MLflow pyfunc (src/serving/pyfunc_model.py) that carries the fold checkpoints as
plain artifacts (state_dict + meta.json, so Grad-CAM can still hook the network), a crop-mode
model's fold localisers (`{locate.out}/folds/fold_<k>`, which find the box a caller leaves out)
and the `src` package as code, so `mlflow models serve` and `mlflow.pyfunc.load_model` need no
checkout.  It is logged in a "register" run nested under the CV parent run, with the CV
metrics, the params and the model card; the version itself carries the tags that the
promotion gate reads (`metric.<name>`), so promote never needs the files of an old run.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from src.artifacts.metrics_file import METRICS_FILE
from src.core.cli import run_main
from src.core.config import Params, add_params_args, params_from_args
from src.core.locks import output_locks
from src.core.outputs import check_output
from src.localise.files import FOLDS_DIR
from src.serving.registry import CARD_FILE, METRIC_TAG_PREFIX, register


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m src.register", description=__doc__.splitlines()[0])
    add_params_args(parser)
    return parser


def check_paths(params: Params) -> None:
    """Before any work: register.out must not overlap what register reads (src/core/outputs.py).
    From evaluate.out, gradcam.out and locate.out it reads only metrics.json (and locate's fold
    localisers), so the shipped register.out=reports/register inside evaluate.out=reports is
    fine; reports itself is not."""
    check_output("register.out", params.register.out, {
        "train.out": params.train.out,
        "prepare.out": params.prepare.out,
        "evaluate.out/metrics.json": Path(params.evaluate.out) / METRICS_FILE,
        "gradcam.out/metrics.json": Path(params.gradcam.out) / METRICS_FILE,
        "locate.out/folds": Path(params.locate.out) / FOLDS_DIR,
        "locate.out/metrics.json": Path(params.locate.out) / METRICS_FILE,
    })


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    params = params_from_args(args)
    check_paths(params)
    with output_locks({"register.out": params.register.out}):
        result = register(params)
    gate = params.register.gate.metric
    print(f"registered {result.name} version {result.version} (alias {result.alias}) from run {result.run_id}")
    print(f"  {gate} = {result.tags.get(METRIC_TAG_PREFIX + gate)}; model card: {Path(params.register.out) / CARD_FILE}")
    print("  promote with: python -m src.promote")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
