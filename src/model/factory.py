"""The network and its input: timm models by name (offline-safe weights), a checkpoint back
into a network, prepared images into normalised tensors, and probabilities out; shared by
training, Grad-CAM, the registered model and predict."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from huggingface_hub import constants as hf_constants

from src.artifacts.checkpoint import CheckpointMeta, load_state
from src.core.errors import BoneHealthError
from src.core.offline import offline_defaults

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

    Downloads are off unless the user sets HF_HUB_OFFLINE=0 (`offline_defaults`), so a
    missing cache fails in well under a second instead of retrying the hub.
    """
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise BoneHealthError(f"train.model: unknown timm model {name!r}" + (f"; similar: {', '.join(close)}" if close else ""))
    kwargs: dict[str, Any] = dict(num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate)
    if weights:
        path = Path(weights)
        if not path.is_file():
            raise WeightsUnavailable(f"train.weights: file not found: {path}")
        try:
            # timm adapts the stem to in_chans and drops a classifier of the wrong size.
            return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path.resolve())},
                                     **kwargs)
        except Exception as exc:  # a pickle, zip, safetensors or key-mismatch error: each its own type
            raise WeightsUnavailable(
                f"train.weights: {path} is not a weights file for {name!r} (a state_dict as .safetensors, .pth "
                f"or .bin): {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:400]) from None
    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs)
    offline_defaults()
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    # huggingface_hub reads HF_HUB_OFFLINE once, when it is first imported (timm imports it), which
    # may have been before the default above was set: make the hub agree with the environment.
    hf_constants.HF_HUB_OFFLINE = offline
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as exc:  # hub/offline errors come in many types
        how = (
            "downloads are off (HF_HUB_OFFLINE=1)" if offline else f"the download failed ({type(exc).__name__})"
        )
        raise WeightsUnavailable(
            f"train.pretrained: weights for {name!r} are not in the local cache {HF_CACHE_HINT} and {how}; "
            f"put the weights file on disk and set train.weights: /path/to/{name}.safetensors, "
            f"or fill the cache once on a networked machine with HF_HUB_OFFLINE=0"
        ) from None


def reset_head(model: torch.nn.Module, std: float = 0.01) -> None:
    """Start the classifier near zero so the first predictions are ~uniform.

    timm's EfficientNet initialises the head uniformly in +-1/sqrt(num_classes): fine for
    1000 classes, but with two it gives train-mode logits of +-5 and a first-epoch loss of
    3-6 that wrecks the early BatchNorm statistics.  The head is always new here (timm drops
    a pretrained head of another size), so this costs pretrained users nothing.
    """
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(head, torch.nn.Linear):
        torch.nn.init.normal_(head.weight, std=std)
        torch.nn.init.zeros_(head.bias)


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, CheckpointMeta]:
    """Rebuild the network from meta.json and load its state_dict; returns (model.eval(), meta)."""
    state, meta = load_state(directory)
    model = create_model(meta.model, num_classes=meta.num_classes, in_chans=meta.in_chans, drop_rate=meta.drop_rate)
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


def to_unit(images: np.ndarray | torch.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
    """Prepared grey images (N,H,W) or (H,W), uint8/uint16/float (a host array, or a tensor
    already on the device) -> (N,1,H,W) float32 in [0, 1] on `device`."""
    if isinstance(images, torch.Tensor):
        t = images.to(device, non_blocking=True)
        if t.ndim == 2:
            t = t[None]
        scale = {torch.uint8: 255.0, torch.int32: 65535.0, torch.uint16: 65535.0}.get(t.dtype)
        return (t.float() / scale if scale else t.float()).unsqueeze(1)
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
    return x.unsqueeze(1)


def normalise_input(x: torch.Tensor, meta: CheckpointMeta, channels_last: bool = False) -> torch.Tensor:
    """(N,1,H,W) in [0, 1] -> the network's input: resized to meta.input_size, normalised,
    expanded to its channels."""
    size = tuple(meta.input_size or x.shape[-2:])
    if tuple(x.shape[-2:]) != size:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    x = (x - float(meta.normalization["mean"])) / float(meta.normalization["std"])
    if meta.in_chans == 3:
        x = x.expand(-1, 3, -1, -1)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def to_input(images: np.ndarray | torch.Tensor, meta: CheckpointMeta, device: str | torch.device = "cpu",
             channels_last: bool = False) -> torch.Tensor:
    """Prepared grey images (N,H,W) or (H,W), uint8/uint16/float -> normalised (N,C,h,w) float tensor."""
    return normalise_input(to_unit(images, device), meta, channels_last)


@torch.no_grad()
def predict_proba(model: torch.nn.Module, images: np.ndarray, meta: CheckpointMeta, batch_size: int = 32,
                  device: str | torch.device = "cpu") -> np.ndarray:
    """Class probabilities (N, num_classes) for prepared images, in eval mode."""
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = to_input(images[start:start + batch_size], meta, device=device)
        out.append(torch.softmax(model(x).float(), dim=1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, meta.num_classes), dtype=np.float32)
