"""Grad-CAM stage: N random images per class, each explained by the fold model that never
saw it, with measured faithfulness; plus a single-image mode for new radiographs.

    python -m src.gradcam [--params F] [--set gradcam.method=hirescam]
    python -m src.gradcam --image PATH [--model DIR_OR_MODEL_URI] [--box x,y,w,h] --out FILE.png

Stage outputs under `gradcam.out`, each also logged under `gradcam/` on the CV's MLflow
parent run: `images/` (the DVC output) with `<class>/<image>.png` (image | heat map |
overlay, true and predicted class and probability), `_contact_sheets/<class>.png` (every
overlay of a class on one page; DVC image plots), `example.png` (the first image of each
class) and `images.csv` (one row per explained image); `metrics.json` beside it (flat keys,
the same names in every run, also logged as metrics on the parent run; register reads it) and
`headline.json` (the localisation figure against chance: the DVC metrics file).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from src.core.cli import run_main
from src.core.config import Params, add_params_args, params_from_args
from src.core.errors import BoneHealthError
from src.core.locks import output_locks
from src.core.outputs import check_output, check_replaceable
from src.explain.oof_explain import IMAGES_DIR, explain_file, masks_folder, run_gradcam


def parse_box(text: str | None) -> tuple[float, float, float, float] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4 or not all(np.isfinite(values)) or values[2] <= 0 or values[3] <= 0:
        raise BoneHealthError(f"--box {text!r}: expected x,y,w,h in source pixels with w, h > 0")
    return values  # type: ignore[return-value]


def check_paths(params: Params) -> None:
    """Before any work: gradcam.out must not overlap what the stage reads, and its images/
    folder (replaced whole) must be its own (src/core/outputs.py).  It may lie inside
    evaluate.out: gradcam never reads evaluate's files."""
    check_output("gradcam.out", params.gradcam.out, {
        "train.out": params.train.out,
        "prepare.out": params.prepare.out,
        "gradcam.masks": masks_folder(params),
    })
    check_replaceable(Path(params.gradcam.out) / IMAGES_DIR, "gradcam.out")


def check_single_paths(args: argparse.Namespace) -> None:
    """Single-image mode: the overlay must not overwrite the radiograph or the model it reads."""
    model = args.model if args.model and Path(args.model).exists() else None  # else an MLflow URI
    check_output("--out", args.out, {"--image": args.image, "--model": model})


# ----------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    parser = add_params_args(argparse.ArgumentParser(prog="python -m src.gradcam", description=__doc__,
                                                     formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument("--image", help="single-image mode: a radiograph file (PNG, JPEG, TIFF, DICOM...)")
    parser.add_argument("--model", help="checkpoint folder, train.out folder, or MLflow model URI "
                                        "(default: train.out, the mean of all folds)")
    parser.add_argument("--box", help="cortex box x,y,w,h in source pixels (needed by crop-mode models)")
    parser.add_argument("--out", help="single-image mode: the overlay PNG to write")
    args = parser.parse_args(argv)
    params = params_from_args(args)
    if args.image is None:
        if args.model or args.box or args.out:
            raise BoneHealthError("--model, --box and --out belong to single-image mode: add --image PATH")
        check_paths(params)
        with output_locks({"gradcam.out": params.gradcam.out}):
            run_gradcam(params)
        return 0
    if not args.out:
        raise BoneHealthError("--image needs --out FILE.png")
    check_single_paths(args)
    result = explain_file(params, args.image, args.out, args.model, parse_box(args.box))
    probs = ", ".join(f"{c} {p:.3f}" for c, p in result["probs"].items())
    print(f"{result['file']}: predicted {result['predicted']} ({probs}); {params.gradcam.method} map -> {result['out']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
