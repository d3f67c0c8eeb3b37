"""`train.fold_parallel: N`: N folds train at once, each in its own worker process.

Folds are independent, so this is the simplest way to use several GPUs (worker i takes
cuda:i mod device count) or, on a CPU with many cores, to run folds side by side with a
share of the threads each.  A fold trains exactly as it would in sequence (same seeds, same
code: `fit.train_fold`), so the results do not depend on N.

The parent process keeps every MLflow and state write: workers only train and send events
back (`epoch`, `done`, `error`), which avoids concurrent writers on the tracking store and
lets a killed run resume as usual.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

from src.artifacts.cv_run import fold_dir
from src.artifacts.store import PreparedStore
from src.core.config import Params, with_values
from src.core.errors import BoneHealthError
from src.core.logs import setup_logging
from src.model.fit import train_fold

log = logging.getLogger(__name__)
_POLL_S = 1.0


def worker_devices(device: torch.device, n: int) -> list[str]:
    """The device of each of n workers: GPUs round-robin, or the CPU for all."""
    if device.type == "cuda":
        count = max(1, torch.cuda.device_count())
        return [f"cuda:{i % count}" for i in range(n)]
    return [str(device)] * n


def worker_threads(params: Params, n: int) -> int:
    """train.threads, or this process's cores shared evenly between the workers."""
    if params.train.threads:
        return params.train.threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // n)


def _worker(params_json: dict, device: str, inbox, events) -> None:
    """Train the folds sent to `inbox` until None arrives; report through `events`."""
    setup_logging()  # a spawned interpreter: the epoch lines are logged here, as in the parent
    params = Params.model_validate(params_json)
    store = PreparedStore.open(params.prepare.out)
    parent = mp.parent_process()

    def orphaned() -> bool:
        # A parent killed outright (OOM killer, SIGKILL) cannot stop its workers: they stop themselves.
        return parent is not None and not parent.is_alive()

    def relay(fold: int, epoch: int, record: dict) -> None:
        if orphaned():
            raise SystemExit(f"fold {fold}: the parent process is gone")
        events.put(("epoch", fold, (epoch, record)))

    while True:
        try:
            task = inbox.get(timeout=_POLL_S)
        except queue.Empty:
            if orphaned():
                return
            continue
        if task is None:
            return
        fold, fold_dir, extra_meta = task
        try:
            result = train_fold(params, store, fold, Path(fold_dir), device=device, extra_meta=extra_meta,
                                epoch_callback=lambda e, r, k=fold: relay(k, e, r))
        except BaseException as exc:  # noqa: BLE001 - every failure must reach the parent, then this worker ends
            one_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            events.put(("error", fold, (isinstance(exc, BoneHealthError), one_line, traceback.format_exc())))
            return
        events.put(("done", fold, result))


def train_folds_in_parallel(params: Params, folds: list[int], out: Path, device: torch.device, *,
                            start: Callable[[int], dict[str, Any]],
                            epoch: Callable[[int, int, dict], None],
                            done: Callable[[int, Any], None]) -> None:
    """Train `folds` with min(train.fold_parallel, len(folds)) workers.

    `start(k)` runs in this process just before fold k is handed out and returns the fold's
    extra checkpoint metadata; `epoch(k, epoch, record)` and `done(k, FoldResult)` relay the
    workers' events.  The first failing fold stops every worker and raises here.
    """
    n = min(params.train.fold_parallel, len(folds))
    ctx = mp.get_context("spawn")  # CUDA cannot be re-initialised in a forked child
    wparams = with_values(params, {"train.threads": worker_threads(params, n)}).model_dump(mode="json")
    events = ctx.Queue()
    inboxes = [ctx.Queue() for _ in range(n)]
    devices = worker_devices(device, n)
    workers = [ctx.Process(target=_worker, args=(wparams, devices[i], inboxes[i], events), daemon=True,
                           name=f"fold-worker-{i}") for i in range(n)]
    todo = list(folds)
    busy: dict[int, int] = {}  # fold -> its worker
    log.info("train.fold_parallel=%d: folds %s on %s (%s thread(s) each)", n, folds, ", ".join(devices),
             wparams["train"]["threads"])
    try:
        for w in workers:
            w.start()

        def hand_out(i: int) -> None:
            k = todo.pop(0)
            inboxes[i].put((k, str(fold_dir(out, k)), start(k)))
            busy[k] = i

        for i in range(n):
            hand_out(i)
        while busy:
            try:
                kind, k, payload = events.get(timeout=_POLL_S)  # payload: (epoch, record), error or result
            except queue.Empty:
                dead = [(k, i) for k, i in busy.items() if not workers[i].is_alive()]
                if dead:
                    k, i = dead[0]
                    raise BoneHealthError(f"fold {k}: its worker process died (exit code {workers[i].exitcode})")
                continue
            if kind == "epoch":
                epoch(k, payload[0], payload[1])
                continue
            i = busy.pop(k)
            if kind == "error":
                is_ours, one_line, tb = payload
                if not is_ours:
                    log.error("%s", tb)
                raise BoneHealthError(f"fold {k}: {one_line}")
            done(k, payload)
            if todo:
                hand_out(i)
    finally:
        for i, w in enumerate(workers):
            if w.is_alive():
                inboxes[i].put(None)
        for w in workers:
            w.join(timeout=10)
            if w.is_alive():
                w.terminate()
                w.join()
