"""Predict new radiographs: `python -m src.predict FILE_OR_FOLDER... [--model URI] [--cam DIR] [--json] [--box x,y,w,h] [--boxes CSV] [--no-locate]`.

Uses the same `Ensemble` as the registered pyfunc (src/serving/pyfunc_model.py), so a file predicted
here gets the probabilities that `mlflow models serve` returns for its bytes.  Each file is
decoded and preprocessed on its own: an unreadable one becomes an error row and the others
are still predicted (exit status 1 then, 0 when all succeeded).

--model takes `models:/name@alias` (default: register.name @ register.champion_alias), any
MLflow model URI, a downloaded model folder, a `train.out` folder or one checkpoint folder.

Crop-mode models: a file's box comes from --boxes, else --box, else the cortex localiser finds
it (the one a registered model bundles; for a train.out or checkpoint folder, the locate stage's
{locate.out}/folds/fold_<k>).  The output then says which box was used, whether it was given or
found, and the localiser's confidence; a file on which it finds no cortex is an error row.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from src.core.cli import run_main
from src.core.config import add_params_args, params_from_args
from src.core.errors import BoneHealthError
from src.serving.inference import (
    expand_inputs,
    format_table,
    load_ensemble,
    predict_files,
    read_boxes,
    results_frame,
    write_cams,
)
from src.serving.pyfunc_model import parse_box


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m src.predict",
                                     description="Predict raw radiographs (PNG, JPEG, TIFF, BMP, DICOM) with a registered model.")
    parser.add_argument("inputs", nargs="+", metavar="FILE_OR_FOLDER")
    parser.add_argument("--model", default=None,
                        help="models:/name@alias (default: register.name@register.champion_alias), "
                             "an MLflow model folder, train.out or one checkpoint folder")
    parser.add_argument("--cam", type=Path, default=None, metavar="DIR", help="write Grad-CAM overlays here")
    parser.add_argument("--json", action="store_true", help="print JSON records instead of a table")
    parser.add_argument("--box", default=None, metavar="x,y,w,h",
                        help="crop box in source pixels for every file (crop-mode models)")
    parser.add_argument("--boxes", default=None, metavar="CSV",
                        help="per-file boxes: columns file,box_x,box_y,box_w,box_h (e.g. data.manifest); wins over --box")
    parser.add_argument("--no-locate", action="store_true",
                        help="crop-mode models: never find boxes, every file needs --box or --boxes. By default a "
                             "file without one gets the box the localiser finds: the one bundled with a registered "
                             "model, or with a train.out/checkpoint folder {locate.out}/folds/fold_<k> if present")
    add_params_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    params = params_from_args(args)
    box = parse_box(args.box, "--box") if args.box else None
    boxes = read_boxes(args.boxes) if args.boxes else None
    files = expand_inputs(args.inputs, params.data.extensions)
    if not files:
        raise BoneHealthError(f"{', '.join(args.inputs)}: no image files found (extensions {params.data.extensions})")
    ensemble = load_ensemble(params, args.model, locate=not args.no_locate)
    results = predict_files(ensemble, files, box, boxes)
    if args.cam is not None:
        write_cams(ensemble, results, args.cam, params)
    frame = results_frame(results, ensemble.classes, crop=ensemble.is_crop)
    if args.json:
        records = json.loads(frame.to_json(orient="records"))
        print(json.dumps(records, indent=2))
    else:
        print(format_table(frame))
    failed = [r for r in results if r.error]
    for r in failed:
        print(f"error: {r.file}: {r.error}", file=sys.stderr)
    print(f"{len(results) - len(failed)} of {len(results)} file(s) predicted", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
