"""The warm-up cosine learning-rate schedule, alone in its module: the localiser (src.localise)
uses it too, without importing the classifier's training engine and its settings."""
from __future__ import annotations

import math

import torch


def warmup_cosine(optimizer: torch.optim.Optimizer, warm: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warm` steps, then cosine down to 1% of the LR at step `total`;
    stepped once per optimiser step (also the localiser's schedule)."""
    total = max(1, total)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
