"""Augmentation on the device against the albumentations path it stands in for: the same
parameter distributions (draw for draw, from albumentations' own applied parameters), the same
output statistics on a radiograph-like crop, and the pieces (flips, blur, CLAHE) against
their reference implementations.  CPU tensors: the same code runs on CUDA."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp, wasserstein_distance

from src.core.config import AugmentParams
from src.data.augment import augment_batch, build_augment
from src.data.device_augment import (
    DeviceAugment,
    build_device_augment,
    clahe,
    gaussian_blur,
)

N = 600  # draws per path: a KS test then tells apart shifts of ~0.1 standard deviations
EVERYTHING = AugmentParams(strength=1.0, vflip=0.5, hflip=0.5, rotate_limit=10.0, affine=0.5,
                           brightness_contrast=0.5, gamma=0.3, clahe=0.3, noise=0.2, blur=0.3)


def crop(size: int = 48, seed: int = 0) -> np.ndarray:
    """A radiograph-like crop: a bright oblique band (the cortex) over a gradient, with texture."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    img = 0.25 + 0.3 * xx / size + 0.05 * rng.standard_normal((size, size))
    img[np.abs(yy - 0.6 * size - 0.2 * (xx - size / 2)) < size / 12] += 0.4
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def albumentations_draws(cfg: AugmentParams, image: np.ndarray, n: int) -> dict[str, list]:
    """The parameters albumentations applied, per transform, over n calls (one Compose, seeded)."""
    import albumentations as A

    build_augment(cfg)  # sets albumentations' offline defaults first
    compose = build_augment(cfg, seed=0)
    replay = A.Compose(list(compose.transforms), seed=0, save_applied_params=True)
    out: dict[str, list] = {}
    for _ in range(n):
        for name, params in replay(image=image)["applied_transforms"]:
            out.setdefault(name, []).append(params)
    return out


def kernel_sigma(kernel: np.ndarray) -> float:
    """Sigma of a normalised 1-D Gaussian kernel, from its centre and first neighbour."""
    c = len(kernel) // 2
    return float(np.sqrt(-0.5 / np.log(kernel[c + 1] / kernel[c])))


def rate_matches(k: int, n: int, p: float) -> bool:
    """k successes of n consistent with probability p (4 standard errors)."""
    return abs(k / n - p) <= 4 * np.sqrt(max(p * (1 - p), 1e-9) / n) + 1e-9


def test_every_draw_follows_albumentations_distributions():
    image = crop()
    alb = albumentations_draws(EVERYTHING, image, N)
    aug = DeviceAugment(EVERYTHING)
    draw = {k: v.numpy() for k, v in aug.sample(N, image.shape, torch.Generator().manual_seed(0)).to_dict().items()}

    # how often each transform applies (Rotate always)
    for name, key, p in [("VerticalFlip", "vflip", 0.5), ("HorizontalFlip", "hflip", 0.5), ("Affine", "affine", 0.5),
                         ("RandomBrightnessContrast", "bc", 0.5), ("RandomGamma", "gamma_on", 0.3),
                         ("CLAHE", "clahe", 0.3), ("GaussNoise", "noise", 0.2), ("GaussianBlur", "blur", 0.3)]:
        assert rate_matches(len(alb.get(name, [])), N, p), name
        assert rate_matches(int(draw[key].sum()), N, p), key
    assert len(alb["Rotate"]) == N

    def same(ours: np.ndarray, theirs: list[float], what: str) -> None:
        assert ks_2samp(ours, np.asarray(theirs, dtype=np.float64)).pvalue > 1e-3, what

    same(draw["angle"], [np.rad2deg(np.arctan2(p["matrix"][0, 1], p["matrix"][0, 0])) for p in alb["Rotate"]],
         "rotation angle")
    same(draw["scale_x"], [p["scale"]["x"] for p in alb["Affine"]], "affine scale x")
    same(draw["scale_y"], [p["scale"]["y"] for p in alb["Affine"]], "affine scale y")
    same(draw["alpha"], [p["alpha"] for p in alb["RandomBrightnessContrast"]], "contrast")
    same(draw["beta"] * 255, [p["beta"] for p in alb["RandomBrightnessContrast"]], "brightness (uint8 levels)")
    same(draw["gamma"], [p["gamma"] for p in alb["RandomGamma"]], "gamma")
    same(draw["clip_limit"], [p["clip_limit"] for p in alb["CLAHE"]], "CLAHE clip limit")
    same(draw["noise_std"] * 255, [np.std(p["noise_map"]) for p in alb["GaussNoise"]], "noise level (uint8 levels)")
    kernels = [p["kernel"] for p in alb["GaussianBlur"]]
    same(draw["ksize"], [len(k) for k in kernels], "blur kernel size")
    same(draw["sigma"], [kernel_sigma(k) for k in kernels], "blur sigma")
    # the affine's shear and shift, read back from albumentations' matrices
    shear_x = [np.rad2deg(np.arctan(p["matrix"][0, 1] / p["scale"]["y"])) for p in alb["Affine"]]
    same(np.abs(draw["shear_x"]), np.abs(shear_x), "|shear x|")


def stats(batch: np.ndarray) -> dict[str, np.ndarray]:
    batch = batch.astype(np.float64)
    grad = np.abs(np.diff(batch, axis=1)).mean(axis=(1, 2)) + np.abs(np.diff(batch, axis=2)).mean(axis=(1, 2))
    rows = np.arange(batch.shape[1], dtype=np.float64)
    weight = batch.sum(axis=2)
    return {"mean": batch.mean(axis=(1, 2)), "std": batch.std(axis=(1, 2)), "gradient": grad,
            "row of the centre of mass": (weight * rows).sum(axis=1) / weight.sum(axis=1),
            "p10": np.percentile(batch, 10, axis=(1, 2)), "p90": np.percentile(batch, 90, axis=(1, 2))}


def distance_in_sd(ours: np.ndarray, theirs: np.ndarray) -> float:
    """Wasserstein-1 distance between two samples of a statistic, in standard deviations of the
    reference: 0 for the same distribution, ~0.1 for two runs of one sampler at N=600."""
    return float(wasserstein_distance(ours, theirs) / max(float(np.std(theirs)), 1e-12))


TOLERANCE_SD = 0.25  # a wrong range or probability moves a statistic by 0.5 sd and more (the control below)


def outputs(cfg: AugmentParams, device_cfg: AugmentParams | None = None) -> tuple[dict, dict]:
    image = crop()
    cpu = augment_batch(build_augment(cfg, seed=1), np.repeat(image[None], N, axis=0)).astype(np.float64) / 255.0
    x = torch.from_numpy(np.repeat(image[None, None], N, axis=0)).float() / 255.0
    device = build_device_augment(device_cfg or cfg)(x, torch.Generator().manual_seed(1))[:, 0].numpy()
    assert device.shape == cpu.shape and device.dtype == np.float32 and 0 <= device.min() and device.max() <= 1
    # on the uint8 levels the CPU path returns, so that an image left alone compares equal
    device = np.round(device.astype(np.float64) * 255.0) / 255.0
    return stats(device), stats(cpu)


@pytest.mark.parametrize("cfg", [AugmentParams(), EVERYTHING], ids=["defaults", "everything"])
def test_outputs_are_statistically_the_same_as_albumentations(cfg):
    """Not bit for bit: the CPU path rounds to uint8 after every step (and albucore truncates
    in brightness/contrast), this one keeps floats; so the test is a distance with a tolerance,
    not a KS test, which at N=600 flags sub-level rounding in the near-constant statistics."""
    ours, theirs = outputs(cfg)
    distances = {key: distance_in_sd(ours[key], theirs[key]) for key in ours}
    assert max(distances.values()) < TOLERANCE_SD, distances


def test_the_output_comparison_catches_a_wrong_range():
    """The control: the device path with every magnitude and probability 1.6x too large."""
    wrong = AugmentParams(**{**EVERYTHING.model_dump(), "strength": 1.6})
    ours, theirs = outputs(EVERYTHING, wrong)
    assert max(distance_in_sd(ours[key], theirs[key]) for key in ours) > 2 * TOLERANCE_SD


def test_off_is_none_and_identity_draws_leave_the_image_alone():
    assert build_device_augment(AugmentParams(enabled=False)) is None
    assert build_device_augment(AugmentParams(strength=0.0)) is None
    aug = DeviceAugment(EVERYTHING)
    x = torch.from_numpy(crop()[None, None]).float() / 255.0
    draw = aug.sample(1, (48, 48), torch.Generator().manual_seed(0))
    for name, value in draw.to_dict().items():
        if value.dtype == torch.bool:
            setattr(draw, name, torch.zeros_like(value))
    draw.angle = torch.zeros(1)
    torch.testing.assert_close(aug.apply(x, draw), x, atol=1e-5, rtol=0)
    draw.vflip = torch.ones(1, dtype=torch.bool)
    torch.testing.assert_close(aug.apply(x, draw), x.flip(-2), atol=1e-5, rtol=0)
    draw.vflip, draw.hflip = torch.zeros(1, dtype=torch.bool), torch.ones(1, dtype=torch.bool)
    torch.testing.assert_close(aug.apply(x, draw), x.flip(-1), atol=1e-5, rtol=0)
    # seeded: the same generator state gives the same batch
    a = aug(x.repeat(4, 1, 1, 1), torch.Generator().manual_seed(3))
    b = aug(x.repeat(4, 1, 1, 1), torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a[0], a[1])  # each image its own draw


def test_blur_is_albumentations_kernel_with_a_reflect_101_border():
    from albumentations.augmentations.blur.functional import create_gaussian_kernel_1d

    image = crop(seed=2).astype(np.float32) / 255.0
    for sigma, size in [(0.3, 3), (1.1, 5), (0.8, 3)]:
        kernel = create_gaussian_kernel_1d(sigma, size).astype(np.float32)
        expected = cv2.sepFilter2D(image, -1, kernel, kernel, borderType=cv2.BORDER_REFLECT_101)
        got = gaussian_blur(torch.from_numpy(image)[None, None], torch.tensor([sigma]), torch.tensor([size]))
        np.testing.assert_allclose(got[0, 0].numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("shape", [(64, 64), (50, 70)], ids=["divisible", "padded"])
@pytest.mark.parametrize("clip", [1.0, 2.5, 4.0])
def test_clahe_follows_opencv(shape, clip):
    rng = np.random.default_rng(4)
    image = cv2.GaussianBlur((rng.random(shape) * 180 + 30).astype(np.uint8), (0, 0), 2)
    image[: shape[0] // 3] //= 3  # a dark part: the tiles must differ
    expected = cv2.createCLAHE(clipLimit=clip, tileGridSize=(8, 8)).apply(image).astype(np.float64)
    got = clahe(torch.from_numpy(image)[None, None].float() / 255.0, torch.tensor([clip]))[0, 0].numpy() * 255.0
    error = np.abs(got - expected)
    assert error.mean() < 1.0 and np.percentile(error, 99) <= 3.0, (error.mean(), error.max())


# ------------------------------------------------------------------ in the trainer
def test_short_last_batch_is_dropped_only_for_fixed_shapes():
    from src.data.batches import batches_of

    order = np.arange(19)
    assert [len(c) for c in batches_of(order, 8)] == [8, 8, 3]
    assert [len(c) for c in batches_of(order, 8, fixed_shape=True)] == [8, 8]
    assert [len(c) for c in batches_of(order[:5], 8, fixed_shape=True)] == [5]  # one step at least


def test_prefetch_passes_host_batches_through_off_cuda():
    from src.model.prefetch import prefetch

    batches = [(np.full((2, 4, 4), i, np.uint8), np.array([0, 1])) for i in range(3)]
    assert [b[0][0, 0, 0] for b in prefetch(iter(batches), torch.device("cpu"))] == [0, 1, 2]


def test_a_fold_trains_with_augmentation_on_the_device(tmp_path):
    """runs_on: device on CPU tensors: the engine augments, the batch source does not, and
    the network sees a different input for the same batch at every step."""
    from src.artifacts.store import PreparedStore
    from src.model.engine import (
        attach_augmentation,
        augment_on_device,
        build_engine,
        run_epoch,
    )
    from src.model.fit import checkpoint_meta, train_fold
    from tests.train_helpers import make_tiny_store, tiny_params

    root = make_tiny_store(tmp_path / "s", n_per_class=8, folds=2, size=48)
    params = tiny_params(tmp_path, root, epochs=2, augment={"runs_on": "device", "strength": 1.0})
    cfg, store = params.train, PreparedStore.open(root)
    assert augment_on_device(cfg, torch.device("cpu"))
    assert not augment_on_device(params.model_copy(update={"train": cfg.model_copy(
        update={"augment": cfg.augment.model_copy(update={"runs_on": "auto"})})}).train, torch.device("cpu"))
    engine = build_engine(cfg, checkpoint_meta(params, store, fold=0), torch.device("cpu"), store.labels)
    source = attach_augmentation(engine, store, cfg, seed=0)
    assert source.transform is None and engine.augment is not None
    images = np.asarray(store.images[:4])
    assert not torch.equal(engine.train_input(images), engine.train_input(images))
    loss, speed = run_epoch(engine, source, [np.arange(8), np.arange(8, 16)])
    assert np.isfinite(loss) and speed > 0
    result = train_fold(params, store, 0, tmp_path / "fold")
    assert len(result.history) == 2 and all(np.isfinite(r["train_loss"]) for r in result.history)


class PidSource:
    """A batch source that says which process read each batch."""
    transform = None

    def __call__(self, rows):
        import os

        return np.full(len(rows), os.getpid()), np.asarray(rows)


def test_loader_workers_persist_across_epochs():
    from src.data.batches import iterate

    source = PidSource()
    seen, pids = [], set()
    for epoch in range(3):
        chunks = [np.arange(4) + 10 * epoch + 4 * k for k in range(3)]
        batches = list(iterate(source, chunks, num_workers=2, seed=epoch))
        assert [b[1].tolist() for b in batches] == [c.tolist() for c in chunks]  # in order, this epoch's rows
        pids |= {int(b[0][0]) for b in batches}
        seen.append(source._loader)
    assert seen[0] is seen[1] is seen[2] and len(pids) == 2  # the same two processes all along
    assert list(iterate(source, [np.arange(3)], num_workers=0, seed=0))[0][1].tolist() == [0, 1, 2]


def test_a_compiled_network_unwraps_to_the_plain_one():
    """train.compile wraps the training network; checkpoints, EMA and validation use what
    Engine.net unwraps.  The eager backend here (inductor compiles for a minute on 2 cores);
    tests/test_cuda.py trains with the real compile on a GPU."""
    from src.model.distributed import unwrap

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    net(torch.zeros(1, 1, 8, 8))
    compiled = torch.compile(net, backend="eager")
    assert unwrap(compiled) is net and unwrap(net) is net
    assert list(unwrap(compiled).state_dict()) == list(net.state_dict())  # no _orig_mod. prefixes
