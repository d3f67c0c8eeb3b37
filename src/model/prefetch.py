"""Batches onto the device one step ahead (timm's PrefetchLoader idea): while the GPU trains
on batch k, batch k+1 is copied from pinned host memory on a side stream, so the copy never
waits behind the step's kernels and the step never waits for the copy.  On a CPU the batches
pass through as they are.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
import torch

from src.model.factory import host_to_device


class Prefetched:
    """A batch already on the device: uint8/float images as a tensor (N, H, W), labels (N,) int64,
    and the host labels (the loss normaliser is computed on the host, without a sync)."""

    __slots__ = ("images", "labels", "host_labels")

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, host_labels: np.ndarray):
        self.images, self.labels, self.host_labels = images, labels, host_labels


def prefetch(batches: Iterable[tuple[np.ndarray, np.ndarray]], device: torch.device) -> Iterator:
    """(images, labels) host batches -> the same batches, on CUDA as `Prefetched` copied one
    ahead on a side stream; elsewhere unchanged."""
    device = torch.device(device)
    if device.type != "cuda":
        yield from batches
        return
    stream = torch.cuda.Stream(device=device)
    pending: Prefetched | None = None
    for images, labels in batches:
        host_labels = np.asarray(labels, dtype=np.int64)
        images = np.asarray(images)
        with torch.cuda.stream(stream):  # host_to_device: pinned, non-blocking, on this side stream
            ready = Prefetched(host_to_device(images.astype(np.int32) if images.dtype == np.uint16 else images, device),
                               host_to_device(host_labels, device), host_labels)
        if pending is not None:
            yield pending
        # The consumer's stream waits for this copy before it touches the tensors, and the
        # caching allocator learns that the tensors are used there (not freed under it).
        torch.cuda.current_stream(device).wait_stream(stream)
        ready.images.record_stream(torch.cuda.current_stream(device))
        ready.labels.record_stream(torch.cuda.current_stream(device))
        pending = ready
    if pending is not None:
        yield pending
