"""Heat maps for one model and one image: the pytorch-grad-cam methods by name, plus the
plain input-gradient saliency (Simonyan et al. 2014) that the lab's scripts used.

Everything here is free of params, files and MLflow so that the Grad-CAM stage, the
single-image mode and `src.predict --cam` share one implementation.
"""
from __future__ import annotations

import contextlib
import difflib
import io
import re

import numpy as np
import torch

from src.artifacts.checkpoint import CheckpointMeta
from src.core.errors import BoneHealthError
from src.model.factory import to_input

# Our name -> pytorch-grad-cam class name; each is BaseCAM with one overridden piece.
CAM_CLASSES = {
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "hirescam": "HiResCAM",
    "layercam": "LayerCAM",
    "eigencam": "EigenCAM",  # class-agnostic: the first principal component of the activations
    "scorecam": "ScoreCAM",  # gradient-free: one forward pass per channel of the target layer
}
METHODS = (*CAM_CLASSES, "saliency")
# timm classes whose final feature map is `bn2` (conv_head -> BatchNorm + activation).
BN2_MODELS = ("EfficientNet",)


def check_method(method: str) -> str:
    if method not in METHODS:
        raise BoneHealthError(f"gradcam.method: unknown method {method!r}; allowed: {', '.join(METHODS)}")
    return method


def _spatial_outputs(model: torch.nn.Module, input_shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
    """(module name, output shape) of every sub-module with a 4-D output, in execution order."""
    seen: list[tuple[str, tuple[int, ...]]] = []
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue

        def hook(_m, _i, out, name=name):
            if isinstance(out, torch.Tensor) and out.ndim == 4:
                seen.append((name, tuple(out.shape)))

        handles.append(module.register_forward_hook(hook))
    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            model(torch.zeros(input_shape, device=device))
    finally:
        for h in handles:
            h.remove()
    return seen


def _layer_by_stride(model: torch.nn.Module, stride: int, spatial: list[tuple[str, tuple[int, ...]]],
                     input_shape: tuple[int, ...]) -> str | None:
    """The module ending the stage at `stride`: timm's feature_info names it (the stage's output,
    not an expansion conv inside the next stage); otherwise the last module whose map is the
    input divided by the stride."""
    info = getattr(model, "feature_info", None)
    try:
        named = [(int(i["reduction"]), i["module"]) for i in info] if info is not None else []
    except (TypeError, KeyError):  # not timm's list of dicts
        named = []
    matches = [module for reduction, module in named if reduction == stride]
    if matches:
        return matches[-1]
    want = tuple(-(-int(v) // stride) for v in input_shape[-2:])
    # more than one pixel: squeeze-and-excitation convs output (N, C, 1, 1) at every depth
    fitting = [n for n, shape in spatial if tuple(shape[-2:]) == want and shape[-1] * shape[-2] > 1]
    return fitting[-1] if fitting else None


def resolve_target_layers(model: torch.nn.Module, spec: str | list[str] | None,
                          input_shape: tuple[int, ...]) -> list[tuple[str, torch.nn.Module]]:
    """gradcam.target_layer -> [(name, module)]: null (the default), a dotted module name,
    `stride<N>` (the output of the stage at that stride: `stride8` is a 16x16 map at 128 px,
    for any timm CNN), or a list of those (the CAM of each, scaled and averaged: multi-layer
    fusion)."""
    specs = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    if not specs:
        raise BoneHealthError("gradcam.target_layer: an empty list; name a layer, a stride or null")
    spatial = _spatial_outputs(model, input_shape)  # one probing forward pass for every name
    out = [resolve_target_layer(model, s, input_shape, spatial) for s in specs]
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise BoneHealthError(f"gradcam.target_layer: {spec!r} names the layer {names} more than once")
    return out


def resolve_target_layer(model: torch.nn.Module, name: str | None, input_shape: tuple[int, ...],
                         spatial: list[tuple[str, tuple[int, ...]]] | None = None) -> tuple[str, torch.nn.Module]:
    """The layer whose activations the CAM weighs: a dotted name, `stride<N>`, bn2 for timm
    EfficientNets, otherwise the last module whose output is still a spatial (N, C, H>1 or W>1) map.

    The spatial condition matters: MobileNetV3-style heads run a 1x1 conv *after* global
    pooling, so "last 4-D output" alone would pick a 1x1 map that explains nothing.
    `spatial`: the model's 4-D outputs at this input, when the caller already probed them.
    """
    spatial = _spatial_outputs(model, input_shape) if spatial is None else spatial
    shapes = dict(spatial)
    usable = [n for n, shape in spatial if shape[-1] * shape[-2] > 1]
    default = "bn2" if type(model).__name__ in BN2_MODELS and "bn2" in shapes else (usable[-1] if usable else None)
    stride = re.fullmatch(r"stride(\d+)", name) if name else None
    if stride:
        found = _layer_by_stride(model, int(stride.group(1)), spatial, input_shape)
        if found is None or found not in shapes:
            have = sorted({int(input_shape[-1]) // s[-1] for _, s in spatial if s[-1] * s[-2] > 1})
            raise BoneHealthError(f"gradcam.target_layer: {type(model).__name__} has no stage at {name} for input "
                                  f"{list(input_shape[-2:])}; strides there: {', '.join(f'stride{s}' for s in have)}")
        return found, model.get_submodule(found)
    if name:
        names = [n for n, _ in model.named_modules() if n]
        if name not in names:
            close = difflib.get_close_matches(name, names, n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise BoneHealthError(f"gradcam.target_layer: {name!r} is not a module of {type(model).__name__}{hint}")
        if name not in shapes:
            example = f"; pick a convolutional layer, e.g. {default!r}" if default else ""
            raise BoneHealthError(f"gradcam.target_layer: {name!r} does not output a 4-D feature map (N, C, H, W){example}")
        return name, model.get_submodule(name)
    if default is None:
        raise BoneHealthError(
            f"gradcam.target_layer: {type(model).__name__} has no spatial feature map at input {list(input_shape[-2:])}; "
            f"use larger images or name a layer"
        )
    return default, model.get_submodule(default)


def _normalise(cam: np.ndarray) -> np.ndarray:
    """Non-negative map -> divided by its peak (zero stays "no attribution", unlike min-max)."""
    cam = np.clip(np.asarray(cam, dtype=np.float32), 0.0, None)
    peak = float(cam.max())
    return cam / peak if peak > 0 else cam


def input_gradient_saliency(model: torch.nn.Module, x: torch.Tensor, target: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    """|d logit_target / d input|, max over channels, scaled to [0, 1] (Simonyan et al., 2014)."""
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        target = int(logits[0].argmax()) if target is None else int(target)
        model.zero_grad(set_to_none=True)
        logits[0, target].backward()
    saliency = x.grad.detach().abs().amax(dim=1)[0].cpu().numpy()
    model.zero_grad(set_to_none=True)
    probs = torch.softmax(logits.detach().float(), dim=1)[0].cpu().numpy()
    return _normalise(saliency), probs, target


def explain_tensor(model: torch.nn.Module, x: torch.Tensor, method: str,
                   layer: torch.nn.Module | list[torch.nn.Module] | None,
                   target: int | None = None, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray, int]:
    """One input (1, C, h, w) -> (map (h, w) in [0, 1], class probabilities, explained class).

    target None explains the predicted class.  Several layers: pytorch-grad-cam scales each
    layer's map to [0, 1] and averages them (multi-layer fusion, as LayerCAM's paper does).
    """
    check_method(method)
    model.eval()
    if method == "saliency":
        return input_gradient_saliency(model, x, target)
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    layers = list(layer) if isinstance(layer, (list, tuple)) else [layer]
    if not layers or any(m is None for m in layers):
        raise BoneHealthError(f"gradcam.method {method!r} needs a target layer")
    cam = getattr(pytorch_grad_cam, CAM_CLASSES[method])(model=model, target_layers=layers)
    cam.batch_size = batch_size  # only ScoreCAM reads it
    # Not `with cam:`: BaseCAM.__exit__ swallows IndexError and would hide a real failure.
    try:
        # ScoreCAM draws a tqdm bar per image on stderr; the stage's own output is enough.
        quiet = contextlib.redirect_stderr(io.StringIO()) if method == "scorecam" else contextlib.nullcontext()
        with torch.enable_grad(), quiet:
            # targets=None makes BaseCAM explain its own argmax: no extra forward pass.
            maps = cam(input_tensor=x, targets=None if target is None else [ClassifierOutputTarget(int(target))])
        logits = cam.outputs.detach().float()
        target = int(logits[0].argmax()) if target is None else int(target)
        probs = torch.softmax(logits, dim=1)[0].cpu().numpy()
    finally:
        cam.activations_and_grads.release()
        model.zero_grad(set_to_none=True)
    return _normalise(maps[0]), probs, int(target)


def resize_map(cam: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a [0, 1] map to (H, W); stays in [0, 1]."""
    import cv2

    if tuple(cam.shape) == tuple(shape):
        return cam.astype(np.float32, copy=False)
    out = cv2.resize(cam.astype(np.float32), (int(shape[1]), int(shape[0])), interpolation=cv2.INTER_LINEAR)
    return np.clip(out, 0.0, 1.0)


def explain_image(model: torch.nn.Module, meta: CheckpointMeta, image_array: np.ndarray, method: str = "gradcam",
                  target_layer: str | list[str] | torch.nn.Module | None = None, target: int | None = None,
                  batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """A prepared image (H, W) as stored by `prepare` / returned by `preprocess_image` ->
    (heat map (H, W) float32 in [0, 1], class probabilities in meta.classes order).

    target_layer: a module, or what gradcam.target_layer takes (resolve_target_layers).
    target: class index to explain; None explains the predicted class.
    """
    image_array = np.asarray(image_array)
    if image_array.ndim != 2:
        raise BoneHealthError(f"explain_image: expected one grey image (H, W), got shape {image_array.shape}")
    device = next(model.parameters()).device
    x = to_input(image_array, meta, device=device)
    layer = None
    if method != "saliency":
        check_method(method)
        if isinstance(target_layer, torch.nn.Module):
            layer = target_layer
        else:
            layer = [m for _, m in resolve_target_layers(model, target_layer, tuple(x.shape))]
    cam, probs, _ = explain_tensor(model, x, method, layer, target=target, batch_size=batch_size)
    return resize_map(cam, image_array.shape), probs


def explain_ensemble(members: list[tuple[torch.nn.Module, CheckpointMeta]], image_array: np.ndarray,
                     method: str = "gradcam", target_layer: str | list[str] | None = None, target: int | None = None,
                     batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """The map of a fold ensemble: each member's map for ONE class (target, else the class of
    the mean probabilities), averaged and rescaled to [0, 1]; returns (map, mean probabilities)."""
    if not members:
        raise BoneHealthError("explain_ensemble: no models given")
    probs = np.mean([_probabilities(model, meta, image_array) for model, meta in members], axis=0)
    target = int(np.argmax(probs)) if target is None else int(target)
    maps = [explain_image(model, meta, image_array, method, target_layer, target=target, batch_size=batch_size)[0]
            for model, meta in members]
    return _normalise(np.mean(maps, axis=0)), probs


def _probabilities(model: torch.nn.Module, meta: CheckpointMeta, image_array: np.ndarray) -> np.ndarray:
    x = to_input(np.asarray(image_array), meta, device=next(model.parameters()).device)
    with torch.no_grad():
        return torch.softmax(model.eval()(x).float(), dim=1)[0].cpu().numpy()
