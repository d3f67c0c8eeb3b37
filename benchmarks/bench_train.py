"""Training throughput: the real trainer's epoch against a bare optimiser loop, same process.

    python benchmarks/bench_train.py [--params params.yaml] [--set train.batch_size=32 ...]
                                     [--batches 10] [--rounds 3] [--store DIR]

"trainer" runs `src.model.fit.run_epoch`: batches read from the prepared memmap store by
index arrays, albumentations on each image, normalisation, forward/backward/step with the
configured AMP and channels_last.  "bare" runs forward/backward/step of the same model,
batch and input size on a random tensor already on the device.  Rounds alternate the
two so that other load on a shared machine hits both alike; medians are printed, then
the ratio (target >= 0.90).  Without a prepared store (or with --synthetic) a random
uint8 store of the params' size is written to a temporary folder.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.artifacts.store import PreparedStore  # noqa: E402
from src.core.config import add_params_args, params_from_args  # noqa: E402
from src.core.fileio import atomic_write_json  # noqa: E402
from src.core.runtime import amp_dtype, autocast_context, select_device  # noqa: E402
from src.data.batches import BatchSource, batches_of  # noqa: E402
from src.model.engine import attach_augmentation, build_engine, run_epoch  # noqa: E402
from src.model.fit import checkpoint_meta  # noqa: E402


def synthetic_shape(params) -> tuple[str, int, int]:
    """(mode, h, w) the prepare stage would write: a square crop, or a whole image at
    prepare.full.size (a 3x downscale has no fixed size without images, so it falls back to a crop)."""
    full = params.prepare.full
    if params.prepare.mode == "full" and full.size is not None:
        return "full", int(full.size[0]), int(full.size[1])
    s = params.train.image_size or params.prepare.crop.size
    return "crop", int(s), int(s)


def synthetic_store(root: Path, n: int, shape: tuple[str, int, int], classes=("C1", "C3")) -> PreparedStore:
    mode, h, w = shape
    rng = np.random.default_rng(0)
    np.save(root / "images.npy", rng.integers(0, 256, (n, h, w), dtype=np.uint8))
    labels = np.arange(n) % len(classes)
    pd.DataFrame({"index": np.arange(n), "file": [f"{i}.png" for i in range(n)],
                  "class": np.asarray(classes)[labels], "label": labels,
                  "patient": [f"P{i}" for i in range(n)], "fold": np.arange(n) % 5}).to_csv(root / "manifest.csv", index=False)
    (root / "meta.json").write_text(json.dumps({"mode": mode, "size": [h, w], "dtype": "uint8",
                                                "classes": list(classes), "positive_class": classes[-1], "folds": 5}))
    return PreparedStore.open(root)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_rate(engine, x: torch.Tensor, y: torch.Tensor, batches: int) -> float:
    """Forward/backward/step on a resident tensor: the ceiling for this model, batch and size."""
    engine.model.train()
    _sync(engine.device)
    start = time.perf_counter()
    for _ in range(batches):
        engine.optimizer.zero_grad(set_to_none=True)
        with autocast_context(engine.device, engine.amp):
            loss = engine.criterion(engine.model(x).float(), y) / len(y)  # the criterion sums
        if engine.scaler is not None:
            engine.scaler.scale(loss).backward()
            engine.scaler.step(engine.optimizer)
            engine.scaler.update()
        else:
            loss.backward()
            engine.optimizer.step()
    _sync(engine.device)
    return batches * len(y) / (time.perf_counter() - start)


def trainer_rate(engine, source: BatchSource, chunks: list[np.ndarray], num_workers: int) -> float:
    _sync(engine.device)
    start = time.perf_counter()
    run_epoch(engine, source, chunks, num_workers=num_workers, desc="trainer")
    _sync(engine.device)
    return sum(len(c) for c in chunks) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = add_params_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--batches", type=int, default=10, help="timed batches per round and loop")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--store", default=None, help="prepared store (default: prepare.out)")
    parser.add_argument("--synthetic", action="store_true", help="random store of the params' size")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file (gpu_check.sh)")
    parser.add_argument("--profile", default=None, help="a name for the JSON record")
    args = parser.parse_args(argv)
    params = params_from_args(args)
    cfg = params.train
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tmp = tempfile.TemporaryDirectory()
    store_dir = Path(args.store or params.prepare.out)
    if args.synthetic or not (store_dir / "meta.json").is_file():
        shape = synthetic_shape(params)
        store = synthetic_store(Path(tmp.name), max(64, cfg.batch_size * (args.batches + 2)), shape)
        origin = f"synthetic {shape[0]} {shape[1]}x{shape[2]} uint8"
    else:
        store = PreparedStore.open(store_dir)
        origin = str(store_dir)
    device = select_device(cfg.device)
    torch.manual_seed(cfg.seed)
    meta = checkpoint_meta(params, store, fold=0)
    engine = build_engine(cfg, meta, device, store.labels)
    # the trainer's own choice: augmentation on the device when it is a GPU (train.augment.runs_on)
    source = attach_augmentation(engine, store, cfg, seed=cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    need = cfg.batch_size * args.batches
    rows = np.resize(rng.permutation(len(store.images)), need)
    chunks = list(batches_of(rows, cfg.batch_size, fixed_shape=device.type == "cuda"))

    h, w = meta.input_size
    x = torch.randn(cfg.batch_size, cfg.in_chans, h, w, device=device)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, len(store.classes), (cfg.batch_size,), device=device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # Warm-up: first calls allocate, pick kernels and fault in the memmap.
    trainer_rate(engine, source, chunks[:2], cfg.num_workers)
    bare_rate(engine, x, y, 2)
    trainer, bare = [], []
    for r in range(args.rounds):
        # Alternate which loop goes first, so a load that drifts over time favours neither.
        if r % 2 == 0:
            trainer.append(trainer_rate(engine, source, chunks, cfg.num_workers))
            bare.append(bare_rate(engine, x, y, args.batches))
        else:
            bare.append(bare_rate(engine, x, y, args.batches))
            trainer.append(trainer_rate(engine, source, chunks, cfg.num_workers))
    t, b = statistics.median(trainer), statistics.median(bare)
    # Each round's two loops ran back to back: their ratio cancels load that changes between rounds.
    ratio = statistics.median(tv / bv for tv, bv in zip(trainer, bare))
    amp = amp_dtype(cfg.amp, device)
    print(f"model {cfg.model}, input {h}x{w}x{cfg.in_chans}, batch {cfg.batch_size}, device {device}, "
          f"amp {str(amp).replace('torch.', '') if amp else 'off'}, channels_last {cfg.channels_last}, "
          f"threads {torch.get_num_threads()}, augment strength {cfg.augment.strength if cfg.augment.enabled else 0}, "
          f"store {origin}")
    print(f"rounds {args.rounds} x {args.batches} batches; trainer {['%.1f' % v for v in trainer]}, bare {['%.1f' % v for v in bare]}")
    print(f"trainer: {t:.1f} img/s")
    print(f"bare:    {b:.1f} img/s")
    print(f"ratio:   {ratio:.3f}  (median of per-round ratios; target >= 0.90)")
    peak = None
    if device.type == "cuda":
        # What a GPU must hold to train this profile: weights, optimiser state, activations, EMA.
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        print(f"peak GPU memory: {peak:.2f} GiB allocated, "
              f"{torch.cuda.max_memory_reserved(device) / 2**30:.2f} GiB reserved by the caching allocator")
    if args.json:
        atomic_write_json(Path(args.json), {
            "profile": args.profile or cfg.model, "model": cfg.model, "input": [h, w, cfg.in_chans],
            "batch_size": cfg.batch_size, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
            "augment_on_device": engine.augment is not None, "trainer_img_s": t, "bare_img_s": b,
            "trainer_over_bare": ratio, "trainer_rounds": trainer, "bare_rounds": bare, "peak_gpu_gib": peak,
            "store": origin})
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
