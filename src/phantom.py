"""The `synthesize` stage: a synthetic panoramic-radiograph dataset laid out like a user's real data.

    python -m src.phantom [--params F] [--set phantom.seed=1]     # the dataset
    python -m src.phantom --figure docs/figures/phantom_examples.png

The dataset's layout, its class model and its randomness: src/synthetic/generator.py and
docs/PHANTOM.md.
"""
from __future__ import annotations

import argparse

from src.core.cli import run_main
from src.core.config import PhantomParams, add_params_args, params_from_args
from src.core.locks import output_locks
from src.core.outputs import check_outputs_apart, check_replaceable
from src.synthetic.figure import make_figure
from src.synthetic.generator import generate


def check_paths(p: PhantomParams) -> None:
    """Before drawing anything: the two folders stay apart, and each may replace only a folder
    of its own (src/core/outputs.py)."""
    check_outputs_apart({"phantom.out": p.out, "phantom.masks_out": p.masks_out})
    check_replaceable(p.out, "phantom.out")
    check_replaceable(p.masks_out, "phantom.masks_out")


def main(argv: list[str] | None = None) -> int:
    parser = add_params_args(argparse.ArgumentParser(prog="python -m src.phantom", description=__doc__.split("\n")[0]))
    parser.add_argument("--figure", metavar="PNG", help="only draw the C1/C3 example figure to this file")
    args = parser.parse_args(argv)
    params = params_from_args(args).phantom
    if args.figure:
        print(f"wrote {make_figure(params, args.figure)}")
        return 0
    check_paths(params)
    with output_locks({"phantom.out": params.out, "phantom.masks_out": params.masks_out}):
        s = generate(params)
    counts = ", ".join(f"{c}: {n}" for c, n in s["per_class"].items())
    print(f"phantom: {s['images']} images of {s['patients']} patients ({counts}) at {params.width}x{params.height}, "
          f"{s['mm_per_px']:.3f} mm/px -> {s['out']} (masks: {s['masks_out']}) in {s['seconds']:.1f} s "
          f"({s['images_per_s']:.1f} images/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
