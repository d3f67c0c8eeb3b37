"""Speed of the phantom: images/s for the params' config (default: 1024x512, ~220 images).

    python benchmarks/bench_phantom.py [--params params.yaml] [--set phantom.width=2048 ...] [--repeat 1]

Prints, measured in this run: end-to-end `generate` (drawing, PNG encoding and writing,
manifest and COCO, atomic swap) into a temporary folder, then the share of each step on one
thread: a patient's anatomy (once per patient), a visit's exposure (once per image), PNG
encoding.  Wall and CPU seconds are both shown because a shared machine inflates wall time.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.core.config import add_params_args, params_from_args  # noqa: E402
from src.synthetic.anatomy import acquire, draw_anatomy  # noqa: E402
from src.synthetic.generator import PNG_FLAGS, field_of, generate, plan, quantize  # noqa: E402


def timed(fn, *args):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main(argv=None) -> int:
    parser = add_params_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    parser.add_argument("--repeat", type=int, default=1, help="end-to-end runs (the best is reported)")
    args = parser.parse_args(argv)
    params = params_from_args(args).phantom
    f = field_of(params)
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-phantom-") as tmp:
        for i in range(args.repeat):
            p = params.model_copy(update={"out": f"{tmp}/out{i}", "masks_out": f"{tmp}/masks{i}"})
            summary, wall, cpu = timed(generate, p)
            runs.append((wall, cpu, summary))
    wall, cpu, s = min(runs, key=lambda r: r[0])
    n = s["images"]
    print(f"phantom {params.width}x{params.height}, {n} images of {s['patients']} patients, bit depth {params.bit_depth}")
    print(f"end to end : {wall:6.2f} s wall {cpu:6.2f} s CPU -> {n / wall:6.1f} images/s ({n / cpu:.1f} per CPU-second)")

    planned = plan(params)
    sample = planned[: min(len(planned), 24)]
    patients = {}
    t_anat = t_acq = t_png = 0.0
    for im in sample:
        if im.patient.seed not in patients:
            patients[im.patient.seed], _, c = timed(draw_anatomy, im.patient, f)
            t_anat += c
        rad, _, c = timed(acquire, patients[im.patient.seed], im.acquisition, f)
        t_acq += c
        img = quantize(rad.image, params.bit_depth)
        _, _, c = timed(cv2.imencode, ".png", img, PNG_FLAGS)
        t_png += c
    k, m = len(patients), len(sample)
    print(f"per patient: anatomy {1000 * t_anat / k:6.1f} ms CPU (once per patient, {k} measured)")
    print(f"per image  : exposure {1000 * t_acq / m:6.1f} ms CPU, PNG encode {1000 * t_png / m:5.1f} ms CPU "
          "(a second thread overlaps it with drawing)")
    share = np.array([t_anat * (s['patients'] / k), t_acq * n / m, t_png * n / m])
    print("share of CPU: anatomy {:.0%}, exposure {:.0%}, PNG {:.0%}".format(*(share / share.sum())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
