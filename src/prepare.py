"""The `prepare` stage: decode every radiograph once into the array store that training reads.

    python -m src.prepare [--params params.yaml] [--set prepare.mode=full ...]
    python -m src.prepare --inspect --set data.root=my/xrays [--write-overlay my-data.yaml]

discover -> cheap validation (label conflicts, boxes, patients per class) -> one decoding
pass straight into images.npy (a memmap in the temporary store folder, so memory stays
flat) -> validation with the decoding failures -> folds (StratifiedGroupKFold) ->
manifest.csv, meta.json, report.json.  The folder is built under a temporary name and
swapped in whole (layout: docs/ARCHITECTURE.md), so a stop or a crash leaves no store
that looks complete.
"""
from __future__ import annotations

import argparse

from src.artifacts.source_data import ANNOTATIONS_NAME, MANIFEST_NAME, sidecar
from src.artifacts.store import (
    IMAGES_FILE,
    MANIFEST_FILE,
    META_FILE,
    REPORT_FILE,
    PreparedStore,
    read_report,
)
from src.core.cli import run_main
from src.core.config import Params, add_params_args, params_from_args
from src.core.locks import output_locks
from src.core.outputs import check_output, check_replaceable
from src.data.build_store import prepare
from src.data.dataset import ValidationFailed, format_report
from src.data.survey import format_survey, survey, write_overlay


def check_paths(params: Params) -> None:
    """Before any decoding: prepare.out must not overlap the data it reads, and may replace
    only a folder of its own (src/core/outputs.py)."""
    data = params.data
    check_output("prepare.out", params.prepare.out, {
        "data.root": data.root,
        "data.manifest": sidecar(data.manifest, data.root, MANIFEST_NAME),
        "data.annotations": sidecar(data.annotations, data.root, ANNOTATIONS_NAME),
    })
    check_replaceable(params.prepare.out, "prepare.out")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m src.prepare", description=__doc__.splitlines()[0])
    add_params_args(parser)
    parser.add_argument("--inspect", action="store_true",
                        help="only look at data.root (file headers, no decoding): classes, counts, formats, colour "
                             "modes, sizes, duplicates, patient ids, the settings prepare would use; writes nothing")
    parser.add_argument("--write-overlay", metavar="FILE",
                        help="with --inspect: write those settings as a params overlay (--params params.yaml "
                             "--params FILE)")
    args = parser.parse_args(argv)
    params = params_from_args(args)
    if args.write_overlay and not args.inspect:
        parser.error("--write-overlay goes with --inspect")
    if args.inspect:
        found = survey(params)
        print(format_survey(found, params))
        if args.write_overlay:
            print(f"wrote {write_overlay(found, params, args.write_overlay)}")
        return 0
    check_paths(params)
    try:
        with output_locks({"prepare.out": params.prepare.out}):
            out = prepare(params)
    except ValidationFailed as exc:
        print(format_report(exc.report))  # the whole picture, before the one-line error
        raise
    store = PreparedStore.open(out)
    report = read_report(out)
    print(format_report(report))
    for line in report.get("warnings", []):
        print(f"warning: {line}")
    n, h, w = store.images.shape
    print(f"prepared {n} images -> {out}/{IMAGES_FILE} ({n}x{h}x{w} {store.images.dtype}), "
          f"{MANIFEST_FILE}, {META_FILE}, {REPORT_FILE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
