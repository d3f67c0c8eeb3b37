"""Seconds per image of every heat-map method on this CPU, next to one plain forward pass
(the ratio is what carries over to other machines), plus the stage's other per-image costs:
ROAD and the overlay figure.

    .venv/bin/python benchmarks/bench_gradcam.py [--threads N] [--repeats R] [--models test_efficientnet:64 efficientnet_b0:128]

Random weights: the cost of a map does not depend on what the network learnt.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from src.artifacts.checkpoint import CheckpointMeta  # noqa: E402
from src.explain.cam import METHODS, explain_tensor, resolve_target_layer  # noqa: E402
from src.explain.faithfulness import perturbation_score  # noqa: E402
from src.explain.figures import save_overlay  # noqa: E402
from src.model.factory import create_model, to_input  # noqa: E402


def timed(fn, repeats: int) -> float:
    fn()  # warm-up: lazy imports, oneDNN kernels, allocator
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def bench(name: str, size: int, repeats: int, road_percentiles: list[int]) -> list[tuple[str, float]]:
    torch.manual_seed(0)
    model = create_model(name, num_classes=2, in_chans=1).eval()
    meta = CheckpointMeta(model=name, classes=["C1", "C3"], input_size=[size, size])
    image = np.random.default_rng(0).integers(0, 256, (size, size), dtype=np.uint8)
    x = to_input(image, meta)
    layer_name, layer = resolve_target_layer(model, None, tuple(x.shape))
    rows = []
    with torch.no_grad():
        rows.append(("forward pass", timed(lambda: model(x), repeats * 5)))
    for method in METHODS:
        reps = 1 if method == "scorecam" else repeats  # one forward pass per channel of the layer
        rows.append((method, timed(lambda m=method: explain_tensor(model, x, m, layer, target=1), reps)))
    cam, _, target = explain_tensor(model, x, "gradcam", layer, target=1)
    rows.append((f"ROAD {road_percentiles}", timed(lambda: perturbation_score(model, x, cam, target, "road", road_percentiles), 1)))
    rows.append(("confidence_change", timed(lambda: perturbation_score(model, x, cam, target, "confidence_change"), repeats)))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "o.png"
        rows.append(("overlay PNG", timed(lambda: save_overlay(out, image, cam, pred_class="C3", prob=0.9,
                                                                true_class="C3"), repeats)))
    print(f"\n{name} at {size}x{size} px, target layer {layer_name}, {torch.get_num_threads()} torch thread(s)")
    base = rows[0][1]
    print(f"  {'step':<24}{'s/image':>10}{'x forward':>11}")
    for step, seconds in rows:
        print(f"  {step:<24}{seconds:>10.4f}{seconds / base:>11.1f}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=["test_efficientnet:64", "efficientnet_b0:128"],
                        help="timm_name:size pairs")
    parser.add_argument("--road-percentiles", type=int, nargs="+", default=[20, 40, 60, 80])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {load:.1f} at start")
    for spec in args.models:
        name, _, size = spec.partition(":")
        bench(name, int(size or 128), args.repeats, args.road_percentiles)


if __name__ == "__main__":
    main()
