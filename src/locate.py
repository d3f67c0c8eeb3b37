"""`python -m src.locate`: learn where the inferior mandibular cortex is, so crop-mode models can
answer for radiographs that come without a box.

On the prepared store's patient-grouped folds it trains one localiser per fold (a timm
backbone with CenterNet heat-map heads on a shrunken whole radiograph, src/localise/) and
writes under `locate.out`:

- folds/fold_<k>/       localiser.pt + meta.json (what predict and the registered model use)
- oof_boxes.csv         every image's box found by the fold model that never saw it, beside
                        the annotated one: IoU, side, centre error, confidence
- oof_crops.npy         the classifier's crops cut at those boxes (best side, other side):
                        evaluate scores the whole chain on them
- metrics.json          held-out figures (+ headline.json for `dvc metrics show`)
- examples.png          the worst and some random held-out boxes

Full-mode stores need no box: the stage then writes empty outputs that say so.  A rerun with
the same settings, data and code reuses finished folds.
"""
from __future__ import annotations

import argparse

from src.core.cli import run_main
from src.core.config import Params, add_params_args, params_from_args
from src.core.locks import output_locks
from src.core.outputs import check_output
from src.localise.files import HEADLINE
from src.localise.run import run_locate


def check_paths(params: Params) -> None:
    """Before any work: locate.out must not overlap what it reads or what train writes."""
    check_output("locate.out", params.locate.out, {
        "prepare.out": params.prepare.out,
        "data.root": params.data.root,
        "train.out": params.train.out,
        "phantom.masks_out": params.phantom.masks_out,
    })


def main(argv: list[str] | None = None) -> int:
    parser = add_params_args(argparse.ArgumentParser(prog="python -m src.locate", description=__doc__.splitlines()[0]))
    parser.add_argument("--no-resume", action="store_true", help="train every fold anew")
    args = parser.parse_args(argv)
    params = params_from_args(args)
    check_paths(params)
    with output_locks({"locate.out": params.locate.out}):
        m = run_locate(params, resume=not args.no_resume)
    if m.get("locate_enabled") is False:
        print(f"locate: skipped ({m['locate_reason']})")
        return 0

    def f(key: str, fmt: str = ".3f") -> str:
        v = m.get(HEADLINE.get(key, key))
        return "n/a" if v is None else format(v, fmt)

    mm = f"median centre error {f('mm', '.2f')} mm, " if m.get(HEADLINE["mm"]) is not None else ""
    print(f"locate: out of fold, boxes found with IoU >= 0.5 (annotated side or the other) "
          f"{f('hit', '.1%')}, mean IoU {f('iou')}, {mm}"
          f"against {f('fixed_hit', '.1%')} for a fixed box; lowest confidence {f('locate_confidence_min', '.2f')} "
          f"(min_confidence {params.locate.min_confidence:g}, non-dental images up to "
          f"{f('locate_foreign_confidence_max', '.2f')}); written to {params.locate.out}/")
    if m.get(HEADLINE["unseen_hit"]) is not None:
        print(f"  unseen phantom (seed {params.locate.unseen_phantom.seed}, nuisance "
              f"{params.locate.unseen_phantom.nuisance:g}): {f('unseen_hit', '.1%')}, median "
              f"{f('unseen_mm', '.2f')} mm")
    if m.get("locate_warning"):
        print(f"  WARNING: {m['locate_warning']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
