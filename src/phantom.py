"""The `synthesize` stage: a synthetic panoramic-radiograph dataset laid out like a user's real data.

    python -m src.phantom [--params F] [--set phantom.seed=1]     # the dataset
    python -m src.phantom --figure docs/figures/phantom_examples.png

The dataset's layout, its class model and its randomness: src/synthetic/generator.py and
docs/PHANTOM.md.
"""
from __future__ import annotations

import argparse

from src.core.cli import run_main
from src.core.config import add_params_args, params_from_args
from src.synthetic.figure import make_figure
from src.synthetic.generator import generate


def main(argv: list[str] | None = None) -> int:
    parser = add_params_args(argparse.ArgumentParser(prog="python -m src.phantom", description=__doc__.split("\n")[0]))
    parser.add_argument("--figure", metavar="PNG", help="only draw the C1/C3 example figure to this file")
    args = parser.parse_args(argv)
    params = params_from_args(args).phantom
    if args.figure:
        print(f"wrote {make_figure(params, args.figure)}")
        return 0
    s = generate(params)
    counts = ", ".join(f"{c}: {n}" for c, n in s["per_class"].items())
    print(f"phantom: {s['images']} images of {s['patients']} patients ({counts}) at {params.width}x{params.height}, "
          f"{s['mm_per_px']:.3f} mm/px -> {s['out']} (masks: {s['masks_out']}) in {s['seconds']:.1f} s "
          f"({s['images_per_s']:.1f} images/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
