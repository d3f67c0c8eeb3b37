"""Training batches straight from the memmapped prepared store: an epoch's order, its global
batches, augmentation of the training part, and optional loader workers that prefetch."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from src.artifacts.store import PreparedStore
from src.data.augment import augment_batch


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


def batches_of(order: np.ndarray, batch_size: int, world: int = 1, fixed_shape: bool = False) -> Iterator[np.ndarray]:
    """Global batches; a short last one is dropped when some process would get under one image
    (or BatchNorm a single sample): one dropped image per epoch is harmless.  fixed_shape drops
    any short last batch (GPU: cudnn.benchmark tunes its kernels per input shape, and a new
    shape at every epoch's end would tune them again); the epoch's order is reshuffled, so no
    image is left out for good."""
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        if start == 0 or (len(chunk) >= max(2, world) and (len(chunk) == batch_size or not fixed_shape)):
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


