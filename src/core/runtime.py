"""Where and how torch runs: device choice, mixed precision, seeding, thread count."""
from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch

from src.core.errors import BoneHealthError


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




def set_threads(threads: int | None) -> None:
    """Fewer threads than cores wins when other processes share the CPU: OpenMP workers
    spin-wait, and a 2-thread step on a busy 2-core machine ran ~5x slower than 1 thread."""
    if threads:
        torch.set_num_threads(threads)
