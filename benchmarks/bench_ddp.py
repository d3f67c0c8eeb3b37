"""Data-parallel throughput: N torchrun processes (gloo on CPU, NCCL on GPU) against 1 process.

    python benchmarks/bench_ddp.py [--nproc 2] [--set train.model=efficientnet_b0 ...]
                                   [--batches 12] [--rounds 3] [--size 128]

Both sides run `src.model.fit.run_epoch` (store reads, augmentation, forward/backward/step)
on the same synthetic store, model and *global* batch (`train.batch_size`, split across the
processes).  On CPU the single process gets all the cores' threads and each of the N
processes 1/N of them, so both use the same cores.  Rounds alternate the two; medians and
the ratio N-process / 1-process are printed.  On a 2-core CPU the ratio is expected below 1
(the gloo all-reduce of ~4 M gradients per step costs more than halving the batch saves);
on N GPUs it is the scaling figure.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_train import synthetic_store  # noqa: E402
from src.artifacts.store import PreparedStore  # noqa: E402
from src.core.config import add_params_args, params_files, params_from_args  # noqa: E402
from src.data.augment import build_augment  # noqa: E402
from src.data.batches import BatchSource, batches_of  # noqa: E402
from src.model import distributed  # noqa: E402
from src.model.engine import build_engine, run_epoch  # noqa: E402
from src.model.fit import checkpoint_meta  # noqa: E402


def worker(params, store_dir: Path, batches: int) -> None:
    """One timed measurement (warm-up epoch, then a timed one); rank 0 prints JSON."""
    cfg = params.train
    ctx, device = distributed.setup(cfg.device)
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        store = PreparedStore.open(store_dir)
        torch.manual_seed(cfg.seed)
        engine = build_engine(cfg, checkpoint_meta(params, store, fold=0), device, store.labels, ctx)
        source = BatchSource(store, build_augment(cfg.augment, seed=cfg.seed + ctx.rank))
        rows = np.resize(np.random.default_rng(cfg.seed).permutation(len(store.images)), cfg.batch_size * batches)
        chunks = list(batches_of(rows, cfg.batch_size, ctx.world))
        run_epoch(engine, source, chunks[:2], desc="warm-up")
        ctx.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run_epoch(engine, source, chunks, desc="timed")
        if device.type == "cuda":
            torch.cuda.synchronize()
        ctx.barrier()
        rate = sum(len(c) for c in chunks) / (time.perf_counter() - start)
        if ctx.is_main:
            print("RESULT " + json.dumps({"world": ctx.world, "img_s": rate, "threads": torch.get_num_threads(),
                                          "device": str(device)}), flush=True)
    finally:
        distributed.teardown()


def _measure(cmd: list[str], env: dict) -> dict:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"benchmark worker failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv: list[str] | None = None) -> int:
    parser = add_params_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--batches", type=int, default=12, help="timed global batches per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=None, help="synthetic image side (default: prepare.crop.size)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # store dir, set by the parent
    args = parser.parse_args(argv)
    params = params_from_args(args)
    if args.worker:
        worker(params, Path(args.worker), args.batches)
        return 0

    cfg = params.train
    cuda = torch.cuda.is_available() and cfg.device in ("auto", "cuda")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    size = args.size or cfg.image_size or params.prepare.crop.size
    passthrough = [a for p in params_files(args) for a in ("--params", p)] + [a for o in args.overrides for a in ("--set", o)]
    with tempfile.TemporaryDirectory(prefix="bench_ddp_") as tmp:
        synthetic_store(Path(tmp), max(128, cfg.batch_size * (args.batches + 2)), size)
        script = [str(Path(__file__).resolve()), "--worker", tmp, "--batches", str(args.batches), *passthrough]
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        threads_one = cfg.threads or cores
        threads_n = max(1, threads_one // args.nproc) if not cuda else threads_one
        # Baselines: one process on all the cores (same hardware as the N processes) and one
        # process on one process's share (what each of the N gets).
        configs = {
            f"1 process, all cores ({threads_one} threads)": ([sys.executable, *script], threads_one),
            f"1 process, one share ({threads_n} threads)": ([sys.executable, *script], threads_n),
            f"{args.nproc} processes ({threads_n} threads each)": (
                [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                 *script], threads_n),
        }
        rates: dict[str, list[float]] = {name: [] for name in configs}
        device = "?"
        for r in range(args.rounds):
            names = list(configs) if r % 2 == 0 else list(reversed(configs))
            for name in names:
                cmd, threads = configs[name]
                res = _measure(cmd + ["--set", f"train.threads={threads}"], {**env, "OMP_NUM_THREADS": str(threads)})
                rates[name].append(res["img_s"])
                device = res["device"]
    medians = {name: statistics.median(v) for name, v in rates.items()}
    names = list(configs)
    print(f"model {cfg.model}, input {size}x{size}, global batch {cfg.batch_size}, {args.batches} batches x "
          f"{args.rounds} rounds, device {device}, {cores} cores")
    for name in names:
        print(f"{name}: {medians[name]:.1f} img/s  {['%.1f' % v for v in rates[name]]}")
    multi = medians[names[-1]]
    print(f"ratio {args.nproc}-process / 1-process on all cores: {multi / medians[names[0]]:.3f}")
    print(f"ratio {args.nproc}-process / 1-process on one share: {multi / medians[names[1]]:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
