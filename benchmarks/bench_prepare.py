"""Prepare throughput (images/s, decode + preprocess + store) next to decode-alone cost.

    python benchmarks/bench_prepare.py [--n 40] [--data DIR] [--params params.yaml]

Runs the real `prepare` on 1024x512 8-bit PNGs for full and crop modes, with and
without rolling ball, and times plain `read_image` over the same files in the same run,
so the ratios hold on any machine.  Without --data it generates the project's phantom
(src.phantom) in a temp folder; with --data it uses an existing class-folder tree (e.g.
data/phantom).
Also times the fast rolling ball (shrunken copy) against the exact one on one image and
reports how far their backgrounds differ.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from src.core.config import load_params  # noqa: E402
from src.data.build_store import prepare  # noqa: E402
from src.data.imaging import read_image  # noqa: E402
from src.data.preprocess import auto_shrink, rolling_ball_background  # noqa: E402

WIDTH, HEIGHT = 1024, 512


def phantom_dataset(tmp: Path, n: int) -> tuple[dict[str, Path], str]:
    """A phantom of about n images at WIDTH x HEIGHT, laid out like a user's data."""
    from src.core.config import PhantomParams
    from src.synthetic.generator import generate

    p = PhantomParams(out=str(tmp / "phantom"), masks_out=str(tmp / "masks"), patients_per_class=max(1, n // 2),
                      followup_fraction=0.0, width=WIDTH, height=HEIGHT, bit_depth=8)
    generate(p)
    out = tmp / "phantom"
    return {"root": out, "manifest": out / "manifest.csv", "annotations": out / "annotations.json"}, "src.phantom"


def timed(fn, repeats: int = 1) -> tuple[float, float]:
    """(wall, CPU) seconds, each the best of `repeats`.  CPU time (all threads of this
    process) is the robust figure on a machine shared with other jobs; wall adds their noise."""
    wall = cpu = float("inf")
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall = min(wall, time.perf_counter() - w0)
        cpu = min(cpu, time.process_time() - c0)
    return wall, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=40, help="images (synthesised, or the first N under --data)")
    ap.add_argument("--data", type=Path, help="a class-folder root to use instead of synthetic images")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--repeats", type=int, default=3, help="best of this many timings per row")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_prepare_") as tmp_text:
        tmp = Path(tmp_text)
        if args.data:
            paths = {"root": args.data, "manifest": args.data / "manifest.csv",
                     "annotations": args.data / "annotations.json"}
            source = str(args.data)
        else:
            paths, source = phantom_dataset(tmp, args.n)
        files = sorted(p for p in paths["root"].rglob("*.png"))[: args.n] if args.data else sorted(paths["root"].rglob("*.png"))
        for p in files:
            p.read_bytes()  # warm the page cache: we time decoding, not the disk
        decode_s = timed(lambda: [read_image(p) for p in files], args.repeats)
        n = len(files)

        base = [f"data.root={paths['root']}", "train.folds=2",
                f"data.manifest={paths['manifest'] if paths['manifest'].exists() else 'null'}",
                f"data.annotations={paths['annotations'] if paths['annotations'].exists() else 'null'}"]
        configs = {
            "full (downscale 3)": ["prepare.mode=full", "prepare.full.downscale=3", "prepare.full.size=null"],
            "crop": ["prepare.mode=crop"],
        }
        results = []
        for name, extra in configs.items():
            for rb in (False, True):
                overrides = base + extra + [f"prepare.out={tmp / 'out'}", f"prepare.rolling_ball.enabled={str(rb).lower()}"]
                params = load_params(args.params, overrides)
                with contextlib.redirect_stdout(io.StringIO()):
                    prepare(params)  # warm-up: imports (cv2, skimage, sklearn) and first-touch costs
                    seconds = timed(lambda: prepare(params), args.repeats)
                label = name + (f" + rolling ball r={params.prepare.rolling_ball.radius}" if rb else "")
                results.append((label, seconds))
        radius = params.prepare.rolling_ball.radius

        img = read_image(files[0])
        shrink = auto_shrink(radius)
        fast_s = timed(lambda: rolling_ball_background(img, radius), args.repeats)
        t0 = time.process_time()
        exact = rolling_ball_background(img, radius, shrink=1)
        exact_s = time.process_time() - t0
        diff = np.abs(rolling_ball_background(img, radius) - exact) * 255

    print(f"prepare throughput, {n} PNGs {WIDTH}x{HEIGHT} 8-bit from {source}, one process (prepare.workers=1), "
          f"best of {args.repeats}")
    print(f"{'pipeline':<44}{'images/s':>10}{'wall ms':>9}{'CPU ms':>9}{'CPU x decode':>14}")
    rows = [("decode alone (read_image)", decode_s)] + results
    for label, (wall, cpu) in rows:
        print(f"{label:<44}{n / wall:>10.1f}{1000 * wall / n:>9.1f}{1000 * cpu / n:>9.1f}{cpu / decode_s[1]:>14.2f}")
    print(f"rolling ball r={radius} on one {WIDTH}x{HEIGHT} image: shrunken x{shrink} {1000 * fast_s[1]:.0f} ms CPU, "
          f"exact (shrink=1, = skimage rolling_ball) {1000 * exact_s:.0f} ms CPU ({exact_s / fast_s[1]:.0f}x); "
          f"background difference mean {diff.mean():.2f}, max {diff.max():.2f} grey levels of 255")

if __name__ == "__main__":
    main()
