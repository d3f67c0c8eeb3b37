"""The one place every setting is declared, typed and validated.

params.yaml is namespaced by stage; each section is a pydantic model that forbids
unknown keys, so a typo stops the run with one line naming the key and what is
allowed instead of being silently ignored.  `--set section.key=value` overrides use
the same spelling as `dvc exp run -S`.
"""
from __future__ import annotations

import argparse
import difflib
import warnings
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from src.core.errors import BoneHealthError

DEFAULT_PARAMS = "params.yaml"


class ParamsError(BoneHealthError):
    """A params file or override that does not validate."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- data
class DataParams(Section):
    root: str = "data/phantom"
    manifest: Optional[str] = "data/phantom/manifest.csv"
    annotations: Optional[str] = "data/phantom/annotations.json"
    patient_regex: Optional[str] = None
    classes: Optional[list[str]] = None
    positive_class: str = "C3"
    name: Optional[str] = None
    extensions: list[str] = Field(
        default_factory=lambda: [".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom"]
    )
    on_bad_file: Literal["stop", "skip"] = "stop"
    on_label_conflict: Literal["stop", "skip"] = "stop"


# ------------------------------------------------------------------------ phantom
class PhantomParams(Section):
    out: str = "data/phantom"
    masks_out: str = "data/phantom_masks"
    seed: int = 0
    classes: list[str] = Field(default_factory=lambda: ["C1", "C3"], min_length=2, max_length=2)
    patients_per_class: int = Field(80, ge=1)
    followup_fraction: float = Field(0.25, ge=0.0, le=1.0)
    max_images_per_patient: int = Field(3, ge=1)
    width: int = Field(1024, ge=256, le=4096)
    height: int = Field(512, ge=128, le=2048)
    separation: float = Field(1.2, ge=0.0)
    bit_depth: Literal[8, 16] = 8
    field_width_mm: float = Field(290.0, gt=0)  # detector width: 0.1 mm/px at 2900 px
    cortical_width_mm: tuple[float, float] = (1.5, 5.0)  # [most osteoporotic, healthiest]
    nuisance: float = Field(1.0, ge=0.0, le=3.0)
    box_side: Literal["random", "left", "right"] = "random"

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
    downscale: Optional[float] = Field(3.0, gt=0)
    size: Optional[tuple[int, int]] = None  # [height, width]; wins over downscale

    @model_validator(mode="after")
    def _one_of(self):
        if self.downscale is None and self.size is None:
            raise ValueError("set prepare.full.downscale or prepare.full.size [height, width]")
        if self.size is not None and min(self.size) < 8:
            raise ValueError("prepare.full.size must be [height, width] with both >= 8")
        return self


class CropParams(Section):
    side: int = Field(600, ge=8)
    reference_width: Optional[int] = Field(2900, ge=1)
    size: int = Field(128, ge=8, le=2048)


class RollingBallParams(Section):
    enabled: bool = False
    radius: int = Field(50, ge=1)
    shrink: Optional[int] = Field(None, ge=1, le=16)  # None: ImageJ's factor for the radius; 1: exact (slow)


class ClaheParams(Section):
    enabled: bool = False
    clip_limit: float = Field(2.0, gt=0)
    tile_grid: int = Field(8, ge=1)


class PrepareParams(Section):
    out: str = "data/prepared"
    mode: Literal["full", "crop"] = "crop"
    full: FullParams = Field(default_factory=FullParams)
    crop: CropParams = Field(default_factory=CropParams)
    rolling_ball: RollingBallParams = Field(default_factory=RollingBallParams)
    clahe: ClaheParams = Field(default_factory=ClaheParams)
    dtype: Literal["uint8", "uint16"] = "uint8"
    folds: int = Field(5, ge=2, le=20)  # K of the K-fold CV: test folds are assigned here, with the data
    fold_seed: int = 42
    workers: int = Field(1, ge=1, le=64)  # decode+preprocess processes; rows are written in file order


# -------------------------------------------------------------------------- train
class AugmentParams(Section):
    enabled: bool = True
    strength: float = Field(0.5, ge=0.0, le=3.0)
    vflip: float = Field(0.5, ge=0.0, le=1.0)
    hflip: float = Field(0.0, ge=0.0, le=1.0)
    rotate_limit: float = Field(10.0, ge=0.0, le=180.0)
    affine: float = Field(0.5, ge=0.0, le=1.0)
    brightness_contrast: float = Field(0.5, ge=0.0, le=1.0)
    gamma: float = Field(0.3, ge=0.0, le=1.0)
    clahe: float = Field(0.0, ge=0.0, le=1.0)
    noise: float = Field(0.2, ge=0.0, le=1.0)
    blur: float = Field(0.1, ge=0.0, le=1.0)


class TrainParams(Section):
    out: str = "models"
    val_fraction: float = Field(0.2, gt=0.0, lt=0.6)
    model: str = "efficientnet_b0"
    pretrained: bool = False
    weights: Optional[str] = None
    in_chans: Literal[1, 3] = 1
    image_size: Optional[int] = Field(None, ge=16, le=2048)
    drop_rate: float = Field(0.2, ge=0.0, lt=1.0)
    epochs: int = Field(12, ge=1)
    batch_size: int = Field(8, ge=1)
    optimizer: Literal["adam", "adamw", "sgd"] = "adamw"
    lr: float = Field(3e-3, gt=0.0, le=10.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    scheduler: Literal["plateau", "cosine", "none"] = "cosine"
    plateau_factor: float = Field(0.1, gt=0.0, lt=1.0)
    plateau_patience: int = Field(5, ge=0)
    warmup_epochs: int = Field(1, ge=0)
    early_stopping_patience: int = Field(0, ge=0)  # 0 disables
    class_balance: Literal["none", "weights", "sampler"] = "weights"
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    grad_clip: Optional[float] = Field(None, gt=0.0)
    ema_decay: Optional[float] = Field(0.99, gt=0.0, lt=1.0)  # None: no weight averaging
    seed: int = 0
    deterministic: bool = False
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    channels_last: bool = True
    num_workers: int = Field(0, ge=0)
    threads: Optional[int] = Field(None, ge=1)  # None: torch's default (all cores)
    devices: int = Field(1, ge=1)  # data-parallel processes; >1 relaunches through torchrun
    sync_bn: bool = False          # SyncBatchNorm across processes (CUDA only)
    fold_parallel: int = Field(1, ge=1)  # folds trained at once, one worker process each
    augment: AugmentParams = Field(default_factory=AugmentParams)


# ----------------------------------------------------------------------- evaluate
class EvaluateParams(Section):
    out: str = "reports"
    threshold: float = Field(0.5, gt=0.0, lt=1.0)
    bootstrap: int = Field(2000, ge=0)
    ci: float = Field(0.95, gt=0.5, lt=1.0)
    calibration_bins: int = Field(10, ge=2)
    seed: int = 0


# ------------------------------------------------------------------------ gradcam
class GradcamParams(Section):
    out: str = "reports/gradcam"
    per_class: int = Field(20, ge=1)
    seed: int = 0
    method: Literal["gradcam", "gradcam++", "hirescam", "layercam", "eigencam", "scorecam", "saliency"] = "gradcam"
    target_layer: Optional[str] = None
    masks: Optional[str] = "data/phantom_masks"
    alpha: float = Field(0.4, ge=0.0, le=1.0)
    target: Literal["predicted", "true", "positive"] = "predicted"
    perturbation: Literal["road", "confidence_change", "none"] = "road"
    road_percentiles: list[int] = Field(default_factory=lambda: [50], min_length=1)
    batch_size: int = Field(32, ge=1)

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


class TuneParams(Section):
    out: str = "tune"
    study_name: str = "bone-health"
    storage: Optional[str] = None  # None: a journal file under `out`; or sqlite:/postgresql:/mysql: URL
    n_trials: int = Field(20, ge=1)
    timeout: Optional[float] = Field(None, gt=0)
    n_workers: int = Field(1, ge=1)
    sampler_seed: int = 0
    n_startup_trials: int = Field(5, ge=0)  # random trials before TPE models the space
    pruner: Literal["wilcoxon", "median", "none"] = "wilcoxon"
    # The exact one-sided Wilcoxon p of a trial that lost all n folds to the best is 2**-n
    # (0.25 after 2 folds, 0.125 after 3).  Above 0.25 a trial that lost its first 2 of 5
    # folds stops there and saves 3; 0.2 could never prune before fold 3.  Every value in
    # (0.25, 0.3125] makes the same decisions up to 4 folds: 0.3 is one of them.
    pruner_p_threshold: float = Field(0.3, gt=0.0, lt=1.0)
    pruner_startup_steps: int = Field(2, ge=1)  # folds before any pruning (Wilcoxon needs 2)
    # Median pruner only: completed trials before it may prune.  The pruner's own count, not
    # the sampler's n_startup_trials: 3 is the first count whose median is a middle value
    # rather than one trial's or the mean of two.
    pruner_startup_trials: int = Field(3, ge=1)
    # Also stop a trial that can no longer beat the best completed trial's mean even if every
    # fold left scored the maximum AUC (1.0).  Exact: it never stops a possible winner.
    prune_unreachable: bool = True
    # Each trial trains its folds in its own seeded order (Optuna's advice for the Wilcoxon
    # pruner): otherwise every trial is judged on the same first folds, and a pair of easy or
    # tied folds there decides the pruning of all of them.  Fold k stays fold k (step = fold).
    # Wilcoxon and none only: the median pruner reads steps as progress and keeps 0..K-1.
    shuffle_folds: bool = True
    objective: Literal["val_auc", "test_auc"] = "val_auc"
    epochs: Optional[int] = Field(None, ge=1)
    heartbeat_interval: float = Field(10.0, gt=0)
    grace_period: float = Field(60.0, gt=0)
    max_retry: int = Field(2, ge=0)
    keep_checkpoints: bool = False
    space: dict[str, SpaceEntry] = Field(default_factory=dict)


# ----------------------------------------------------------------------- register
class GateParams(Section):
    metric: str = "oof_roc_auc"
    direction: Literal["maximize", "minimize"] = "maximize"
    min_gain: float = Field(0.0, ge=0.0)
    sensitivity_metric: str = "oof_sensitivity"
    max_sensitivity_drop: float = Field(0.02, ge=0.0, le=1.0)


class RegisterParams(Section):
    name: str = "bone-health"
    strategy: Literal["ensemble", "refit"] = "ensemble"
    out: str = "reports/register"
    challenger_alias: str = Field("challenger", pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$")
    champion_alias: str = Field("champion", pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$")
    batch_size: int = Field(16, ge=1)
    example_size: tuple[int, int] = (256, 512)
    gate: GateParams = Field(default_factory=GateParams)

    @model_validator(mode="after")
    def _distinct_aliases(self):
        if self.challenger_alias == self.champion_alias:
            raise ValueError("register.challenger_alias and register.champion_alias must differ")
        if min(self.example_size) < 16:
            raise ValueError("register.example_size must be [height, width] with both >= 16")
        return self


# ------------------------------------------------------------------------- mlflow
class MlflowParams(Section):
    tracking_uri: str = "sqlite:///mlruns/mlflow.db"  # MLFLOW_TRACKING_URI wins when set
    artifact_root: str = "mlruns/artifacts"
    experiment: str = "bone-health"


# `register` is also ABCMeta.register on the class; as a field it is only ever read as data.
warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)


class Params(Section):
    data: DataParams = Field(default_factory=DataParams)
    phantom: PhantomParams = Field(default_factory=PhantomParams)
    prepare: PrepareParams = Field(default_factory=PrepareParams)
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
        return f"{source}: {msg}" if key == "<root>" else f"{source}: {key}: {msg}"
    return f"{source}: {key}: {msg} (got {first.get('input')!r})"


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


def load_params(path: str | Path = DEFAULT_PARAMS, overrides: list[str] | None = None) -> Params:
    """Read, override and validate; every failure is a one-line ParamsError."""
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ParamsError(f"{path}:{where} not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections (data, prepare, train, ...)")
    return params_from_dict(apply_overrides(raw, overrides), source=str(path))


def params_from_dict(raw: dict, source: str = "params") -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(_format_error(err, source)) from None


def add_params_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--params", default=DEFAULT_PARAMS, help="params file (default: params.yaml)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override one parameter, same spelling as `dvc exp run -S` (repeatable)",
    )
    return parser


def params_from_args(args: argparse.Namespace) -> Params:
    return load_params(args.params, args.overrides)


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
