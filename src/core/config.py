"""The one place every setting is declared, typed and validated.

params.yaml is namespaced by stage; each section is a pydantic model that forbids
unknown keys, so a typo stops the run with one line naming the key and what is
allowed instead of being silently ignored.  `--set section.key=value` overrides use
the same spelling as `dvc exp run -S`.
"""
from __future__ import annotations

import argparse
import difflib
import typing
import warnings
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from src.core.errors import BoneHealthError

DEFAULT_PARAMS = "params.yaml"


class ParamsError(BoneHealthError):
    """A params file or override that does not validate."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- data
class DataParams(Section):
    root: str = Field("data/phantom",
        description="one sub-folder per class (the lab's C1/ and C3/); keep the\nmanifest and COCO file inside it so `dvc add` versions them together")
    manifest: Optional[str] = Field("auto",
        description="CSV: file, patient_id[, class][, box]; auto: root/manifest.csv if present; null: none")
    annotations: Optional[str] = Field("auto",
        description="COCO boxes (CVAT export) for crop mode; auto: root/annotations.json if present")
    patient_regex: Optional[str] = Field("auto",
        description="without a manifest: e.g. '^(?P<patient>P\\d+)_'; auto: the id the file\n"
                    "names share, when several images share one; null: each image its own patient")
    classes: Optional[list[str]] = Field(None, description='null: every sub-folder of root, sorted')
    positive_class: str = Field("C3", description='the disease class for binary metrics')
    name: Optional[str] = Field(None, description="dataset name for tags; null: the root folder's name")
    description: Optional[str] = Field(None,
        description="what the images show and the classes mean, for the model card;\n"
                    "null: the phantom's dental wording on the phantom, a neutral one otherwise")
    modality: Optional[str] = Field(None,
        description="e.g. 'hand radiograph'; null: dental panoramic radiograph (OPG) on the\n"
                    "phantom, 'radiograph' otherwise")
    extensions: list[str] = Field(
        default_factory=lambda: [".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom"]
    )
    max_pixels: Optional[int] = Field(40_000_000, ge=1,
        description="refuse larger images from their header, before decoding (panoramics are\n"
                    "3-13 MP; a 164 KB PNG can declare 169 MP); null: no limit")
    on_bad_file: Literal["stop", "skip"] = Field("stop",
        description='stop | skip (unreadable files, images without a box in crop mode)')
    on_label_conflict: Literal["stop", "skip"] = Field("stop",
        description='stop | skip (the same image in two class folders)')


# ------------------------------------------------------------------------ phantom
class PhantomParams(Section):
    out: str = Field("data/phantom", description='images/<class>/..., manifest.csv, annotations.json')
    masks_out: str = Field("data/phantom_masks", description='ground-truth cortex masks, kept apart from the images')
    seed: int = 0
    classes: list[str] = Field(default_factory=lambda: ["C1", "C3"], min_length=2, max_length=2,
        description='[healthy, osteoporotic]')
    patients_per_class: int = Field(80, ge=1)
    followup_fraction: float = Field(0.25, ge=0.0, le=1.0,
        description='share of patients with 2..max_images_per_patient images')
    max_images_per_patient: int = Field(3, ge=1)
    width: int = Field(1024, ge=256, le=4096)
    height: int = Field(512, ge=128, le=2048)
    separation: float = Field(1.2, ge=0.0,
        description='class signal strength; 0 = indistinguishable (see docs/PHANTOM.md)')
    bit_depth: Literal[8, 16] = Field(8, description='8 | 16 (grey PNG)')
    field_width_mm: float = Field(290.0, gt=0,
        description='detector width in mm: 0.1 mm/px at 2900 px, 0.283 mm/px at 1024')
    cortical_width_mm: tuple[float, float] = Field((1.5, 5.0),
        description='cortex below the foramen, most osteoporotic .. healthiest (cut-off 3 mm)')
    nuisance: float = Field(1.0, ge=0.0, le=3.0,
        description='spread of class-independent variation (pose, exposure, teeth, noise)')
    box_side: Literal["random", "left", "right"] = Field("random",
        description='side of the annotated cortex box: random | left | right')

    @model_validator(mode="after")
    def _panoramic_shape(self):
        if not 0.45 <= self.height / self.width <= 0.75:
            raise ValueError(
                f"phantom.height/phantom.width must be between 0.45 and 0.75 (a panoramic layout), "
                f"got {self.height}/{self.width}"
            )
        lo, hi = self.cortical_width_mm
        if not 0 < lo < hi:
            raise ValueError(f"phantom.cortical_width_mm must be [low, high] with 0 < low < high, got {[lo, hi]}")
        if len(set(self.classes)) != 2:
            raise ValueError(f"phantom.classes must name two different folders, got {self.classes}")
        return self


# ------------------------------------------------------------------------ prepare
class FullParams(Section):
    long_side: Optional[int] = Field(512, ge=8, le=8192,
        description="CPU-sized store: this long side, the median source aspect ratio")
    downscale: Optional[float] = Field(None, gt=0,
        description="the lab's 3 (~950x450 from 2860x1350); wins over long_side")
    size: Optional[tuple[int, int]] = Field(None,
        description='[height, width], e.g. [449, 954]; wins over both')

    @model_validator(mode="after")
    def _one_of(self):
        if self.downscale is None and self.size is None and self.long_side is None:
            raise ValueError("set prepare.full.long_side, prepare.full.downscale or prepare.full.size "
                             "[height, width] (e.g. --set prepare.full.size=[256,512])")
        if self.size is not None and min(self.size) < 8:
            raise ValueError("prepare.full.size must be [height, width] with both >= 8")
        return self


class CropParams(Section):
    side: int = Field(600, ge=8, description="source pixels at reference_width (the lab's 600 px at ~2900 px wide)")
    reference_width: Optional[int] = Field(2900, ge=1,
        description='scale side by image width / reference_width; null = use side as is')
    size: int = Field(128, ge=8, le=2048, description='stored crop size in pixels')


class RollingBallParams(Section):
    enabled: bool = Field(False, description='the lab\'s "RB" datasets')
    radius: int = Field(50, ge=1,
        description='ball radius in source pixels (intensity in 8-bit grey levels, as ImageJ)')
    shrink: Optional[int] = Field(None, ge=1, le=16,
        description='null: roll on a copy shrunk 1/2/4/8x by radius, like ImageJ; 1 = exact, slow')


class ClaheParams(Section):
    enabled: bool = False
    clip_limit: float = Field(2.0, gt=0)
    tile_grid: int = Field(8, ge=1)


class PrepareParams(Section):
    out: str = "data/prepared"
    mode: Literal["auto", "full", "crop"] = Field("auto",
        description='auto: crop when every image has a box, else full | full: whole\n'
                    'radiograph resized | crop: square around the cortex box')
    full: FullParams = Field(default_factory=FullParams)
    crop: CropParams = Field(default_factory=CropParams)
    rolling_ball: RollingBallParams = Field(default_factory=RollingBallParams)
    clahe: ClaheParams = Field(default_factory=ClaheParams)
    dtype: Literal["uint8", "uint16"] = "uint8"
    folds: int = Field(5, ge=2, le=20,
        description='K of the K-fold CV: test folds are assigned here, stored with the data')
    fold_seed: int = Field(42, description='StratifiedGroupKFold seed: folds are a versioned data artifact')
    workers: int = Field(1, ge=1, le=64,
        description='processes decoding+preprocessing in parallel; the store is identical for any value')


# -------------------------------------------------------------------------- train
class AugmentParams(Section):
    enabled: bool = True
    strength: float = Field(0.5, ge=0.0, le=3.0,
        description='one knob that scales every probability/magnitude below (0 = off)')
    vflip: float = Field(0.5, ge=0.0, le=1.0)
    hflip: float = Field(0.0, ge=0.0, le=1.0)
    rotate_limit: float = Field(10.0, ge=0.0, le=180.0)
    affine: float = Field(0.5, ge=0.0, le=1.0)
    brightness_contrast: float = Field(0.5, ge=0.0, le=1.0)
    gamma: float = Field(0.3, ge=0.0, le=1.0)
    clahe: float = Field(0.0, ge=0.0, le=1.0)
    noise: float = Field(0.2, ge=0.0, le=1.0)
    blur: float = Field(0.1, ge=0.0, le=1.0)
    runs_on: Literal["auto", "cpu", "device"] = Field("auto",
        description='auto: on the GPU when training on one (batched torch ops, src/data/device_augment.py),\n'
                    'else per image on the CPU (albumentations); device: the torch ops on any device')


class TrainParams(Section):
    out: str = "models"
    val_fraction: float = Field(0.2, gt=0.0, lt=0.6,
        description='inner validation split of the training folds (early stopping, LR, checkpoint)')
    model: str = "efficientnet_b0"
    pretrained: bool = False
    weights: Optional[str] = Field(None,
        description='local weights file; pretrained never downloads unless HF_HUB_OFFLINE=0')
    in_chans: Literal[1, 3] = 1
    image_size: Optional[int] = Field(None, ge=16, le=2048, description='null: the prepared size')
    drop_rate: float = Field(0.2, ge=0.0, lt=1.0)
    epochs: int = Field(18, ge=1,
        description='sized for 2 CPU cores (make repro <= 10 min); GPU profiles: params/gpu-lab-*.yaml')
    batch_size: int = Field(8, ge=1,
        description='more steps per epoch: from scratch on ~140 images, steps matter more than batch')
    optimizer: Literal["adam", "adamw", "sgd"] = Field("adamw", description='adam | adamw | sgd')
    lr: float = Field(1e-3, gt=0.0, le=10.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    scheduler: Literal["plateau", "cosine", "none"] = Field("cosine",
        description="plateau (the lab's x0.1, patience 5) | cosine (with warm-up) | none")
    plateau_factor: float = Field(0.1, gt=0.0, lt=1.0)
    plateau_patience: int = Field(5, ge=0)
    warmup_epochs: int = Field(1, ge=0)
    early_stopping_patience: int = Field(0, ge=0,
        description='0 disables: the short CPU cosine schedule ends on its own (GPU profiles: 10)')
    class_balance: Literal["none", "weights", "sampler"] = Field("weights", description='none | weights | sampler')
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    grad_clip: Optional[float] = Field(None, gt=0.0)
    ema_decay: Optional[Union[Literal["auto"], float]] = Field("auto",
        description='EMA of the weights (warm-up ramp) for validation, checkpoint, test; auto: averages\n'
                    'over the last ~10% of the run\'s optimiser steps, off under 50 steps; null: off')
    checkpoint: Literal["val_auc", "val_loss", "last"] = Field("val_loss",
        description='weights kept: val_auc (best inner-val AUC, ties by loss) | val_loss | last epoch')
    checkpoint_from: float = Field(0.5, ge=0.0, lt=1.0,
        description='val_auc/val_loss choose among the epochs after this share of train.epochs (0: all);\n'
                    'early stopping counts from there too')
    seed: int = 0
    deterministic: bool = False
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto", description='auto: cuda, then mps, then cpu')
    amp: Literal["auto", "bf16", "fp16", "off"] = Field("auto",
        description='auto: bf16 on CUDA when supported, off on CPU')
    channels_last: bool = True
    compile: Literal["off", "default", "reduce-overhead", "max-autotune"] = Field("off",
        description='torch.compile of the training network: off | default | reduce-overhead (CUDA graphs) |\n'
                    'max-autotune; pays on a GPU if at all (benchmarks/gpu_check.sh measures it), not on 2 CPU cores')
    num_workers: int = Field(0, ge=0)
    threads: Optional[int] = Field(None, ge=1,
        description='CPU threads for torch; null: all cores (set 1 when sharing the CPU)')
    devices: int = Field(1, ge=1,
        description='data-parallel processes (DDP, one per GPU; gloo on CPU); >1 relaunches\n`python -m src.train` under torchrun; batch_size stays the global batch')
    sync_bn: bool = Field(False,
        description='SyncBatchNorm across processes (CUDA only; else each normalises its shard)')          # SyncBatchNorm across processes (CUDA only)
    fold_parallel: int = Field(1, ge=1,
        description='folds trained at once, one worker process each (round-robin over GPUs)')
    augment: AugmentParams = Field(default_factory=AugmentParams)

    @model_validator(mode="after")
    def _stopping_needs_a_criterion(self):
        if self.checkpoint == "last" and self.early_stopping_patience:
            raise ValueError(f"train.early_stopping_patience={self.early_stopping_patience} needs train.checkpoint "
                             "val_auc or val_loss: with last, no epoch counts as an improvement")
        return self

    @field_validator("ema_decay")
    @classmethod
    def _ema_range(cls, value):
        if isinstance(value, float) and not 0.0 < value < 1.0:
            raise ValueError(f"expected auto, null or a number between 0 and 1 (exclusive) (got {value})")
        return value


# ------------------------------------------------------------------------- locate
class UnseenPhantomParams(Section):
    enabled: Union[Literal["auto"], bool] = Field("auto",
        description="auto: when data.root is the phantom (real data has no second phantom to test on)")
    seed: int = Field(1, description="never the training phantom's seed")
    nuisance: float = Field(1.5, ge=0.0, le=3.0, description="more pose, exposure and noise than trained on")
    patients_per_class: int = Field(30, ge=1)


class RefineParams(Section):
    enabled: bool = Field(True,
        description="a second network re-finds each peak's centre (both sides) in a window of a finer view:\n"
                    "the overview's 6 mm cells cannot place the box under the mental foramen (bench_locate.py)")
    size: tuple[int, int] = Field((256, 512),
        description="[height, width] of the finer view of the whole radiograph the windows are cut from")
    window: tuple[int, int] = Field((64, 96),
        description="[height, width] of the window around a coarse peak that the refiner sees")
    epochs: int = Field(20, ge=1, description="one window per training image per epoch")
    jitter: float = Field(0.13, ge=0.0, le=0.4,
        description="sd of a training window's offset from the true centre, as a fraction of its side\n"
                    "(clipped at 0.4): the coarse peak's errors the refiner learns to undo")

    @field_validator("size", "window")
    @classmethod
    def _multiple_of_stride(cls, value):
        return _stride_multiple(value)

    @model_validator(mode="after")
    def _window_inside(self):
        if any(w > s for w, s in zip(self.window, self.size)):
            raise ValueError(f"window {list(self.window)} is larger than the finer view {list(self.size)}; "
                             "expected a window inside it")
        return self


def _stride_multiple(value):
    if any(v < 32 or v % 16 for v in value):
        raise ValueError(f"expected [height, width], each a multiple of 16 and at least 32 (got {list(value)})")
    return value


class LocateParams(Section):
    out: str = Field("localiser", description="fold localisers, oof_boxes.csv, crops from the found boxes, metrics")
    enabled: Union[Literal["auto"], bool] = Field("auto",
        description="auto: in crop mode (the store has boxes to learn from); full-mode models need no box")
    model: str = Field("mobilenetv3_small_100",
        description="timm backbone with stride-4 features (features_only); the heads are CenterNet's")
    size: tuple[int, int] = Field((96, 192),
        description="[height, width] of the overview the whole radiograph is shrunk to")
    epochs: int = Field(16, ge=1, description="sized for make repro on 2 CPU cores (benchmarks/bench_locate.py)")
    min_steps: int = Field(160, ge=0,
        description="a small set trains more epochs, up to this many optimiser steps (both networks; 0: off):\n"
                    "on 52 images 16 epochs are 64 steps, and found fewer boxes than a fixed box")
    batch_size: int = Field(16, ge=2)
    lr: float = Field(3e-3, gt=0.0, le=1.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    sigma: float = Field(1.0, gt=0.0, description="heat-map Gaussian around the centre, in cells of 4 overview pixels")
    augment: float = Field(1.5, ge=0.0, le=3.0,
        description="geometric augmentation: 1 = +-6 degrees rotation, +-10% scale, +-5% shift")
    negatives: float = Field(0.5, ge=0.0, le=1.0,
        description="images without a cortex added per training image (shuffled tiles, noise, shapes):\n"
                    "they teach the confidence to say 'no cortex here'")
    seed: int = 0
    threads: Optional[int] = Field(None, ge=1, description="CPU threads for torch; null: all cores")
    min_confidence: float = Field(0.2, gt=0.0, lt=1.0,
        description="below this peak probability no cortex was found: an error row, not a crop\n"
                    "(metrics.json: the lowest held-out radiograph's confidence and non-dental images')")
    both_sides: bool = Field(True,
        description="classify a crop on each side of the mandible and average (when the other side's peak\n"
                    "passes min_confidence); evaluate measures both ways (chain_*_oof_roc_auc)")
    refine: RefineParams = Field(default_factory=RefineParams,
        description="the refiner; model, batch_size, lr, weight_decay, sigma, augment and seed are the ones above")
    unseen_phantom: UnseenPhantomParams = Field(default_factory=UnseenPhantomParams,
        description="a phantom never trained on, scored by the fold ensemble")

    @field_validator("size")
    @classmethod
    def _multiple_of_stride(cls, value):
        return _stride_multiple(value)


# ----------------------------------------------------------------------- evaluate
class EvaluateParams(Section):
    out: str = "reports"
    threshold: float = Field(0.5, gt=0.0, lt=1.0)
    bootstrap: int = Field(2000, ge=0, description='patient-level bootstrap resamples for the CI')
    ci: float = Field(0.95, gt=0.5, lt=1.0)
    calibration_bins: int = Field(10, ge=2)
    seed: int = 0
    collapse_spread: float = Field(0.05, ge=0.0, lt=1.0,
        description="a fold whose test probabilities (positive class) span less than this is\n"
                    "flagged as collapsed: it outputs a near-constant probability")


# ------------------------------------------------------------------------ gradcam
class GradcamParams(Section):
    out: str = "reports/gradcam"
    per_class: int = Field(20, ge=1)
    seed: int = 0
    method: Literal["gradcam", "gradcam++", "hirescam", "layercam", "eigencam", "scorecam", "saliency"] = Field("hirescam",
        description='hirescam (chosen by benchmarks/bench_gradcam.py) | gradcam | gradcam++ | layercam | eigencam |\n'
                    'scorecam | saliency')
    target_layer: Optional[Union[str, list[str]]] = Field("stride4",
        description="stride<N>: the output of the network's stage at that stride (stride4: a 32x32 map at\n"
                    "128 px; chosen by benchmarks/bench_gradcam.py), a dotted module name, a list of those\n"
                    "(maps fused), or null: the last feature map (bn2 for timm EfficientNets, 4x4 at 128 px)")
    masks: Optional[str] = Field("auto",
        description="ground-truth regions for localisation scores; auto: phantom.masks_out when\ndata.root is the phantom, none otherwise; null: none")
    alpha: float = Field(0.4, ge=0.0, le=1.0, description='heat-map weight in the overlay')
    target: Literal["predicted", "true", "positive"] = Field("predicted",
        description='class to explain: predicted | true | positive (data.positive_class)')
    perturbation: Literal["road", "confidence_change", "none"] = Field("road",
        description='road (ROAD combined) | confidence_change | none: faithfulness without masks')
    road_percentiles: list[int] = Field(default_factory=lambda: [50], min_length=1,
        description='ROAD removal thresholds (paper: 10..90); each adds ~0.4 s/image for B0 at 128 px on CPU')
    batch_size: int = Field(32, ge=1, description='ScoreCAM forward batch')
    pointing_tolerance_mm: float = Field(4.0, ge=0.0,
        description="pointing game: a hit when the map's peak lies within this distance of the mask (Zhang et al.'s\n"
                    "15 px at 224 px is 4 mm on the 60 mm crop); data without a mm scale: 15/224 of the image side")
    randomization_steps: int = Field(4, ge=0,
        description='sanity check (Adebayo et al.): maps again with the weights randomised from the top down in\n'
                    'this many cumulative steps, compared by rank correlation (low is good); 0: off')

    @model_validator(mode="after")
    def _percentiles(self):
        if not all(0 < p < 100 for p in self.road_percentiles):
            raise ValueError("road_percentiles: each must be between 1 and 99")
        return self


# --------------------------------------------------------------------------- tune
class SpaceEntry(Section):
    """One searched parameter: `train.lr: {type: float, low: 1e-4, high: 3e-3, log: true}`."""
    type: Literal["float", "int", "categorical"]
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    step: Optional[float] = Field(None, gt=0)
    choices: Optional[list[Any]] = None

    @model_validator(mode="after")
    def _shape(self):
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical entry needs a non-empty 'choices' list")
            if self.low is not None or self.high is not None:
                raise ValueError("a categorical entry takes 'choices', not low/high")
        else:
            if self.low is None or self.high is None or self.low >= self.high:
                raise ValueError(f"a {self.type} entry needs numbers low < high")
            if self.log and self.low <= 0:
                raise ValueError("a log-scaled entry needs low > 0")
            if self.log and self.step is not None:
                raise ValueError("'step' and 'log: true' cannot be combined (Optuna refuses it)")
            if self.choices is not None:
                raise ValueError(f"a {self.type} entry takes low/high, not 'choices'")
        return self


DEFAULT_SPACE = {
    "train.lr": SpaceEntry(type="float", low=0.0003, high=0.01, log=True),
    "train.weight_decay": SpaceEntry(type="float", low=0.000001, high=0.01, log=True),
    "train.augment.strength": SpaceEntry(type="float", low=0.0, high=2.0),
    "train.drop_rate": SpaceEntry(type="float", low=0.0, high=0.5),
    "train.optimizer": SpaceEntry(type="categorical", choices=["adam", "adamw"]),
}


class TuneParams(Section):
    out: str = "tune"
    study_name: str = "bone-health"
    storage: Optional[str] = Field(None,
        description='null: journal file tune/<study>.journal (safe for local workers);\npostgresql://user:pw@host/db for several machines')
    n_trials: int = Field(20, ge=1, description='trials added by one `python -m src.tune` (a rerun adds more)')
    timeout: Optional[float] = Field(None, gt=0, description='seconds')
    n_workers: int = Field(1, ge=1, description='worker processes on this machine sharing the storage')
    sampler_seed: int = Field(0, description='TPE sampler seed')
    n_startup_trials: int = Field(5, ge=0,
        description='random trials before TPE starts modelling')
    pruner: Literal["wilcoxon", "median", "none"] = Field("wilcoxon",
        description='wilcoxon (made for k-fold) | median | none')
    # The exact one-sided Wilcoxon p of a trial that lost all n folds to the best is 2**-n
    # (0.25 after 2 folds, 0.125 after 3).  Above 0.25 a trial that lost its first 2 of 5
    # folds stops there and saves 3; 0.2 could never prune before fold 3.  Every value in
    # (0.25, 0.3125] makes the same decisions up to 4 folds: 0.3 is one of them.
    pruner_p_threshold: float = Field(0.3, gt=0.0, lt=1.0,
        description='Wilcoxon: 2 lost folds of 2 give p=0.25, so >0.25 stops\nsuch a trial after 2 of 5 folds (0.2 waits for 3)')
    pruner_startup_steps: int = Field(2, ge=1,
        description='folds before any pruning')
    # Median pruner only: completed trials before it may prune.  The pruner's own count, not
    # the sampler's n_startup_trials: 3 is the first count whose median is a middle value
    # rather than one trial's or the mean of two.
    pruner_startup_trials: int = Field(3, ge=1,
        description="median pruner: completed trials before it prunes\n(its own count, not the sampler's n_startup_trials)")
    # Also stop a trial that can no longer beat the best completed trial's mean even if every
    # fold left scored the maximum AUC (1.0).  Exact: it never stops a possible winner.
    prune_unreachable: bool = Field(True,
        description='wilcoxon/median: also stop a trial whose mean cannot beat the best\neven with AUC 1.0 on every fold left (exact: never stops a winner)')
    # Each trial trains its folds in its own seeded order (Optuna's advice for the Wilcoxon
    # pruner): otherwise every trial is judged on the same first folds, and a pair of easy or
    # tied folds there decides the pruning of all of them.  Fold k stays fold k (step = fold).
    # Wilcoxon and none only: the median pruner reads steps as progress and keeps 0..K-1.
    shuffle_folds: bool = Field(True,
        description="each trial trains its folds in its own seeded order (Optuna's\nadvice for Wilcoxon: not every trial judged on the same first\nfolds); the median pruner keeps 0..K-1 (its steps are progress)")
    objective: Literal["val_auc", "test_auc"] = Field("val_auc",
        description='val_auc (inner validation) | test_auc (selects on the test folds: avoid)')
    epochs: Optional[int] = Field(None, ge=1, description='null: train.epochs')
    heartbeat_interval: float = Field(10.0, gt=0,
        description='seconds; a trial silent for grace_period is failed and retried')
    grace_period: float = Field(60.0, gt=0)
    max_retry: int = Field(2, ge=0)
    keep_checkpoints: bool = False
    space: dict[str, SpaceEntry] = Field(default_factory=lambda: dict(DEFAULT_SPACE))


# ----------------------------------------------------------------------- register
class GateParams(Section):
    metric: str = Field("oof_roc_auc",
        description='any key of reports/metrics.json (tagged metric.<key> on versions)')
    direction: Literal["maximize", "minimize"] = Field("maximize", description='maximize | minimize (e.g. oof_brier)')
    min_gain: float = Field(0.0, ge=0.0, description='required improvement (strictly better when 0)')
    sensitivity_metric: str = "oof_sensitivity"
    max_sensitivity_drop: float = Field(0.02, ge=0.0, le=1.0,
        description='tolerated loss of sensitivity vs the champion')
    floor: Optional[float] = Field(0.5,
        description="the gate metric's CI must clear this, first champion included (AUC: chance\n"
                    "is 0.5; maximize: ci_low above it, minimize: ci_high below it); null: none")


class RegisterParams(Section):
    name: str = "bone-health"
    strategy: Literal["ensemble", "refit"] = Field("ensemble",
        description='ensemble: mean of the K fold models | refit: one model on all data')
    out: str = Field("reports/register", description='registered.json (DVC out), model_card.md, model_card.json')
    challenger_alias: str = Field("challenger", pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$",
        description='what register moves; promote moves champion_alias')
    champion_alias: str = Field("champion", pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$")
    batch_size: int = Field(16, ge=1, description='images per forward pass inside the served model')
    example_size: tuple[int, int] = Field((256, 512),
        description='synthetic input example (never a patient image): [height, width]')
    gate: GateParams = Field(default_factory=GateParams,
        description='promote: challenger must beat champion on all of these')

    @model_validator(mode="after")
    def _distinct_aliases(self):
        if self.challenger_alias == self.champion_alias:
            raise ValueError("register.challenger_alias and register.champion_alias must differ")
        if min(self.example_size) < 16:
            raise ValueError("register.example_size must be [height, width] with both >= 16")
        return self


# ------------------------------------------------------------------------- mlflow
class MlflowParams(Section):
    tracking_uri: str = Field("sqlite:///mlruns/mlflow.db",
        description='MLFLOW_TRACKING_URI wins when set')
    artifact_root: str = "mlruns/artifacts"
    experiment: str = "bone-health"
    retries: int = Field(3, ge=0,
        description="tries again after a tracking error that may pass (server down, database locked)")
    retry_wait_s: float = Field(2.0, gt=0, le=600,
        description="wait before the first retry, doubled each time")


# `register` is also ABCMeta.register on the class; as a field it is only ever read as data.
warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)


class Params(Section):
    data: DataParams = Field(default_factory=DataParams)
    phantom: PhantomParams = Field(default_factory=PhantomParams)
    prepare: PrepareParams = Field(default_factory=PrepareParams)
    locate: LocateParams = Field(default_factory=LocateParams)
    train: TrainParams = Field(default_factory=TrainParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    gradcam: GradcamParams = Field(default_factory=GradcamParams)
    tune: TuneParams = Field(default_factory=TuneParams)
    register: RegisterParams = Field(default_factory=RegisterParams)
    mlflow: MlflowParams = Field(default_factory=MlflowParams)

    @model_validator(mode="after")
    def _cross_checks(self):
        if self.data.classes is not None and self.data.positive_class not in self.data.classes:
            raise ValueError(
                f"data.positive_class {self.data.positive_class!r} is not one of data.classes {self.data.classes}"
            )
        for key in self.tune.space:
            if not _is_leaf_path(self, key):
                raise ValueError(f"tune.space: {key!r} is not a parameter (expected e.g. train.lr)")
        return self


def _is_leaf_path(model: BaseModel, dotted: str) -> bool:
    node: Any = model
    for part in dotted.split("."):
        if not isinstance(node, BaseModel) or part not in type(node).model_fields:
            return False
        node = getattr(node, part)
    return not isinstance(node, BaseModel)


# ------------------------------------------------------------------ loading logic
def _allowed_keys(model_cls: type[BaseModel], loc: tuple) -> list[str]:
    cls = model_cls
    for part in loc[:-1]:
        field = cls.model_fields.get(str(part)) if isinstance(cls, type) else None
        ann = getattr(field, "annotation", None) if field else None
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            cls = ann
        else:
            return []
    return sorted(cls.model_fields)


# Keys that moved: an old params file gets told where its setting lives now.
MOVED_KEYS = {"train.folds": "prepare.folds"}


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = tuple(p for p in first["loc"] if not isinstance(p, int) or len(first["loc"]) == 1)
    key = ".".join(str(p) for p in first["loc"]) or "<root>"
    if first["type"] == "extra_forbidden" and key in MOVED_KEYS:
        return f"{source}: key {key!r} moved to {MOVED_KEYS[key]} (the fold count is part of the prepared data)"
    if first["type"] == "extra_forbidden":
        allowed = _allowed_keys(Params, loc)
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"{source}: unknown key {key!r}{hint}; allowed: {', '.join(allowed)}"
    msg = first["msg"]
    if first["type"] == "value_error":
        msg = msg.removeprefix("Value error, ")
        # a section's own check names its keys in full ("train.x needs train.y"): no "train:" before it
        return f"{source}: {msg}" if key == "<root>" or msg.startswith(f"{key}.") else f"{source}: {key}: {msg}"
    path = _field_path(first["loc"])
    form = accepted_form(path)
    if len(path) < len([p for p in first["loc"] if not isinstance(p, int)]):
        # a union (e.g. auto or a number): pydantic reports one error per member; say what fits instead
        return f"{source}: {'.'.join(path)}: got {first.get('input')!r}; expected {form}"
    return f"{source}: {key}: {msg} (got {first.get('input')!r})" + (f"; expected {form}" if form else "")


def _field_path(loc: tuple) -> tuple[str, ...]:
    """The leading part of a pydantic error location that names fields (not union members or indices)."""
    path: list[str] = []
    for part in loc:
        if isinstance(part, int) or _field_at((*path, str(part))) is None:
            break
        path.append(str(part))
    return tuple(path)


def _field_at(path: tuple[str, ...]):
    cls: Any = Params
    field = None
    for part in path:
        fields = getattr(cls, "model_fields", None)
        if not fields or part not in fields:
            return None
        field = fields[part]
        cls = field.annotation
    return field


_EXAMPLE = {int: 256, float: 0.5, str: "name"}


def accepted_form(path: tuple[str, ...]) -> str | None:
    """How a value for `path` is written, with a --set example (YAML, like dvc exp run -S)."""
    field = _field_at(path)
    if field is None:
        return None
    key = ".".join(path)
    ann = field.annotation
    optional = type(None) in typing.get_args(ann)
    inner = [a for a in typing.get_args(ann) if a is not type(None)] if optional else [ann]
    kind = inner[0] if len(inner) == 1 else typing.Union[tuple(inner)]
    origin = typing.get_origin(kind)
    if origin is typing.Union and all(typing.get_origin(a) is Literal or a in (int, float) for a in typing.get_args(kind)):
        words = [" | ".join(str(v) for v in typing.get_args(a)) if typing.get_origin(a) is Literal else "a number"
                 for a in typing.get_args(kind)]
        form = f"{' or '.join(words)} (--set {key}={_EXAMPLE[float]})"
    elif origin is Literal:
        form = f"one of {' | '.join(str(v) for v in typing.get_args(kind))} (--set {key}={typing.get_args(kind)[0]})"
    elif origin in (tuple, list):
        args = [a for a in typing.get_args(kind) if a is not Ellipsis]
        names = ", ".join(getattr(a, "__name__", str(a)) for a in args) if origin is tuple else \
            f"{getattr(args[0], '__name__', 'value')}, ..."
        example = field.default if isinstance(field.default, (list, tuple)) and field.default else \
            [_EXAMPLE.get(a, "...") for a in (args if origin is tuple else args[:1] * 2)]
        shown = "[" + ",".join(str(v) for v in example) + "]"
        form = f"a list [{names}] (--set {key}={shown})"
    elif kind in (int, float, str, bool):
        form = f"{'true or false' if kind is bool else 'a number' if kind in (int, float) else 'text'}"
    else:
        return None
    return form + (f", or null (--set {key}=null)" if optional else "")


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=0.01' -> (['train', 'lr'], 0.01); the value is read as YAML, like dvc -S."""
    if "=" not in text:
        raise ParamsError(f"--set {text!r}: expected section.key=value")
    key, _, raw = text.partition("=")
    key = key.strip()
    if ":" in key:  # dvc also accepts 'params.yaml:train.lr'
        key = key.split(":", 1)[1]
    parts = [p for p in key.split(".") if p]
    if len(parts) < 2:
        raise ParamsError(f"--set {text!r}: expected section.key=value (e.g. train.lr=0.001)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ParamsError(f"--set {text!r}: value is not valid YAML ({exc.problem})") from None
    return parts, value


def apply_overrides(raw: dict, overrides: list[str] | None) -> dict:
    for item in overrides or []:
        parts, value = parse_override(item)
        node = raw
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ParamsError(f"--set {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return raw


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys: a second `train:` section would silently replace
    the first.  A params file is small and hand-edited, so a repeated key is always a mistake."""

    def construct_mapping(self, node, deep=False):
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (YAML would keep only the last one)", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_params_file(path: str | Path) -> dict:
    """One params file as a dict of sections; a missing file, bad YAML or a repeated key is a
    one-line ParamsError."""
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: params file not found")
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ParamsError(f"{path}:{where} not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections (data, prepare, train, ...)")
    return raw


def _layer(base: dict, top: dict) -> dict:
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict) and key != "space":
            _layer(base[key], value)
        else:
            base[key] = value
    return base


def load_params(path: str | Path | Sequence[str | Path] = DEFAULT_PARAMS,
                overrides: list[str] | None = None) -> Params:
    """Read one params file, or several layered in order (later files win key by key: an overlay
    such as a GPU profile holds only what it changes), then the --set overrides; validate.
    Every failure is a one-line ParamsError naming the file."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    raw: dict = {}
    for p in paths:
        layer = read_params_file(p)
        params_from_dict(layer, source=str(p))  # a bad key names the file it is in
        _layer(raw, layer)
    source = " + ".join(str(p) for p in paths)
    return params_from_dict(apply_overrides(raw, overrides), source=source)


def params_from_dict(raw: dict, source: str = "params") -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(_format_error(err, source)) from None


def add_params_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--params", action="append", default=None, metavar="FILE",
                        help="params file (default: params.yaml); repeat to layer overlays, later files win "
                             "(--params params.yaml --params params/gpu-lab-crop.yaml)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override one parameter, same spelling as `dvc exp run -S` (repeatable); the value is YAML: "
             "a list prepare.full.size=[192,192], none data.manifest=null, text data.positive_class=osteo",
    )
    return parser


def params_files(args: argparse.Namespace) -> list[str]:
    return list(args.params or [DEFAULT_PARAMS])


def params_from_args(args: argparse.Namespace) -> Params:
    return load_params(params_files(args), args.overrides)


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested params -> {'train.lr': 0.001, ...} for MLflow and dvc-style display."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(value, dict) and value:
                out.update(flatten(value, name))
            else:
                out[name] = value
    else:
        out[prefix] = obj
    return out


def with_values(params: Params, values: dict[str, Any], source: str = "overrides") -> Params:
    """A re-validated copy of `params` with dotted keys set, e.g. {'train.lr': 3e-4}."""
    raw = params.model_dump(mode="json")
    for key, value in values.items():
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return params_from_dict(raw, source=source)
