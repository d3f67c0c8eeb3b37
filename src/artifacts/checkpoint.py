"""A trained network on disk: `model.pt` (a plain state_dict) and `meta.json` (a `CheckpointMeta`).

meta.json says how to rebuild the network (timm name, classes, input channels, dropout) and
how to turn a prepared image into its input (input size, normalisation, and the store's own
preprocessing settings, so a raw radiograph can be prepared exactly like the training images).
torch.load is weights_only by default, so nothing pickled beyond tensors goes into model.pt.
meta.json is written last: its presence marks a complete checkpoint.
"""
from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from src.core.errors import BoneHealthError
from src.core.fileio import atomic_write_bytes, atomic_write_json, read_json_object

if TYPE_CHECKING:  # types only: torch is imported where tensors are read or written
    import torch

CHECKPOINT_FILE = "model.pt"
META_FILE = "meta.json"
# Grey radiographs: one shared mean/std instead of ImageNet's per-channel RGB statistics.
DEFAULT_NORMALIZATION = {"mean": 0.5, "std": 0.25}


@dataclass
class CheckpointMeta:
    """The typed contents of a checkpoint's meta.json (docs/ARCHITECTURE.md).

    `preprocessing` is a copy of the prepared store's meta (mode, size, dtype, data_root,
    manifest_sha256, and the prepare section under "preprocessing"); keys this version does
    not know (`extra`) are kept and written back, so newer files round-trip through older code.
    """
    model: str
    classes: list[str]
    in_chans: int = 1
    positive_class: str | None = None
    input_size: list[int] | None = None     # [h, w] fed to the network; None: the prepared size
    normalization: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_NORMALIZATION))
    preprocessing: dict[str, Any] = field(default_factory=dict)
    fold: int | None = None                 # the test fold it never saw; None: trained on all data
    drop_rate: float = 0.0
    best_epoch: int | None = None
    val_auc: float | None = None
    world_size: int = 1
    mlflow_run_id: str | None = None
    parent_run_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def positive_index(self) -> int | None:
        return self.classes.index(self.positive_class) if self.positive_class in self.classes else None

    @property
    def prepare_settings(self) -> dict[str, Any]:
        """The prepare-section dict that `preprocess_image` takes.  A checkpoint may carry the
        store's meta (the section nested under "preprocessing") or the section itself."""
        inner = self.preprocessing.get("preprocessing")
        return dict(inner) if isinstance(inner, dict) else dict(self.preprocessing)

    @property
    def mode(self) -> str | None:
        """'crop' or 'full': how the training images were cut from the radiographs."""
        return self.preprocessing.get("mode") or self.prepare_settings.get("mode")

    @property
    def manifest_sha256(self) -> str | None:
        """The prepared manifest the network was trained on (data provenance)."""
        return self.preprocessing.get("manifest_sha256")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "meta.json") -> "CheckpointMeta":
        if not isinstance(data, Mapping):
            raise BoneHealthError(f"{source}: expected a JSON object")
        for key in ("model", "classes"):
            if key not in data:
                raise BoneHealthError(f"{source}: key {key!r} missing (is this a bone-health checkpoint?)")
        if not isinstance(data["classes"], list) or not data["classes"]:
            raise BoneHealthError(f"{source}: 'classes' must be a non-empty list, got {data['classes']!r}")
        known = {f.name for f in fields(cls)} - {"extra"}
        values = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known and k != "num_classes"}
        extra.update(data.get("extra") or {})
        if values.get("normalization") is None:
            values.pop("normalization", None)
        if values.get("preprocessing") is None:
            values.pop("preprocessing", None)
        return cls(**values, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        extra = out.pop("extra")
        out["num_classes"] = self.num_classes  # for readers that only look at the JSON
        out.update(extra)
        return out

    def with_updates(self, **changes: Any) -> "CheckpointMeta":
        """A copy with fields set; names that are not fields go to `extra`."""
        known = {f.name for f in fields(self)}
        data = {k: v for k, v in asdict(self).items()}
        data["extra"] = dict(self.extra)
        for key, value in changes.items():
            if key in known:
                data[key] = value
            else:
                data["extra"][key] = value
        return CheckpointMeta(**data)


def save_checkpoint(directory: str | Path, state_dict: Mapping[str, "torch.Tensor"], meta: CheckpointMeta) -> Path:
    """Write model.pt then meta.json, each atomically; meta.json last marks it complete."""
    import torch  # here, not at the top: evaluate, register's checks and predict's listing read meta.json only
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    # Serialised in memory first: written by torch.save to a full disk it is a RuntimeError
    # ("PytorchStreamWriter failed"); written as bytes it is an ENOSPC naming the file and its size.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(directory / CHECKPOINT_FILE, buffer.getbuffer())
    atomic_write_json(directory / META_FILE, meta.to_dict())
    return directory


def read_meta(directory: str | Path) -> CheckpointMeta:
    path = Path(directory) / META_FILE
    data = read_json_object(path, "checkpoint metadata not found (is this a bone-health checkpoint folder?)")
    return CheckpointMeta.from_dict(data, str(path))


def is_complete(directory: str | Path) -> bool:
    return all((Path(directory) / name).is_file() for name in (CHECKPOINT_FILE, META_FILE))


def load_state(directory: str | Path) -> tuple[dict[str, "torch.Tensor"], CheckpointMeta]:
    """(state_dict on the CPU, meta) of a checkpoint folder, or of the folder of a model.pt."""
    directory = Path(directory)
    if directory.is_file():
        directory = directory.parent
    meta = read_meta(directory)
    weights = directory / CHECKPOINT_FILE
    if not weights.is_file():
        raise BoneHealthError(f"{weights}: checkpoint weights not found")
    import torch  # see save_checkpoint

    return torch.load(weights, map_location="cpu", weights_only=True), meta
