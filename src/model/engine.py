"""One optimisation step and one epoch: the network, optimiser, LR schedule, loss and EMA that
every way of training shares (one fold, the all-data refit, DDP ranks, tuning trials and
benchmarks/bench_train.py)."""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3
from tqdm import tqdm

from src.artifacts.checkpoint import CheckpointMeta
from src.core.config import TrainParams
from src.core.runtime import amp_dtype, autocast_context
from src.data.augment import build_augment
from src.data.batches import BatchSource, iterate
from src.data.device_augment import DeviceAugment, build_device_augment
from src.model.distributed import Dist, unwrap, wrap
from src.model.factory import (
    create_model,
    host_to_device,
    normalise_input,
    reset_head,
    to_input,
    to_unit,
)
from src.model.prefetch import Prefetched, prefetch
from src.model.schedules import warmup_cosine


# ----------------------------------------------------------------------------- optimisation
def build_optimizer(params, cfg: TrainParams) -> torch.optim.Optimizer:
    """timm's optimizer factory by the name in train.optimizer.  The parameters go in as a list,
    not the module, so timm makes no bias/norm groups: weight decay applies to every parameter,
    as in the lab's runs.  SGD is Nesterov with momentum, plain without (timm's 'momentum')."""
    name = cfg.optimizer
    if name == "sgd" and cfg.momentum == 0:
        name = "momentum"
    return create_optimizer_v2(list(params), opt=name, lr=cfg.lr, weight_decay=cfg.weight_decay,
                               momentum=cfg.momentum)


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
            self.sched = warmup_cosine(optimizer, cfg.warmup_epochs * steps_per_epoch, cfg.epochs * steps_per_epoch)

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
    meta: CheckpointMeta
    device: torch.device
    amp: torch.dtype | None
    channels_last: bool
    grad_clip: float | None = None
    scaler: Any = None
    ema: Any = None      # timm ModelEmaV3: averaged weights used for validation, checkpoint and test
    dist: Dist = field(default_factory=Dist)
    class_weight: np.ndarray | None = None  # host copy of the criterion's weights, for the normaliser
    steps: int = 0
    augment: DeviceAugment | None = None   # train.augment on the device (runs_on), else None
    augment_generator: torch.Generator | None = None

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

    def train_input(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """A training batch as the network's input, augmented here when train.augment runs on
        the device (a host batch was augmented on the CPU already)."""
        x = to_unit(images, self.device)
        if self.augment is not None:
            x = self.augment(x, self.augment_generator)
        return normalise_input(x, self.meta, self.channels_last)

    def train_step(self, images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor,
                   denominator: float | None = None) -> torch.Tensor:
        """One step on this process's `images` (a host batch, or tensors already on the device);
        `denominator` is the global batch's `loss_denominator` (default: these labels').
        Returns this process's share of the global batch's mean loss (the shares of all
        processes add up to it) as a 0-d tensor on the device: reading it is a GPU sync, so
        callers do that once in a while."""
        x = self.train_input(images)
        if isinstance(labels, torch.Tensor):
            y = labels.to(self.device, non_blocking=True)
            labels = labels.cpu().numpy() if denominator is None else labels
        else:
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
        return np.concatenate(out) if out else np.zeros((0, self.meta.num_classes))


EMA_AUTO_SHARE = 0.1      # ema_decay auto: the average spans ~this share of the run's optimiser steps
EMA_AUTO_MIN_STEPS = 50   # ... and is off below this many steps (a time constant under 5 steps averages nothing)


def ema_decay_for(cfg: TrainParams, total_steps: int | None) -> float | None:
    """The EMA decay one run uses: train.ema_decay, or for `auto` 1 - 1/tau with tau a tenth of
    the run's optimiser steps.  A fixed 0.99 (tau 100 steps) spans half of a 200-step CPU run,
    so its checkpoints still carry the early weights; 0.9999 on a long GPU run would do the same."""
    if cfg.ema_decay != "auto":
        return cfg.ema_decay
    if not total_steps or total_steps < EMA_AUTO_MIN_STEPS:
        return None
    return 1.0 - 1.0 / (EMA_AUTO_SHARE * total_steps)


def build_engine(cfg: TrainParams, meta: CheckpointMeta, device: torch.device, train_labels: np.ndarray,
                 ctx: Dist | None = None, total_steps: int | None = None) -> Engine:
    """`total_steps` (optimiser steps of the whole run) sizes `ema_decay: auto`."""
    ctx = ctx or Dist()
    n_classes = meta.num_classes
    model = create_model(cfg.model, num_classes=n_classes, in_chans=cfg.in_chans, pretrained=cfg.pretrained,
                         weights=cfg.weights, drop_rate=cfg.drop_rate).to(device)
    reset_head(model)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    weight = class_weights(train_labels, n_classes) if cfg.class_balance == "weights" else None
    dtype = amp_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type) if (dtype == torch.float16 and device.type == "cuda") else None
    ema = None
    decay = ema_decay_for(cfg, total_steps)
    if decay:
        # Warm-up ramp (decay 1 - (1 + step)^-2/3, capped at the decay): without it the first
        # hundreds of steps would still average in the random initialisation.
        ema = ModelEmaV3(model, decay=decay, use_warmup=True)
    # DDP broadcasts rank 0's initial weights, so every process starts from the same network.
    model = wrap(model, ctx, device, cfg.sync_bn)
    if cfg.compile != "off":
        # The training forward/backward only: validation, EMA and checkpoints use the plain
        # network (Engine.net unwraps), so checkpoints carry no `_orig_mod.` prefixes.
        model = torch.compile(model, mode=None if cfg.compile == "default" else cfg.compile)
    return Engine(
        model=model, optimizer=build_optimizer(model.parameters(), cfg),
        criterion=torch.nn.CrossEntropyLoss(weight=None if weight is None else weight.to(device),
                                            label_smoothing=cfg.label_smoothing, reduction="sum"),
        meta=meta, device=device, amp=dtype, channels_last=cfg.channels_last,
        grad_clip=cfg.grad_clip, scaler=scaler, ema=ema, dist=ctx,
        class_weight=None if weight is None else weight.numpy().astype(np.float64),
    )


def augment_on_device(cfg: TrainParams, device: torch.device) -> bool:
    """Where train.augment runs: `auto` puts it on the GPU when training on one."""
    runs_on = cfg.augment.runs_on
    return runs_on == "device" or (runs_on == "auto" and torch.device(device).type == "cuda")


def attach_augmentation(engine: Engine, store, cfg: TrainParams, seed: int) -> BatchSource:
    """The training batches' source, with train.augment on the CPU (albumentations in the
    source) or on the device (in the engine, its generator seeded like the CPU path's)."""
    if augment_on_device(cfg, engine.device):
        engine.augment = build_device_augment(cfg.augment)
        engine.augment_generator = torch.Generator(device=engine.device).manual_seed(seed)
        return BatchSource(store, None)
    return BatchSource(store, build_augment(cfg.augment, seed=seed))


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
        # On a GPU the next batch crosses on a side stream while this one trains (src/model/prefetch.py).
        batches = prefetch(iterate(source, shards, num_workers, seed), engine.device)
        for step, (chunk, batch) in enumerate(zip(chunks, batches)):
            images, labels = (batch.images, batch.labels) if isinstance(batch, Prefetched) else batch
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


