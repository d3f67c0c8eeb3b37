"""One cross-validation fold: inner split, training loop, checkpoint, test-fold predictions.

No MLflow here: the CV (`src.model.cross_validation`) and tuning trials (`src.tuning`) each
log what they need through `epoch_callback` and the returned `FoldResult`.

Honest out-of-fold predictions: for test fold k the remaining folds are split again,
stratified and grouped by patient, into a training part and an inner validation part.
Only the inner validation drives early stopping, the LR schedule and the checkpoint
choice; the test fold is predicted once, at the end, by the chosen checkpoint in eval mode.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from src.artifacts.checkpoint import CheckpointMeta, save_checkpoint
from src.artifacts.cv_run import write_fold_history, write_fold_predictions
from src.artifacts.store import PreparedStore
from src.core.config import Params, TrainParams
from src.core.errors import BoneHealthError, DataError
from src.core.runtime import seed_everything, select_device, set_threads
from src.data.batches import batches_of, epoch_order
from src.data.splits import fold_split
from src.evaluation.metrics import auc_score
from src.model.distributed import Dist
from src.model.engine import (
    Engine,
    Schedule,
    attach_augmentation,
    build_engine,
    run_epoch,
)

log = logging.getLogger(__name__)
EpochCallback = Callable[[int, dict], None]


@dataclass
class FoldResult:
    fold: int
    history: list[dict]              # one dict per epoch: epoch, train_loss, val_loss, val_auc, lr, images_per_s
    best_epoch: int                  # 1-based epoch of the chosen checkpoint
    best_val_auc: float
    test_predictions: pd.DataFrame   # index, file, patient, fold, label, prob_<class>...
    checkpoint_dir: Path
    seconds: float = 0.0
    split_sizes: dict[str, int] = field(default_factory=dict)



def input_size(cfg: TrainParams, store: PreparedStore) -> list[int]:
    """[h, w] fed to the network: the prepared size, or train.image_size as the height with
    the width keeping the prepared aspect ratio (crops stay square, full images stay wide)."""
    h, w = (int(v) for v in store.meta["size"])
    if cfg.image_size is None:
        return [h, w]
    s = int(cfg.image_size)
    return [s, max(1, int(round(w * s / h)))]


def checkpoint_meta(params: Params, store: PreparedStore, fold: int | None) -> CheckpointMeta:
    """Everything inference needs to rebuild the network and its input (docs/ARCHITECTURE.md)."""
    cfg = params.train
    keep = ("mode", "size", "dtype", "preprocessing", "data_root", "manifest_sha256")
    return CheckpointMeta(
        model=cfg.model, classes=store.classes, in_chans=cfg.in_chans, positive_class=store.positive_class,
        input_size=input_size(cfg, store), preprocessing={k: store.meta[k] for k in keep if k in store.meta},
        fold=fold, drop_rate=cfg.drop_rate,
    )


def _val_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    """Plain (unweighted, unsmoothed) cross-entropy, comparable across configurations."""
    if len(labels) == 0:
        return float("nan")
    p = np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0)
    return float(-np.mean(np.log(p)))


def _better(auc: float, loss: float, best: tuple[float, float] | None, criterion: str = "val_auc") -> bool:
    """train.checkpoint: val_auc: higher inner-val AUC, equal AUC (it saturates on small sets) ->
    lower loss; val_loss: lower loss; last: every epoch replaces the one before."""
    if best is None or criterion == "last":
        return True
    if criterion == "val_loss":
        return (loss if not math.isnan(loss) else math.inf) < best[1]
    a = -math.inf if math.isnan(auc) else auc
    b = -math.inf if math.isnan(best[0]) else best[0]
    if a != b:
        return a > b
    return (loss if not math.isnan(loss) else math.inf) < best[1]


def first_checkpoint_epoch(cfg: TrainParams) -> int:
    """The first epoch that val_auc/val_loss may keep (1-based).  An early epoch's weights are far
    from converged, yet a validation set of ~30 images can still score them best by chance; from
    scratch, one fold's loss minimum fell on epoch 5 of 18 and scored 0.83 on its test fold."""
    if cfg.checkpoint == "last":
        return 1
    return math.floor(cfg.checkpoint_from * cfg.epochs) + 1


def predictions_frame(store: PreparedStore, rows: np.ndarray, probs: np.ndarray) -> pd.DataFrame:
    m = store.manifest.iloc[rows]
    frame = pd.DataFrame({
        "index": m["index"].to_numpy() if "index" in m else rows,
        "file": m["file"].to_numpy(),
        "patient": m["patient"].to_numpy(),
        "fold": m["fold"].to_numpy(),
        "label": m["label"].to_numpy(),
    })
    for c, name in enumerate(store.classes):
        frame[f"prob_{name}"] = probs[:, c]
    return frame


# ----------------------------------------------------------------------------- the fold
@dataclass
class _Fit:
    history: list[dict]
    best_epoch: int
    best_val_auc: float
    engine: Engine


def _fit(params: Params, store: PreparedStore, meta: CheckpointMeta, train_rows: np.ndarray, val_rows: np.ndarray,
         seed: int, label: str, device, epoch_callback: EpochCallback | None, ctx: Dist) -> _Fit:
    """The epoch loop; leaves the chosen weights loaded in the returned engine's model.

    With validation rows the epoch train.checkpoint names is kept (the last one, or the best by
    inner-val AUC or loss from epoch `first_checkpoint_epoch` on, with early stopping counted from
    there too); without them (all-data refit) the last epoch.  Under torchrun
    rank 0 validates and the others follow its figures, so every rank stops together.
    """
    cfg = params.train
    device = torch.device(device) if device is not None else select_device(cfg.device)
    if cfg.batch_size < ctx.world:
        raise BoneHealthError(f"train.batch_size={cfg.batch_size} is the global batch: it needs at least one "
                              f"image per process ({ctx.world} processes)")
    set_threads(cfg.threads)
    seed_everything(seed, cfg.deterministic)
    labels = store.labels
    if len(np.unique(labels[train_rows])) < len(store.classes):
        raise DataError(f"{store.root}: the training part of {label} lacks a class; need more patients per class")

    fixed = device.type == "cuda"  # cudnn.benchmark: one batch shape (src/data/batches.py)
    steps_per_epoch = max(1, sum(1 for _ in batches_of(train_rows, cfg.batch_size, ctx.world, fixed)))
    engine = build_engine(cfg, meta, device, labels[train_rows], ctx, total_steps=steps_per_epoch * cfg.epochs)
    if ctx.active:
        # Same initial weights everywhere (above), but each rank its own dropout masks.
        torch.manual_seed(seed + 1_000_003 * ctx.rank)
    schedule = Schedule(engine.optimizer, cfg, steps_per_epoch)
    source = attach_augmentation(engine, store, cfg, seed=seed + 7919 * ctx.rank)
    val_images, val_labels = store.images[val_rows], labels[val_rows]
    rng = np.random.default_rng(seed)

    history: list[dict] = []
    best: tuple[float, float] | None = None
    best_state: dict[str, torch.Tensor] | None = None
    best_epoch, stale = 0, 0
    first_eligible = first_checkpoint_epoch(cfg)
    for epoch in range(1, cfg.epochs + 1):
        lr = float(engine.optimizer.param_groups[0]["lr"])
        chunks = list(batches_of(epoch_order(train_rows, labels, cfg.class_balance, rng), cfg.batch_size, ctx.world,
                                 fixed))
        train_loss, speed = run_epoch(engine, source, chunks, num_workers=cfg.num_workers,
                                      seed=seed * 1000 + epoch + 100_003 * ctx.rank,
                                      schedule=schedule, desc=f"{label} epoch {epoch}/{cfg.epochs}")
        val_loss = val_auc = float("nan")
        if len(val_rows) and ctx.is_main:
            val_probs = engine.predict(val_images, cfg.batch_size * 2)
            val_loss, val_auc = _val_loss(val_probs, val_labels), auc_score(val_labels, val_probs)
        val_loss, val_auc = ctx.broadcast((val_loss, val_auc))
        schedule.step_epoch(val_loss)
        record = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "val_auc": val_auc,
                  "lr": lr, "images_per_s": speed}
        history.append(record)
        eligible = epoch >= first_eligible or not len(val_rows)
        improved = eligible and (_better(val_auc, val_loss, best, cfg.checkpoint) if len(val_rows) else True)
        if improved:
            best, best_epoch, stale = (val_auc, val_loss), epoch, 0
            # the last epoch's weights are already loaded: copy only what a later epoch may replace
            if len(val_rows) and ctx.is_main and cfg.checkpoint != "last":
                best_state = copy.deepcopy({k: v.detach().to("cpu") for k, v in engine.eval_model.state_dict().items()})
        elif eligible:
            stale += 1
        if ctx.is_main:
            log.info("%s epoch %d/%d: train_loss %.4f val_loss %.4f val_auc %.4f lr %.2e %.1f img/s%s", label, epoch,
                     cfg.epochs, train_loss, val_loss, val_auc, lr, speed, " *" if improved and len(val_rows) else "")
            if epoch_callback is not None:
                epoch_callback(epoch, dict(record))
        if len(val_rows) and cfg.early_stopping_patience and stale >= cfg.early_stopping_patience:
            break
    if best_state is not None:
        engine.eval_model.load_state_dict(best_state)
    return _Fit(history=history, best_epoch=best_epoch, best_val_auc=float(best[0]), engine=engine)


def train_fold(params: Params, store: PreparedStore, fold: int, out_dir: Path, *,
               epoch_callback: EpochCallback | None = None, device=None,
               extra_meta: dict[str, Any] | None = None, ctx: Dist | None = None,
               label: str | None = None) -> FoldResult:
    """Train on fold `fold`'s training part, select on its inner validation part, predict its
    test fold once; writes test_predictions.csv, history.csv (the learning curve), model.pt and
    meta.json (last) into out_dir.

    `epoch_callback(epoch, record)` runs after every epoch (1-based); an exception it raises
    (e.g. optuna.TrialPruned) stops training and propagates, leaving out_dir untouched.
    `extra_meta` is merged into meta.json (train.py adds the MLflow run id).  Under torchrun
    (`ctx`) every rank calls this; only rank 0 calls back, predicts and writes.
    """
    cfg = params.train
    ctx = ctx or Dist()
    out_dir = Path(out_dir)
    started = time.perf_counter()
    split = fold_split(store, fold, cfg.val_fraction, cfg.seed)
    meta = checkpoint_meta(params, store, fold)
    fit = _fit(params, store, meta, split.train, split.val, cfg.seed + fold, label or f"fold {fold}", device, epoch_callback,
               ctx)

    test_rows = split.test if ctx.is_main else split.test[:0]
    test_probs = fit.engine.predict(store.images[test_rows], cfg.batch_size * 2)
    predictions = predictions_frame(store, test_rows, test_probs)
    meta = meta.with_updates(best_epoch=fit.best_epoch, val_auc=fit.best_val_auc, world_size=ctx.world,
                             **(extra_meta or {}))
    if ctx.is_main:
        write_fold_predictions(out_dir, predictions)
        write_fold_history(out_dir, fit.history)
        # meta.json written last marks the folder complete
        save_checkpoint(out_dir, fit.engine.eval_model.state_dict(), meta)
    return FoldResult(
        fold=fold, history=fit.history, best_epoch=fit.best_epoch, best_val_auc=fit.best_val_auc,
        test_predictions=predictions, checkpoint_dir=out_dir, seconds=time.perf_counter() - started,
        split_sizes={"train": len(split.train), "val": len(split.val), "test": len(split.test)},
    )


def train_all(params: Params, store: PreparedStore, out_dir: Path, *,
              epoch_callback: EpochCallback | None = None, device=None,
              extra_meta: dict[str, Any] | None = None, ctx: Dist | None = None) -> FoldResult:
    """Refit on every image for exactly train.epochs (no validation, no early stopping, the
    last epoch kept): register's `refit` strategy, with epochs chosen by the CV beforehand.

    Writes model.pt and meta.json (fold null); there is no test fold, so no predictions.
    """
    cfg = params.train
    ctx = ctx or Dist()
    out_dir = Path(out_dir)
    started = time.perf_counter()
    rows = np.arange(len(store.images))
    meta = checkpoint_meta(params, store, fold=None)
    fit = _fit(params, store, meta, rows, rows[:0], cfg.seed, "all data", device, epoch_callback, ctx)
    meta = meta.with_updates(best_epoch=fit.best_epoch, val_auc=None, trained_on="all", world_size=ctx.world,
                             **(extra_meta or {}))
    if ctx.is_main:
        save_checkpoint(out_dir, fit.engine.eval_model.state_dict(), meta)
    empty = predictions_frame(store, rows[:0], np.zeros((0, len(store.classes))))
    return FoldResult(
        fold=-1, history=fit.history, best_epoch=fit.best_epoch, best_val_auc=float("nan"),
        test_predictions=empty, checkpoint_dir=out_dir, seconds=time.perf_counter() - started,
        split_sizes={"train": len(rows), "val": 0, "test": 0},
    )
