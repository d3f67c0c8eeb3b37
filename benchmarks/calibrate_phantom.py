"""How learnable is the phantom?  Non-deep baselines on a freshly generated dataset.

    python benchmarks/calibrate_phantom.py [--params params.yaml] [--set phantom.separation=0.8 ...]

Generates the dataset the params describe into a temporary folder (or reads --data DIR, a
folder written by `python -m src.phantom` with its masks in DIR_masks... see --masks), then
prints, with 5-fold cross-validation grouped by patient:
  - the ceiling: AUC of the latent severity the generator drew (no model can beat it);
  - AUC of the cortical width measured from the image in the annotation box (src.phantom);
  - AUC of a logistic regression on the cortex profile measured from the image;
  - AUC of a logistic regression on global intensity statistics: must stay near chance.
The default config should put the profile baseline near 0.85-0.95 and the global one < 0.65.
"""
from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.core.config import add_params_args, params_from_args  # noqa: E402
from src.synthetic.generator import generate  # noqa: E402
from src.synthetic.measurement import cortex_profile, global_intensity_features  # noqa: E402


def cv_auc(features: np.ndarray, labels: np.ndarray, groups: list[str], seed: int = 0) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=5000))
    folds = StratifiedGroupKFold(n_splits=5, shuffle=True, random_state=seed)
    proba = cross_val_predict(model, features, labels, groups=groups, cv=folds, method="predict_proba")[:, 1]
    return float(roc_auc_score(labels, proba))


def measure(out: Path, masks: Path) -> dict[str, np.ndarray | list]:
    truth = {r["file"]: r for r in csv.DictReader(open(masks / "truth.csv"))}
    rows = list(csv.DictReader(open(out / "manifest.csv")))
    res: dict[str, list] = {k: [] for k in ("label", "patient", "severity", "drawn", "width", "profile", "global")}
    for r in rows:
        t = truth[r["file"]]
        image = cv2.imread(str(out / r["file"]), cv2.IMREAD_UNCHANGED)
        m = cortex_profile(image, [float(r[k]) for k in ("box_x", "box_y", "box_w", "box_h")], float(t["mm_per_px"]))
        res["label"].append(int(t["label"]))
        res["patient"].append(r["patient_id"])
        res["severity"].append(float(t["severity"]))
        res["drawn"].append(float(t["cortex_mm"]))
        res["width"].append(m.width_mm)
        res["profile"].append((m.profile - m.profile.mean()) / (m.profile.std() + 1e-9))
        res["global"].append(global_intensity_features(image))
    return {k: (v if k == "patient" else np.asarray(v)) for k, v in res.items()}


def main(argv=None) -> int:
    parser = add_params_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    parser.add_argument("--data", help="an existing phantom.out folder instead of generating one")
    parser.add_argument("--masks", help="its phantom.masks_out folder (default: <data>_masks)")
    args = parser.parse_args(argv)
    params = params_from_args(args).phantom
    from sklearn.metrics import roc_auc_score

    with tempfile.TemporaryDirectory(prefix="phantom-calib-") as tmp:
        if args.data:
            out, masks = Path(args.data), Path(args.masks or f"{args.data.rstrip('/')}_masks")
        else:
            out, masks = Path(tmp) / "phantom", Path(tmp) / "masks"
            t0 = time.perf_counter()
            s = generate(params.model_copy(update={"out": str(out), "masks_out": str(masks)}))
            print(f"generated {s['images']} images ({s['patients']} patients) in {time.perf_counter() - t0:.1f} s")
        r = measure(out, masks)
    y, w = r["label"], r["width"]
    print(f"separation {params.separation}, {params.width}x{params.height}, nuisance {params.nuisance}")
    for label, name in enumerate(params.classes):
        sel = y == label
        print(f"  {name}: measured cortical width {w[sel].mean():.2f} +- {w[sel].std():.2f} mm "
              f"(drawn {r['drawn'][sel].mean():.2f} mm), n={sel.sum()}")
    err = np.abs(w - r["drawn"])
    print(f"  measured vs drawn width: r={np.corrcoef(w, r['drawn'])[0, 1]:.3f}, mean |error| {err.mean():.2f} mm")
    print("AUC (pooled out-of-fold, 5 folds grouped by patient):")
    print(f"  ceiling, latent severity          {roc_auc_score(y, r['severity']):.3f}")
    print(f"  measured cortical width alone     {roc_auc_score(y, -w):.3f}")
    print(f"  logistic regression, profile      {cv_auc(r['profile'], y, r['patient']):.3f}")
    print(f"  logistic regression, global stats {cv_auc(r['global'], y, r['patient']):.3f}   (shortcut check: ~0.5)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
