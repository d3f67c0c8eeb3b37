"""How well the cortex localiser finds the box, out of fold, and what resolution and training it
needs (issue 16): the figures the locate stage's defaults are chosen by.

    .venv/bin/python benchmarks/bench_locate.py [--configs mobilenetv3_small_100:128x256:25 ...]
                                                [--threads 2] [--shift-patients 30] [--out FILE]

For each config (timm backbone : overview HxW : epochs) it trains one localiser per fold of the
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
from src.core.config import load_params  # noqa: E402
from src.core.fileio import atomic_write_json  # noqa: E402
from src.core.runtime import set_threads  # noqa: E402
from src.data.imaging import read_image  # noqa: E402
from src.localise.fit import LocaliserSettings, find_centres  # noqa: E402
from src.localise.oof import Annotated, annotated, oof_localise, to_source  # noqa: E402
from src.localise.overview import overview  # noqa: E402
from src.localise.scores import anatomical_mirror_boxes, mirror_box, score_either  # noqa: E402
from src.synthetic.generator import generate  # noqa: E402


def masks_of(folder: Path, files) -> list[np.ndarray]:
    return [read_image(folder / f) > 0.5 for f in files]


def figures(name: str, data: Annotated, best, other, anatomical: np.ndarray, mm_per_px: np.ndarray) -> dict:
    """The three scores of one set of peaks (best, other side) against the truth."""
    scale = data.scale()
    c_best, s_best = to_source(best, scale)
    c_other, s_other = to_source(other, scale)
    # the peak on the annotated half: the best one if it is there, else the other side's
    drawn_left = (data.boxes[:, 0] + data.boxes[:, 2] / 2) < data.src_hw[:, 1] / 2
    best_left = c_best[:, 0] < data.src_hw[:, 1] / 2
    same = drawn_left == best_left
    c_drawn = np.where(same[:, None], c_best, c_other)
    s_drawn = np.where(same[:, None], s_best, s_other)
    out = {}
    sets = {"annotated_side": score_either(c_drawn, data.boxes, data.boxes, s_drawn, mm_per_px),
            "either_image_mirror": score_either(c_best, data.boxes, mirror_box(data.boxes, data.src_hw[:, 1]), s_best,
                                                mm_per_px),
            "either_anatomical": score_either(c_best, data.boxes, anatomical, s_best, mm_per_px)}
    for key, s in sets.items():
        out[key] = {"iou_mean": float(s["iou"].mean()), "hit_rate": float((s["iou"] >= 0.5).mean()),
                    "centre_error_mm_median": float(np.median(s["error_mm"])),
                    "centre_error_mm_p90": float(np.percentile(s["error_mm"], 90))}
    out["confidence_min"] = float(min(p.confidence for p in best))
    out["confidence_median"] = float(np.median([p.confidence for p in best]))
    return out


def fixed_box(data: Annotated, train: np.ndarray, test: np.ndarray, anatomical: np.ndarray, mm_per_px: np.ndarray) -> dict:
    """The training part's median box (centre folded onto one half, relative to the image size),
    put on the truth's own side: the most a localiser that ignores the image could score."""
    rel_c = (data.boxes[:, :2] + data.boxes[:, 2:] / 2) / data.src_hw[:, ::-1]
    folded = np.column_stack([np.minimum(rel_c[:, 0], 1 - rel_c[:, 0]), rel_c[:, 1]])
    med_c, med_s = np.median(folded[train], axis=0), np.median((data.boxes[:, 2:] / data.src_hw[:, ::-1])[train], axis=0)
    left = rel_c[test, 0] < 0.5
    cx = np.where(left, med_c[0], 1 - med_c[0]) * data.src_hw[test, 1]
    centres = np.column_stack([cx, np.full(len(test), med_c[1]) * data.src_hw[test, 0]])
    sizes = med_s * data.src_hw[test][:, ::-1]
    s = score_either(centres, data.boxes[test], anatomical[test], sizes, mm_per_px[test])
    return {"iou_mean": float(s["iou"].mean()), "hit_rate": float((s["iou"] >= 0.5).mean()),
            "centre_error_mm_median": float(np.median(s["error_mm"]))}


def shifted_phantom(tmp: Path, params, patients: int) -> tuple[Path, Path]:
    p = params.phantom.model_copy(update={"out": str(tmp / "phantom"), "masks_out": str(tmp / "masks"), "seed": 1,
                                          "nuisance": 1.5, "patients_per_class": patients})
    generate(p)
    return tmp / "phantom", tmp / "masks"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["mobilenetv3_small_100:128x256:25"])
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
            model, hw, epochs = spec.split(":")
            h, w = (int(v) for v in hw.split("x"))
            cfg = LocaliserSettings(model=model, size=(h, w), epochs=int(epochs), threads=args.threads)
            data = annotated(store, data_root, cfg.size)
            anatomical = anatomical_mirror_boxes(data.boxes, masks_of(masks_root, store.manifest["file"]))
            started = time.perf_counter()
            peaks, models = oof_localise(store, data, cfg)
            seconds = time.perf_counter() - started
            oof = figures("oof", data, [p[0] for p in peaks], [p[1] for p in peaks], anatomical, mm_per_px)
            base = {k: fixed_box(data, store.indices_not_in_fold(k), store.indices_of_fold(k), anatomical, mm_per_px)
                    for k in range(store.n_folds)}
            oof["fixed_box"] = {key: float(np.mean([b[key] for b in base.values()])) for key in next(iter(base.values()))}

            views = np.stack([overview(read_image(shift_root / f), cfg.size) for f in shift["file"]])
            src_hw = np.tile([params.phantom.height, params.phantom.width], (len(shift), 1)).astype(np.float64)
            sdata = Annotated(views, src_hw, shift[["box_x", "box_y", "box_w", "box_h"]].to_numpy(np.float64))
            s_anat = anatomical_mirror_boxes(sdata.boxes, masks_of(shift_masks, shift["file"]))
            s_peaks = find_centres(models, views)
            s_mm = params.phantom.field_width_mm / src_hw[:, 1]
            shifted = figures("shift", sdata, [p[0] for p in s_peaks], [p[1] for p in s_peaks], s_anat, s_mm)
            every = np.arange(len(shift))
            shifted["fixed_box"] = fixed_box(sdata, every, every, s_anat, s_mm)
            record = {"model": model, "size": [h, w], "epochs": int(epochs), "seconds_per_fold": seconds / store.n_folds,
                      "threads": args.threads, "oof": oof, "shifted_phantom": shifted}
            results.append(record)
            print_record(record, len(store.images), len(shift))
    atomic_write_json(args.out, {"configs": results, "store": str(params.prepare.out),
                                 "shifted_phantom": {"seed": 1, "nuisance": 1.5, "patients_per_class": args.shift_patients}})
    print(f"wrote {args.out}")
    return 0


def print_record(r: dict, n: int, n_shift: int) -> None:
    print(f"\n{r['model']} at {r['size'][0]}x{r['size'][1]}, {r['epochs']} epochs: {r['seconds_per_fold']:.0f} s per fold "
          f"({r['threads'] or 'all'} threads)")
    for name, figs, count in (("out-of-fold, default phantom", r["oof"], n),
                              ("fold ensemble, unseen phantom (seed 1, nuisance 1.5)", r["shifted_phantom"], n_shift)):
        print(f"  {name} ({count} images); confidence min {figs['confidence_min']:.2f}, median {figs['confidence_median']:.2f}")
        for key in ("annotated_side", "either_image_mirror", "either_anatomical", "fixed_box"):
            f = figs[key]
            p90 = f" (p90 {f['centre_error_mm_p90']:.2f})" if "centre_error_mm_p90" in f else ""
            print(f"    {key:<22} IoU {f['iou_mean']:.3f}  hit {f['hit_rate']:.3f}  centre error median "
                  f"{f['centre_error_mm_median']:.2f} mm{p90}")


if __name__ == "__main__":
    raise SystemExit(main())
