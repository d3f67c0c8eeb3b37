"""The CUDA path: AMP, channels_last, checkpoints that load on CPU, fold workers on GPUs.

Skipped where torch sees no CUDA device (CI, the 2-core dev box); run on a GPU machine by
benchmarks/gpu_check.sh together with the GPU throughput benchmark.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from src.artifacts.store import PreparedStore
from src.core.runtime import amp_dtype, select_device
from src.model.cross_validation import run_cv
from src.model.factory import load_checkpoint, predict_proba
from src.model.fit import train_fold
from tests.train_helpers import make_tiny_store, tiny_params

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch")


def test_auto_device_and_amp_pick_cuda_and_a_half_precision():
    device = select_device("auto")
    assert device.type == "cuda"
    assert amp_dtype("auto", device) in (torch.bfloat16, torch.float16)


@pytest.mark.parametrize("amp", ["auto", "fp16"])
def test_fold_trains_with_amp_and_its_checkpoint_predicts_alike_on_cpu(tmp_path, amp):
    root = make_tiny_store(tmp_path / "s", n_per_class=10, folds=2, size=64)
    params = tiny_params(tmp_path, root, device="cuda", amp=amp, channels_last=True, epochs=3, threads=None)
    store = PreparedStore.open(root)
    res = train_fold(params, store, 0, tmp_path / "fold")
    assert all(np.isfinite(r["train_loss"]) for r in res.history)
    model, meta = load_checkpoint(tmp_path / "fold", device="cpu")
    test = res.test_predictions
    cpu = predict_proba(model, store.images[test["index"].to_numpy()], meta, device="cpu")
    # The GPU predicted under autocast (half precision), the CPU in float32.
    np.testing.assert_allclose(cpu[:, 1], test["prob_C3"].to_numpy(), atol=2e-2)


def test_fold_parallel_puts_workers_on_gpus(tmp_path):
    root = make_tiny_store(tmp_path / "s", n_per_class=9, folds=3, size=64)
    params = tiny_params(tmp_path, root, device="cuda", epochs=2, fold_parallel=2, threads=None)
    cv = run_cv(params)
    assert cv.status == "FINISHED" and len(cv.fold_run_ids) == 3
    preds = pd.concat([pd.read_csv(tmp_path / "models" / f"fold_{k}" / "test_predictions.csv") for k in range(3)])
    assert sorted(preds["index"]) == list(range(18))


def test_device_augmentation_on_cuda_matches_the_same_draw_on_cpu():
    from src.core.config import AugmentParams
    from src.data.device_augment import DeviceAugment

    aug = DeviceAugment(AugmentParams(strength=1.0, hflip=0.5, clahe=0.5, blur=0.5))
    x = torch.rand(16, 1, 64, 64)
    draw = aug.sample(16, (64, 64), torch.Generator().manual_seed(0))
    on_gpu = type(draw)(**{k: v.cuda() for k, v in draw.to_dict().items()})
    draw.noise[:] = False  # the noise itself comes from the device's generator
    on_gpu.noise[:] = False
    torch.testing.assert_close(aug.apply(x.cuda(), on_gpu).cpu(), aug.apply(x, draw), atol=2e-3, rtol=0)


def test_prefetch_copies_every_batch_in_order_onto_the_gpu():
    from src.model.prefetch import Prefetched, prefetch

    batches = [(np.full((4, 8, 8), i, np.uint8), np.array([0, 1, 0, i % 2])) for i in range(5)]
    out = list(prefetch(iter(batches), torch.device("cuda")))
    assert all(isinstance(b, Prefetched) and b.images.is_cuda for b in out)
    assert [int(b.images[0, 0, 0]) for b in out] == list(range(5))
    assert [int(b.labels[3]) for b in out] == [i % 2 for i in range(5)]


def test_a_fold_on_cuda_augments_on_the_gpu(tmp_path):
    from src.model.engine import attach_augmentation, build_engine
    from src.model.fit import checkpoint_meta

    root = make_tiny_store(tmp_path / "s", n_per_class=10, folds=2, size=64)
    params = tiny_params(tmp_path, root, device="cuda", epochs=2, threads=None)
    store = PreparedStore.open(root)
    engine = build_engine(params.train, checkpoint_meta(params, store, fold=0), torch.device("cuda"), store.labels)
    assert attach_augmentation(engine, store, params.train, seed=0).transform is None and engine.augment is not None
    res = train_fold(params, store, 0, tmp_path / "fold")
    assert all(np.isfinite(r["train_loss"]) for r in res.history)


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_a_fold_trains_compiled_and_its_checkpoint_loads_plain(tmp_path, mode):
    root = make_tiny_store(tmp_path / "s", n_per_class=10, folds=2, size=64)
    params = tiny_params(tmp_path, root, device="cuda", epochs=2, threads=None, compile=mode)
    store = PreparedStore.open(root)
    res = train_fold(params, store, 0, tmp_path / "fold")
    assert all(np.isfinite(r["train_loss"]) for r in res.history)
    load_checkpoint(tmp_path / "fold", device="cpu")  # plain keys: loads into an uncompiled network
