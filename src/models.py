"""Model factory and checkpoints, shared by train, gradcam, register and predict.

Checkpoints are a plain state_dict (`model.pt`) plus `meta.json` describing how to
rebuild the network and how to turn a prepared image into its input.  torch.load is
weights_only by default, so nothing pickled beyond tensors goes into the .pt file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from src.errors import BoneHealthError
from src.fileio import atomic_path, atomic_write_json

CHECKPOINT_FILE = "model.pt"
META_FILE = "meta.json"
# Grey radiographs: one shared mean/std instead of ImageNet's per-channel RGB statistics.
DEFAULT_NORMALIZATION = {"mean": 0.5, "std": 0.25}
HF_CACHE_HINT = "~/.cache/huggingface/hub (or $HF_HOME/hub)"


class WeightsUnavailable(BoneHealthError):
    """Pretrained weights were asked for but are neither a local file nor cached."""


def create_model(
    name: str,
    num_classes: int,
    in_chans: int = 1,
    pretrained: bool = False,
    weights: str | None = None,
    drop_rate: float = 0.0,
) -> torch.nn.Module:
    """A timm classifier by name; weights from a local file, the local cache, or none.

    Downloads are off unless the user sets HF_HUB_OFFLINE=0 (src/__init__ defaults it
    to 1), so a missing cache fails in well under a second instead of retrying the hub.
    """
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise BoneHealthError(f"train.model: unknown timm model {name!r}" + (f"; similar: {', '.join(close)}" if close else ""))
    kwargs: dict[str, Any] = dict(num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate)
    if weights:
        path = Path(weights)
        if not path.is_file():
            raise WeightsUnavailable(f"train.weights: file not found: {path}")
        # timm adapts the stem to in_chans and drops a classifier of the wrong size.
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path.resolve())}, **kwargs)
    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs)
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as exc:  # hub/offline errors come in many types
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        how = (
            "downloads are off (HF_HUB_OFFLINE=1)" if offline else f"the download failed ({type(exc).__name__})"
        )
        raise WeightsUnavailable(
            f"train.pretrained: weights for {name!r} are not in the local cache {HF_CACHE_HINT} and {how}; "
            f"put the weights file on disk and set train.weights: /path/to/{name}.safetensors, "
            f"or fill the cache once on a networked machine with HF_HUB_OFFLINE=0"
        ) from None


def save_checkpoint(directory: str | Path, model: torch.nn.Module, meta: dict[str, Any]) -> Path:
    """Write model.pt then meta.json, each atomically; meta.json last marks it complete."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(directory / CHECKPOINT_FILE) as tmp:
        torch.save(state, tmp)
    atomic_write_json(directory / META_FILE, meta)
    return directory


def read_meta(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise BoneHealthError(f"{path}: checkpoint metadata not found (is this a bone-health checkpoint folder?)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BoneHealthError(f"{path}: not valid JSON ({exc.msg})") from None


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the network from meta.json and load its state_dict; returns (model.eval(), meta)."""
    directory = Path(directory)
    if directory.is_file():
        directory = directory.parent
    meta = read_meta(directory)
    weights = directory / CHECKPOINT_FILE
    if not weights.is_file():
        raise BoneHealthError(f"{weights}: checkpoint weights not found")
    model = create_model(meta["model"], num_classes=len(meta["classes"]), in_chans=int(meta.get("in_chans", 1)),
                         drop_rate=float(meta.get("drop_rate", 0.0)))
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.to(device).eval(), meta


def host_to_device(arr: np.ndarray, device: str | torch.device) -> torch.Tensor:
    """A host array as a tensor on `device`.  To CUDA the copy goes from pinned memory and does
    not block: a copy from pageable memory makes the CPU wait until the GPU has run every kernel
    queued before it, so the next step's Python and kernel launches could not overlap this
    step's GPU work.  torch's pinned-memory cache keeps the buffer until the copy is done."""
    arr = np.ascontiguousarray(arr)
    if not arr.flags.writeable:  # a read-only memmap slice: torch.from_numpy would warn
        arr = arr.copy()
    t = torch.from_numpy(arr)
    device = torch.device(device)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def to_input(images: np.ndarray, meta: dict[str, Any], device: str | torch.device = "cpu",
             channels_last: bool = False) -> torch.Tensor:
    """Prepared grey images (N,H,W) or (H,W), uint8/uint16/float -> normalised (N,C,h,w) float tensor."""
    arr = np.asarray(images)
    if arr.ndim == 2:
        arr = arr[None]
    # Integer images cross to the device as they are and become float there: a quarter (uint8)
    # of the bytes over PCIe and no float conversion on the CPU that also runs the augmentation.
    if arr.dtype == np.uint8:
        x = host_to_device(arr, device).float() / 255.0
    elif arr.dtype == np.uint16:
        x = host_to_device(arr.astype(np.int32), device).float() / 65535.0  # torch lacks uint16 ops
    else:
        x = host_to_device(arr.astype(np.float32, copy=False), device)
    x = x.unsqueeze(1)
    size = tuple(meta.get("input_size") or x.shape[-2:])
    if tuple(x.shape[-2:]) != size:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    norm = meta.get("normalization") or DEFAULT_NORMALIZATION
    x = (x - float(norm["mean"])) / float(norm["std"])
    if int(meta.get("in_chans", 1)) == 3:
        x = x.expand(-1, 3, -1, -1)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


@torch.no_grad()
def predict_proba(model: torch.nn.Module, images: np.ndarray, meta: dict[str, Any], batch_size: int = 32,
                  device: str | torch.device = "cpu") -> np.ndarray:
    """Class probabilities (N, num_classes) for prepared images, in eval mode."""
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = to_input(images[start:start + batch_size], meta, device=device)
        out.append(torch.softmax(model(x).float(), dim=1).cpu().numpy())
    n_classes = len(meta["classes"])
    return np.concatenate(out) if out else np.zeros((0, n_classes), dtype=np.float32)
