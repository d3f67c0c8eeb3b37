"""How well the cortex localiser finds the box, out of fold, and what resolution and training it
needs (issue 16): the figures the locate stage's defaults are chosen by.

    .venv/bin/python benchmarks/bench_locate.py [--configs mobilenetv3_small_100:128x256:25 ...]
                                                [--threads 2] [--shift-patients 30] [--out FILE]

For each config (timm backbone : overview HxW : epochs[:locate key=value...]) it trains one localiser per fold of the
default phantom's prepared store (prepare.out; the classifier's patient-grouped folds) and
scores every image with the model that never saw it; then the five fold models, averaged, on a
phantom they never saw (another seed, phantom.nuisance 1.5).  Printed per config and data set:

- annotated side: the best peak on the half the annotator drew, against the annotated box (how
  well the cortex is found where it was drawn);
- either side: the best peak anywhere against the annotated box or the other side's, the
  image mirror (what real data allows) and, on the phantom, the mirror through the
  ground-truth masks (which follows the pose: the true other side);
- a fixed box (the training part's median centre and size, on the side of the truth) as the
  baseline any localiser must beat;
- seconds of training per fold.

IoU is of the predicted box (the size head) with the truth; a hit is IoU >= 0.5; centre errors
are in mm (phantom.field_width_mm over the image width).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from src.artifacts.store import PreparedStore  # noqa: E402
from src.core.config import (
    LocateParams,  # noqa: E402
    load_params,  # noqa: E402
)
from src.core.fileio import atomic_write_json  # noqa: E402
from src.core.runtime import set_threads  # noqa: E402
from src.data.imaging import read_image  # noqa: E402
from src.localise.fit import find_centres  # noqa: E402
from src.localise.foreign import foreign_confidences  # noqa: E402
from src.localise.oof import Annotated, annotated, fold_peaks, oof_localise, views_of  # noqa: E402
from src.localise.refine import FineView, refine_peaks  # noqa: E402
from src.localise.run import annotated_side, score  # noqa: E402
from src.localise.scores import anatomical_mirror_boxes, fixed_box, mirror_box, summary  # noqa: E402
from src.synthetic.generator import generate  # noqa: E402


def masks_of(folder: Path, files) -> list[np.ndarray]:
    return [read_image(folder / Path(f).with_suffix(".png")) > 0.5 for f in files]


def figures(data: Annotated, peaks, anatomical: np.ndarray, mm_per_px: np.ndarray) -> dict:
    """The three scores of one set of peaks (best, other side) against the truth."""
    image_mirror = mirror_box(data.boxes, data.src_hw[:, 1])
    out = {"annotated_side": summary(annotated_side(data, peaks, mm_per_px)),
           "either_image_mirror": summary(score(data, peaks, image_mirror, mm_per_px)),
           "either_anatomical": summary(score(data, peaks, anatomical, mm_per_px))}
    conf = [p[0].confidence for p in peaks]
    out["confidence_min"], out["confidence_median"] = float(min(conf)), float(np.median(conf))
    return out


def nested(settings: dict[str, str]) -> dict:
    """{"refine.epochs": "10", "refine.size": "192x384"} -> {"refine": {"epochs": "10", "size": [192, 384]}}."""
    out: dict = {}
    for key, value in settings.items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = [int(v) for v in value.split("x")] if leaf in ("size", "window") else value
    return out


def ablations(data: Annotated, peaks, models, refiners, store, anatomical, mm_per_px, cfg) -> dict:
    """The same networks with one piece left out, scored against either side (the masks' mirror):
    coarse_only (no refiner; per fold when `store` is given, else the ensemble) and
    refiner_size (the refiner's own box size instead of the overview network's)."""
    if not any(r is not None for r in refiners):
        return {}
    if store is None:
        coarse = find_centres(models, data.overviews)
    else:
        coarse = [None] * len(peaks)
        for k, m in enumerate(models):
            test = store.indices_of_fold(k)
            for i, p in zip(test, find_centres([m], data.overviews[test])):
                coarse[i] = p
    own = [None] * len(peaks)
    groups = ([(store.indices_of_fold(k), [r]) for k, r in enumerate(refiners)] if store is not None
              else [(np.arange(len(peaks)), refiners)])
    for rows, refs in groups:
        for i, p in zip(rows, refine_peaks(refs, data.fines[rows], [coarse[i] for i in rows],
                                           data.overviews.shape[1:], FineView.of(cfg.refine), own_size=True)):
            own[i] = p
    return {"coarse_only_anatomical": figures(data, coarse, anatomical, mm_per_px)["either_anatomical"],
            "refiner_size_anatomical": figures(data, own, anatomical, mm_per_px)["either_anatomical"]}


def shifted_phantom(tmp: Path, params, patients: int) -> tuple[Path, Path]:
    p = params.phantom.model_copy(update={"out": str(tmp / "phantom"), "masks_out": str(tmp / "masks"), "seed": 1,
                                          "nuisance": 1.5, "patients_per_class": patients})
    generate(p)
    return tmp / "phantom", tmp / "masks"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["mobilenetv3_small_100:96x192:16:augment=1.5"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--shift-patients", type=int, default=30)
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "locate.json"))
    args = parser.parse_args()
    set_threads(args.threads)
    params = load_params([args.params])
    store = PreparedStore.open(ROOT / params.prepare.out)
    data_root = ROOT / store.meta["data_root"]
    masks_root = ROOT / params.phantom.masks_out
    mm_per_px = params.phantom.field_width_mm / store.manifest["src_width"].to_numpy(np.float64)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-locate-") as tmp:
        shift_root, shift_masks = shifted_phantom(Path(tmp), params, args.shift_patients)
        shift = pd.read_csv(shift_root / "manifest.csv")
        for spec in args.configs:
            model, hw, epochs, *extra = spec.split(":")
            h, w = (int(v) for v in hw.split("x"))
            settings = dict(item.split("=", 1) for item in extra)   # e.g. negatives=0.5:refine.epochs=10
            cfg = LocateParams(model=model, size=(h, w), epochs=int(epochs), threads=args.threads,
                               **nested(settings))
            data = annotated(store, data_root, cfg)
            anatomical = anatomical_mirror_boxes(data.boxes, masks_of(masks_root, store.manifest["file"]))
            started = time.perf_counter()
            peaks, models, refiners = oof_localise(store, data, cfg)
            seconds = time.perf_counter() - started
            oof = figures(data, peaks, anatomical, mm_per_px)
            base = [fixed_box(data.boxes, data.src_hw, store.indices_not_in_fold(k), store.indices_of_fold(k),
                              anatomical, mm_per_px) for k in range(store.n_folds)]
            oof["fixed_box"] = summary({key: np.concatenate([b[key] for b in base]) for key in base[0]})
            oof.update(ablations(data, peaks, models, refiners, store, anatomical, mm_per_px, cfg))

            images = [read_image(shift_root / f) for f in shift["file"]]
            src_hw = np.array([im.shape[:2] for im in images], dtype=np.float64)
            overviews, fines = views_of(images, cfg)
            sdata = Annotated(overviews, src_hw, shift[["box_x", "box_y", "box_w", "box_h"]].to_numpy(np.float64), fines)
            s_anat = anatomical_mirror_boxes(sdata.boxes, masks_of(shift_masks, shift["file"]))
            s_peaks = fold_peaks(models, refiners, sdata, cfg)
            s_mm = params.phantom.field_width_mm / src_hw[:, 1]
            shifted = figures(sdata, s_peaks, s_anat, s_mm)
            every = np.arange(len(shift))
            shifted["fixed_box"] = summary(fixed_box(sdata.boxes, src_hw, every, every, s_anat, s_mm))
            shifted.update(ablations(sdata, s_peaks, models, refiners, None, s_anat, s_mm, cfg))
            oof["foreign_confidence"] = foreign_confidences(models, cfg.size)
            record = {"model": model, "size": [h, w], "epochs": int(epochs), "settings": settings,
                      "seconds_per_fold": seconds / store.n_folds,
                      "threads": args.threads, "oof": oof, "shifted_phantom": shifted}
            results.append(record)
            print_record(record, len(store.images), len(shift))
    atomic_write_json(args.out, {"configs": results, "store": str(params.prepare.out),
                                 "shifted_phantom": {"seed": 1, "nuisance": 1.5, "patients_per_class": args.shift_patients}})
    print(f"wrote {args.out}")
    return 0


def print_record(r: dict, n: int, n_shift: int) -> None:
    print(f"\n{r['model']} at {r['size'][0]}x{r['size'][1]}, {r['epochs']} epochs {r['settings']}: "
          f"{r['seconds_per_fold']:.0f} s per fold ({r['threads'] or 'all'} threads)")
    print("  non-dental images' confidence: " + ", ".join(f"{k} {v:.2f}" for k, v in r["oof"]["foreign_confidence"].items()))
    for name, figs, count in (("out-of-fold, default phantom", r["oof"], n),
                              ("fold ensemble, unseen phantom (seed 1, nuisance 1.5)", r["shifted_phantom"], n_shift)):
        print(f"  {name} ({count} images); confidence min {figs['confidence_min']:.2f}, median {figs['confidence_median']:.2f}")
        for key in ("annotated_side", "either_image_mirror", "either_anatomical", "coarse_only_anatomical",
                    "refiner_size_anatomical", "fixed_box"):
            if key not in figs:
                continue
            f = figs[key]
            p90 = f" (p90 {f['centre_error_mm_p90']:.2f})" if "centre_error_mm_p90" in f else ""
            print(f"    {key:<22} IoU {f['iou_mean']:.3f}  hit {f['hit_rate']:.3f}  centre error median "
                  f"{f['centre_error_mm_median']:.2f} mm{p90}")


if __name__ == "__main__":
    raise SystemExit(main())
