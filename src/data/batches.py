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

    def __getstate__(self):
        # a loader process gets the source, never the loader that feeds it (spawn pickles)
        return {k: v for k, v in self.__dict__.items() if k != "_loader"}

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


class _RowsDataset(torch.utils.data.Dataset):
    """Indexed by a batch's row array (the sampler below hands whole batches to the workers)."""

    def __init__(self, source: BatchSource):
        self.source = source

    def __getitem__(self, rows: np.ndarray):
        return self.source(rows)


class _EpochChunks(torch.utils.data.Sampler):
    """The current epoch's batches.  The sampler runs in the training process, so the list can
    change between epochs while the workers (which only receive row arrays) stay alive."""

    def __init__(self):
        self.chunks: list[np.ndarray] = []

    def __iter__(self):
        return iter(self.chunks)

    def __len__(self) -> int:
        return len(self.chunks)


def _as_is(batch):
    return batch


def iterate(source: BatchSource, chunks: list[np.ndarray], num_workers: int, seed: int) -> Iterator:
    """The batches `chunks`, read (and augmented) here, or by `num_workers` loader processes that
    start with the first epoch and persist across epochs (persistent_workers: no fork, import and
    memmap reopen per epoch).  The workers' augmentation streams are seeded once, from `seed` of
    that first epoch, and go on from there."""
    if num_workers <= 0:
        return (source(c) for c in chunks)
    loader = getattr(source, "_loader", None)
    if loader is None or loader.num_workers != num_workers:
        gen = torch.Generator().manual_seed(seed)
        loader = torch.utils.data.DataLoader(
            _RowsDataset(source), batch_size=None, sampler=_EpochChunks(), num_workers=num_workers,
            persistent_workers=True, worker_init_fn=_worker_init, generator=gen, collate_fn=_as_is,
        )
        source._loader = loader
    loader.sampler.chunks = list(chunks)
    return iter(loader)
