"""Data-parallel training with torch.distributed: one process per device, launched by torchrun.

`torchrun --nproc_per_node N -m src.train` (or `train.devices: N`, which relaunches through
torchrun) runs N copies of the CV.  Every process draws the same epoch order from the same
seed; each global batch of `train.batch_size` images is split across the processes
(`rows[rank::world]`, a distributed sampler at batch granularity, which also keeps the
class-balanced sampler exact) and DistributedDataParallel averages the gradients.  The loss is
normalised by the global batch, so N processes take the same optimisation step as one process
with the same global batch (exactly for batch-independent layers; BatchNorm sees only its
process's shard unless `train.sync_bn` is on, which torch supports on CUDA only).

Rank 0 alone evaluates, writes checkpoints and predictions, and talks to MLflow; the others
receive its decisions (which folds to train, validation figures) by broadcast.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from src.core.errors import BoneHealthError
from src.core.redact import redact_url
from src.core.runtime import select_device

log = logging.getLogger(__name__)

# Set by torchrun for every worker; their presence is what "launched distributed" means.
_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class Dist:
    """This process's place in the job; `Dist()` is the plain single-process run."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def shard(self, rows):
        """This process's part of one global batch (all of it when alone)."""
        return rows[self.rank::self.world] if self.active else rows

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (pickled; for small decisions, not tensors)."""
        if not self.active:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum(self, value: float, device: torch.device) -> float:
        """Sum of a float over all ranks."""
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t.item())

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in _ENV) and int(os.environ["WORLD_SIZE"]) > 1


def setup(device_pref: str, timeout_s: int = 1800) -> tuple[Dist, torch.device]:
    """Join the process group torchrun prepared (if any); returns this rank and its device.

    NCCL on CUDA (one GPU per local rank), gloo on CPU.  A single process returns `Dist()`
    and the device `select_device` picks, without touching torch.distributed.
    """

    if not launched_by_torchrun():
        return Dist(), select_device(device_pref)
    rank, world, local = (int(os.environ[k]) for k in _ENV)
    device = select_device(device_pref)
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise BoneHealthError(f"train.devices: local rank {local} but only {torch.cuda.device_count()} CUDA "
                                  f"device(s) visible; lower --nproc_per_node / train.devices")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise BoneHealthError(f"train.device: data-parallel training needs cuda or cpu, not {device.type}")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return Dist(rank=rank, world=world, local_rank=local), device


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, ctx: Dist, device: torch.device, sync_bn: bool) -> torch.nn.Module:
    """DistributedDataParallel around `model` (SyncBatchNorm first when asked); as is when alone."""
    if not ctx.active:
        return model
    if sync_bn:
        model = sync_batchnorm(model)
    device_ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def sync_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """Every BatchNorm as its synchronised variant, activations kept.

    timm's converter, not torch's: timm EfficientNets use BatchNormAct2d (norm + activation in
    one module), which torch's converter turns into a bare SyncBatchNorm that never calls the
    activation it keeps as a child, silently removing the network's nonlinearities.
    """
    from timm.layers import convert_sync_batchnorm

    return convert_sync_batchnorm(model)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The network inside torch.compile's and DistributedDataParallel's wrappers."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def relaunch_command(devices: int, module: str, argv: list[str]) -> list[str]:
    """`python -m torch.distributed.run --standalone --nproc_per_node N -m module argv...`."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={devices}",
            "-m", module, *argv]


def relaunch(devices: int, module: str, argv: list[str]) -> int:
    """Run `module` under torchrun with `devices` processes; returns torchrun's exit status.

    Used when `train.devices > 1` and this process was not started by torchrun, so that
    `python -m src.train` (and the DVC stage) needs no launcher of its own.
    """
    cmd = relaunch_command(devices, module, argv)
    log.info("train.devices=%d: relaunching under torchrun: python %s", devices, redact_url(" ".join(cmd[1:])))
    return subprocess.run(cmd, check=False).returncode
