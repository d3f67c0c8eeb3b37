"""The `synthesize` stage: a synthetic panoramic-radiograph dataset laid out like a user's real data.

    python -m src.phantom [--params F] [--set phantom.seed=1]     # the dataset
    python -m src.phantom --figure docs/figures/phantom_examples.png

Writes, each folder swapped in whole (src.core.fileio.atomic_dir):
  {phantom.out}/<class>/P0007_v1.png          grey PNG, 8 or 16 bit (data.root points here)
  {phantom.out}/manifest.csv                  file,patient_id,class,box_x,box_y,box_w,box_h
  {phantom.out}/annotations.json              COCO boxes ("cortex"), CVAT export style
  {phantom.masks_out}/<class>/P0007_v1.png    0/255 mask of the diagnostic cortex band (both sides)
  {phantom.masks_out}/truth.csv               per image: latent severity and drawn cortex width

Classes: phantom.classes = [healthy, osteoporotic].  Each patient has a latent severity
Phi(L), L ~ N(-/+ separation * SEVERITY_GAP / 2, 1) for healthy/osteoporotic, so `separation`
alone sets how much the classes overlap (0: not at all separable).  What severity draws, and
why, is in src/synthetic/anatomy.py and docs/PHANTOM.md.

Randomness: every patient and every visit has its own stream derived from (seed, class,
patient, visit), so files do not depend on the order of drawing and the same params give
byte-identical files.
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
