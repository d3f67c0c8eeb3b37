"""One cross-validation fold: inner split, training loop, checkpoint, test-fold predictions.

No MLflow here: `src.train` (the CV stage) and `src.tune` (Optuna) each log what they
need through `epoch_callback` and the returned `FoldResult`.

Honest out-of-fold predictions: for test fold k the remaining folds are split again,
stratified and grouped by patient, into a training part and an inner validation part.
Only the inner validation drives early stopping, the LR schedule and the checkpoint
choice; the test fold is predicted once, at the end, by the chosen checkpoint in eval mode.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import StratifiedGroupKFold
from tqdm import tqdm

from src.augment import augment_batch, build_augment
from src.config import Params, TrainParams
from src.distributed import Dist, unwrap, wrap
from src.errors import BoneHealthError, DataError
from src.fileio import atomic_path
from src.metrics import auc_score
from src.models import DEFAULT_NORMALIZATION, create_model, host_to_device, save_checkpoint, to_input
from src.store import PreparedStore

PREDICTIONS_FILE = "test_predictions.csv"
EpochCallback = Callable[[int, dict], None]


# ----------------------------------------------------------------------------- results
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


@dataclass
class Split:
    train: np.ndarray  # store row indices
    val: np.ndarray
    test: np.ndarray


# ----------------------------------------------------------------------------- device
def select_device(pref: str = "auto") -> torch.device:
    """auto: CUDA, then MPS, then CPU; an explicit choice that is not available is an error."""
    mps = getattr(torch.backends, "mps", None)
    has_mps = bool(mps and mps.is_available())
    if pref == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if has_mps else torch.device("cpu")
    if pref == "cuda" and not torch.cuda.is_available():
        raise BoneHealthError("train.device: 'cuda' requested but torch.cuda.is_available() is False; use auto or cpu")
    if pref == "mps" and not has_mps:
        raise BoneHealthError("train.device: 'mps' requested but this torch has no usable MPS backend; use auto or cpu")
    return torch.device(pref)


def amp_dtype(pref: str, device: torch.device) -> torch.dtype | None:
    """auto: bf16 on CUDA where supported (else fp16), off elsewhere (CPU autocast is slower here)."""
    if pref == "off":
        return None
    if pref == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if pref == "bf16" else torch.float16


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs this before its first call to be reproducible.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


# ----------------------------------------------------------------------------- splits
def inner_split(labels: np.ndarray, patients: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions (into the given arrays) of a stratified, patient-grouped (train, val) split.

    StratifiedGroupKFold with round(1 / val_fraction) splits, first split whose both parts
    hold every class (tiny data can produce a one-class part; a later split usually doesn't).
    """
    n_splits = max(2, int(round(1.0 / val_fraction)))
    n_groups = len(np.unique(patients))
    if n_groups < n_splits:
        raise DataError(f"train.val_fraction={val_fraction}: needs at least {n_splits} patients in the training folds, got {n_groups}")
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    classes = np.unique(labels)
    first = None
    with warnings.catch_warnings():
        # "The least populated class has only N members": expected on tiny toy sets.
        warnings.simplefilter("ignore", UserWarning)
        try:
            for train_pos, val_pos in splitter.split(np.zeros(len(labels)), labels, groups=patients):
                first = first or (train_pos, val_pos)
                if len(np.unique(labels[val_pos])) == len(classes) and len(np.unique(labels[train_pos])) == len(classes):
                    return np.sort(train_pos), np.sort(val_pos)
        except ValueError as exc:  # sklearn: more splits than members of a class
            raise DataError(f"train.val_fraction={val_fraction}: the training folds are too small for a "
                            f"{n_splits}-way stratified patient split ({exc})") from None
    return np.sort(first[0]), np.sort(first[1])


def fold_split(store: PreparedStore, fold: int, val_fraction: float, seed: int) -> Split:
    """Test fold k, and the other folds split into training and inner validation parts."""
    if not 0 <= fold < store.n_folds:
        raise BoneHealthError(f"fold {fold} is out of range: {store.root} has folds 0..{store.n_folds - 1}")
    test = store.indices_of_fold(fold)
    rest = store.indices_not_in_fold(fold)
    if len(test) == 0 or len(rest) == 0:
        raise DataError(f"{store.root}: fold {fold} leaves an empty test or training set")
    tr, va = inner_split(store.labels[rest], store.patients[rest], val_fraction, seed)
    return Split(train=rest[tr], val=rest[va], test=test)


# ----------------------------------------------------------------------------- data
def input_size(cfg: TrainParams, store: PreparedStore) -> list[int]:
    """[h, w] fed to the network: the prepared size, or train.image_size as the height with
    the width keeping the prepared aspect ratio (crops stay square, full images stay wide)."""
    h, w = (int(v) for v in store.meta["size"])
    if cfg.image_size is None:
        return [h, w]
    s = int(cfg.image_size)
    return [s, max(1, int(round(w * s / h)))]


def checkpoint_meta(params: Params, store: PreparedStore, fold: int | None) -> dict[str, Any]:
    """Everything inference needs to rebuild the network and its input (docs/ARCHITECTURE.md)."""
    cfg = params.train
    keep = ("mode", "size", "dtype", "preprocessing", "data_root", "manifest_sha256")
    return {
        "model": cfg.model,
        "in_chans": cfg.in_chans,
        "num_classes": len(store.classes),
        "classes": store.classes,
        "positive_class": store.positive_class,
        "input_size": input_size(cfg, store),
        "normalization": dict(DEFAULT_NORMALIZATION),
        "preprocessing": {k: store.meta[k] for k in keep if k in store.meta},
        "fold": fold,
        "drop_rate": cfg.drop_rate,
    }


class BatchSource:
    """Batches straight from the memmapped store: an index array in, (images, labels) out."""

    def __init__(self, store: PreparedStore, transform=None):
        self.images = store.images
        self.labels = store.labels
        self.transform = transform

    def __call__(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = np.sort(rows)  # ascending reads are kinder to the page cache
        batch = np.asarray(self.images[rows])
        if self.transform is not None:
            batch = augment_batch(self.transform, batch)
        return batch, self.labels[rows]


def epoch_order(rows: np.ndarray, labels: np.ndarray, balance: str, rng: np.random.Generator) -> np.ndarray:
    """One epoch's sample order: a permutation, or a class-balanced draw with replacement."""
    if balance == "sampler":
        counts = np.bincount(labels[rows])
        weights = 1.0 / counts[labels[rows]]
        return rng.choice(rows, size=len(rows), replace=True, p=weights / weights.sum())
    return rng.permutation(rows)


def batches_of(order: np.ndarray, batch_size: int, world: int = 1) -> Iterator[np.ndarray]:
    """Global batches; a short last one is dropped when some process would get under one image
    (or BatchNorm a single sample): one dropped image per epoch is harmless."""
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        if len(chunk) >= max(2, world) or start == 0:
            yield chunk


def _worker_init(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    source = info.dataset.source
    if source.transform is not None:
        source.transform.set_random_seed(int(torch.initial_seed() % 2**31))


class _BatchDataset(torch.utils.data.Dataset):
    """Lets a DataLoader with workers prefetch whole batches (train.num_workers > 0)."""

    def __init__(self, source: BatchSource, chunks: list[np.ndarray]):
        self.source, self.chunks = source, chunks

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int):
        return self.source(self.chunks[i])


def _as_is(batch):
    return batch


def iterate(source: BatchSource, chunks: list[np.ndarray], num_workers: int, seed: int) -> Iterator:
    if num_workers <= 0:
        return (source(c) for c in chunks)
    gen = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(
        _BatchDataset(source, chunks), batch_size=None, shuffle=False, num_workers=num_workers,
        worker_init_fn=_worker_init, generator=gen, collate_fn=_as_is,
    )
    return iter(loader)


# ----------------------------------------------------------------------------- optimisation
OPTIMIZERS: dict[str, Callable[[Any, TrainParams], torch.optim.Optimizer]] = {
    "adam": lambda p, c: torch.optim.Adam(p, lr=c.lr, weight_decay=c.weight_decay),
    "adamw": lambda p, c: torch.optim.AdamW(p, lr=c.lr, weight_decay=c.weight_decay),
    "sgd": lambda p, c: torch.optim.SGD(p, lr=c.lr, weight_decay=c.weight_decay, momentum=c.momentum,
                                        nesterov=c.momentum > 0),
}


class Schedule:
    """LR schedule behind one interface: `step_batch()` after each optimiser step,
    `step_epoch(val_loss)` after each validation."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: TrainParams, steps_per_epoch: int):
        self.kind = cfg.scheduler
        self.sched = None
        if self.kind == "plateau":
            # The lab's ReduceLROnPlateau x0.1, patience 5, on the (inner) validation loss.
            self.sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="min", factor=cfg.plateau_factor, patience=cfg.plateau_patience)
        elif self.kind == "cosine":
            warm = cfg.warmup_epochs * steps_per_epoch
            total = max(1, cfg.epochs * steps_per_epoch)

            def factor(step: int) -> float:
                if step < warm:
                    return (step + 1) / warm
                progress = min(1.0, (step - warm) / max(1, total - warm))
                return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * progress))

            self.sched = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    def step_batch(self) -> None:
        if self.kind == "cosine":
            self.sched.step()

    def step_epoch(self, val_loss: float) -> None:
        if self.kind == "plateau" and not math.isnan(val_loss):
            self.sched.step(val_loss)


def class_weights(labels: np.ndarray, n_classes: int) -> torch.Tensor:
    """Inverse-frequency weights, mean 1 over samples (sklearn's 'balanced')."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    weights = np.where(counts > 0, len(labels) / (n_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


# ----------------------------------------------------------------------------- loops
@dataclass
class Engine:
    """The pieces one optimisation step needs; also used by benchmarks/bench_train.py.

    `model` is what trains (DistributedDataParallel-wrapped under torchrun); `net` is the
    network inside it.  The criterion sums over the images it sees and `train_step` divides
    by the global batch's normaliser, so a step is the same for any number of processes.
    """
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    criterion: torch.nn.Module
    meta: dict[str, Any]
    device: torch.device
    amp: torch.dtype | None
    channels_last: bool
    grad_clip: float | None = None
    scaler: Any = None
    ema: Any = None      # timm ModelEmaV3: averaged weights used for validation, checkpoint and test
    dist: Dist = field(default_factory=Dist)
    class_weight: np.ndarray | None = None  # host copy of the criterion's weights, for the normaliser
    steps: int = 0

    @property
    def net(self) -> torch.nn.Module:
        return unwrap(self.model)

    @property
    def eval_model(self) -> torch.nn.Module:
        return self.ema.module if self.ema is not None else self.net

    def loss_denominator(self, labels: np.ndarray) -> float:
        """What the criterion's 'mean' divides by: the batch size, or its summed class weights."""
        if self.class_weight is None:
            return float(len(labels))
        return float(self.class_weight[np.asarray(labels, dtype=np.int64)].sum())

    def to_tensor(self, images: np.ndarray) -> torch.Tensor:
        return to_input(images, self.meta, device=self.device, channels_last=self.channels_last)

    def train_step(self, images: np.ndarray, labels: np.ndarray, denominator: float | None = None) -> torch.Tensor:
        """One step on this process's `images`; `denominator` is the global batch's
        `loss_denominator` (default: these labels').  Returns this process's share of the
        global batch's mean loss (the shares of all processes add up to it) as a 0-d tensor
        on the device: reading it is a GPU sync, so callers do that once in a while."""
        x = self.to_tensor(images)
        y = host_to_device(np.asarray(labels, dtype=np.int64), self.device)
        denom = denominator if denominator is not None else self.loss_denominator(labels)
        self.optimizer.zero_grad(set_to_none=True)
        with autocast_context(self.device, self.amp):
            share = self.criterion(self.model(x).float(), y) / denom
        # DDP averages gradients over processes; scaling by their number turns that into the sum.
        loss = share * self.dist.world
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if self.grad_clip:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            if self.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            self.optimizer.step()
        self.steps += 1
        if self.ema is not None:
            self.ema.update(self.net, step=self.steps)
        return share.detach()

    @torch.no_grad()
    def predict(self, images: np.ndarray, batch_size: int) -> np.ndarray:
        """Softmax probabilities of the evaluated (EMA, if on) model in eval mode (N, classes), float64."""
        model = self.eval_model
        model.eval()
        out = []
        for start in range(0, len(images), batch_size):
            x = self.to_tensor(np.asarray(images[start:start + batch_size]))
            with autocast_context(self.device, self.amp):
                logits = model(x)
            out.append(torch.softmax(logits.float(), dim=1).cpu().numpy().astype(np.float64))
        return np.concatenate(out) if out else np.zeros((0, int(self.meta["num_classes"])))


def reset_head(model: torch.nn.Module, std: float = 0.01) -> None:
    """Start the classifier near zero so the first predictions are ~uniform.

    timm's EfficientNet initialises the head uniformly in +-1/sqrt(num_classes): fine for
    1000 classes, but with two it gives train-mode logits of +-5 and a first-epoch loss of
    3-6 that wrecks the early BatchNorm statistics.  The head is always new here (timm drops
    a pretrained head of another size), so this costs pretrained users nothing.
    """
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(head, torch.nn.Linear):
        torch.nn.init.normal_(head.weight, std=std)
        torch.nn.init.zeros_(head.bias)


def build_engine(cfg: TrainParams, meta: dict[str, Any], device: torch.device, train_labels: np.ndarray,
                 ctx: Dist | None = None) -> Engine:
    ctx = ctx or Dist()
    n_classes = int(meta["num_classes"])
    model = create_model(cfg.model, num_classes=n_classes, in_chans=cfg.in_chans, pretrained=cfg.pretrained,
                         weights=cfg.weights, drop_rate=cfg.drop_rate).to(device)
    reset_head(model)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    weight = class_weights(train_labels, n_classes) if cfg.class_balance == "weights" else None
    dtype = amp_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type) if (dtype == torch.float16 and device.type == "cuda") else None
    ema = None
    if cfg.ema_decay:
        from timm.utils import ModelEmaV3

        # Warm-up ramp (decay 1 - (1 + step)^-2/3, capped at ema_decay): a CPU run has only a
        # few hundred steps, so a fixed 0.99 would still average in the random initialisation.
        ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True)
    # DDP broadcasts rank 0's initial weights, so every process starts from the same network.
    model = wrap(model, ctx, device, cfg.sync_bn)
    return Engine(
        model=model, optimizer=OPTIMIZERS[cfg.optimizer](model.parameters(), cfg),
        criterion=torch.nn.CrossEntropyLoss(weight=None if weight is None else weight.to(device),
                                            label_smoothing=cfg.label_smoothing, reduction="sum"),
        meta=meta, device=device, amp=dtype, channels_last=cfg.channels_last,
        grad_clip=cfg.grad_clip, scaler=scaler, ema=ema, dist=ctx,
        class_weight=None if weight is None else weight.numpy().astype(np.float64),
    )


def run_epoch(engine: Engine, source: BatchSource, chunks: list[np.ndarray], *, num_workers: int = 0,
              seed: int = 0, schedule: Schedule | None = None, desc: str = "train") -> tuple[float, float]:
    """One pass over the global batches `chunks` in train mode (each process takes its shard of
    every batch); returns (mean loss over all processes, images per second over all processes)."""
    engine.model.train()
    ctx = engine.dist
    labels_all = source.labels
    shards = [ctx.shard(c) for c in chunks]
    total = torch.zeros((), device=engine.device)  # float32: MPS has no float64
    seen = 0
    start = time.perf_counter()
    bar = tqdm(total=sum(len(c) for c in chunks), desc=desc, unit="img", leave=False, file=sys.stderr,
               dynamic_ncols=True, mininterval=1.0, disable=not ctx.is_main)
    try:
        for step, (chunk, (images, labels)) in enumerate(zip(chunks, iterate(source, shards, num_workers, seed))):
            share = engine.train_step(images, labels, engine.loss_denominator(labels_all[chunk]))
            if schedule is not None:
                schedule.step_batch()
            total += share * len(chunk)
            seen += len(chunk)
            bar.update(len(chunk))
            if not bar.disable and step % 25 == 0:  # the loss read syncs the GPU: not every step
                elapsed = time.perf_counter() - start
                bar.set_postfix(loss=f"{float(total) / seen:.4f}", img_s=f"{seen / max(elapsed, 1e-9):.1f}",
                                refresh=False)
    finally:
        bar.close()
    total = ctx.sum(float(total), engine.device)
    elapsed = time.perf_counter() - start
    return total / max(seen, 1), seen / max(elapsed, 1e-9)


def _val_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    """Plain (unweighted, unsmoothed) cross-entropy, comparable across configurations."""
    if len(labels) == 0:
        return float("nan")
    p = np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0)
    return float(-np.mean(np.log(p)))


def _better(auc: float, loss: float, best: tuple[float, float] | None) -> bool:
    """Checkpoint criterion: higher inner-val AUC; equal AUC (it saturates on small sets) -> lower loss."""
    if best is None:
        return True
    a = -math.inf if math.isnan(auc) else auc
    b = -math.inf if math.isnan(best[0]) else best[0]
    if a != b:
        return a > b
    return (loss if not math.isnan(loss) else math.inf) < best[1]


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


def _fit(params: Params, store: PreparedStore, meta: dict[str, Any], train_rows: np.ndarray, val_rows: np.ndarray,
         seed: int, label: str, device, epoch_callback: EpochCallback | None, ctx: Dist) -> _Fit:
    """The epoch loop; leaves the chosen weights loaded in the returned engine's model.

    With validation rows the best epoch (inner-val AUC, then loss) is chosen and early
    stopping applies; without them (all-data refit) the last epoch is kept.  Under torchrun
    rank 0 validates and the others follow its figures, so every rank stops together.
    """
    cfg = params.train
    device = torch.device(device) if device is not None else select_device(cfg.device)
    if cfg.batch_size < ctx.world:
        raise BoneHealthError(f"train.batch_size={cfg.batch_size} is the global batch: it needs at least one "
                              f"image per process ({ctx.world} processes)")
    if cfg.threads:
        # Fewer threads than cores wins when other processes share the CPU: OpenMP workers
        # spin-wait, and a 2-thread step on a busy 2-core machine ran ~5x slower than 1 thread.
        torch.set_num_threads(cfg.threads)
    seed_everything(seed, cfg.deterministic)
    labels = store.labels
    if len(np.unique(labels[train_rows])) < len(store.classes):
        raise DataError(f"{store.root}: the training part of {label} lacks a class; need more patients per class")

    engine = build_engine(cfg, meta, device, labels[train_rows], ctx)
    if ctx.active:
        # Same initial weights everywhere (above), but each rank its own dropout masks.
        torch.manual_seed(seed + 1_000_003 * ctx.rank)
    schedule = Schedule(engine.optimizer, cfg, max(1, sum(1 for _ in batches_of(train_rows, cfg.batch_size, ctx.world))))
    source = BatchSource(store, build_augment(cfg.augment, seed=seed + 7919 * ctx.rank))
    val_images, val_labels = store.images[val_rows], labels[val_rows]
    rng = np.random.default_rng(seed)

    history: list[dict] = []
    best: tuple[float, float] | None = None
    best_state: dict[str, torch.Tensor] | None = None
    best_epoch, stale = 0, 0
    for epoch in range(1, cfg.epochs + 1):
        lr = float(engine.optimizer.param_groups[0]["lr"])
        chunks = list(batches_of(epoch_order(train_rows, labels, cfg.class_balance, rng), cfg.batch_size, ctx.world))
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
        improved = _better(val_auc, val_loss, best) if len(val_rows) else True
        if improved:
            best, best_epoch, stale = (val_auc, val_loss), epoch, 0
            if len(val_rows) and ctx.is_main:  # without validation the last epoch wins: no copy needed
                best_state = copy.deepcopy({k: v.detach().to("cpu") for k, v in engine.eval_model.state_dict().items()})
        else:
            stale += 1
        if ctx.is_main:
            print(f"{label} epoch {epoch}/{cfg.epochs}: train_loss {train_loss:.4f} val_loss {val_loss:.4f} "
                  f"val_auc {val_auc:.4f} lr {lr:.2e} {speed:.1f} img/s{' *' if improved and len(val_rows) else ''}",
                  file=sys.stderr, flush=True)
            if epoch_callback is not None:
                epoch_callback(epoch, dict(record))
        if len(val_rows) and cfg.early_stopping_patience and stale >= cfg.early_stopping_patience:
            break
    if best_state is not None:
        engine.eval_model.load_state_dict(best_state)
    return _Fit(history=history, best_epoch=best_epoch, best_val_auc=float(best[0]), engine=engine)


def train_fold(params: Params, store: PreparedStore, fold: int, out_dir: Path, *,
               epoch_callback: EpochCallback | None = None, device=None,
               extra_meta: dict[str, Any] | None = None, ctx: Dist | None = None) -> FoldResult:
    """Train on fold `fold`'s training part, select on its inner validation part, predict its
    test fold once; writes test_predictions.csv, model.pt and meta.json (last) into out_dir.

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
    fit = _fit(params, store, meta, split.train, split.val, cfg.seed + fold, f"fold {fold}", device, epoch_callback,
               ctx)

    test_rows = split.test if ctx.is_main else split.test[:0]
    test_probs = fit.engine.predict(store.images[test_rows], cfg.batch_size * 2)
    predictions = predictions_frame(store, test_rows, test_probs)
    meta.update({"best_epoch": fit.best_epoch, "val_auc": fit.best_val_auc, "world_size": ctx.world,
                 **(extra_meta or {})})
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(out_dir / PREDICTIONS_FILE) as tmp:
            predictions.to_csv(tmp, index=False)
        save_checkpoint(out_dir, fit.engine.eval_model, meta)  # meta.json written last marks the folder complete
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
    meta.update({"best_epoch": fit.best_epoch, "val_auc": None, "trained_on": "all", "world_size": ctx.world,
                 **(extra_meta or {})})
    if ctx.is_main:
        save_checkpoint(out_dir, fit.engine.eval_model, meta)
    empty = predictions_frame(store, rows[:0], np.zeros((0, len(store.classes))))
    return FoldResult(
        fold=-1, history=fit.history, best_epoch=fit.best_epoch, best_val_auc=float("nan"),
        test_predictions=empty, checkpoint_dir=out_dir, seconds=time.perf_counter() - started,
        split_sizes={"train": len(rows), "val": 0, "test": 0},
    )
