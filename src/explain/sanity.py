"""The model-parameter randomisation test (Adebayo et al., 2018, "Sanity checks for saliency
maps"): a map that barely changes when the network's learnt weights are replaced by random
ones from the top down shows the input's edges, not what the model learnt.

The cascade re-initialises the network's parameterised parts from the output towards the
input (classifier, head, the last stage, ... the stem), cumulatively, and compares each
step's map with the trained model's map by Spearman rank correlation.  The score of an image
is the mean |rho| over the steps: low is good (Adebayo et al. call a method that keeps a high
correlation a failure).  |rho| rather than rho: an inverted map has survived too.

Needs no ground truth, so it runs on real data as well as on the phantom.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch

from src.core.errors import BoneHealthError


def _has_parameters(module: torch.nn.Module) -> bool:
    return any(True for _ in module.parameters())


def cascade_groups(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The parameterised parts of `model` from the output to the input: its children in
    reverse order, a sequence of stages (timm's `blocks`, torchvision's `features`) split
    into its stages.  Execution order is registration order for timm and torchvision CNNs."""
    groups: list[tuple[str, torch.nn.Module]] = []
    for name, child in reversed(list(model.named_children())):
        if not _has_parameters(child):
            continue
        if isinstance(child, (torch.nn.Sequential, torch.nn.ModuleList)) and len(child) > 1:
            groups += [(f"{name}.{sub}", part) for sub, part in reversed(list(child.named_children()))
                       if _has_parameters(part)]
        else:
            groups.append((name, child))
    if not groups:
        raise BoneHealthError(f"randomisation test: {type(model).__name__} has no parameters to randomise")
    return groups


def cut_points(n_groups: int, steps: int | None) -> list[int]:
    """How many groups each cascade step has randomised: every group (steps None or >= the
    number of groups), else `steps` depths spread evenly, always ending with the whole model."""
    if steps is None or steps >= n_groups:
        return list(range(1, n_groups + 1))
    if steps < 1:
        raise BoneHealthError(f"gradcam.randomization_steps: {steps}; expected >= 1 (0 turns the test off)")
    return sorted({max(1, math.ceil(n_groups * (i + 1) / steps)) for i in range(steps)})


def _reinitialise(module: torch.nn.Module) -> None:
    for part in module.modules():
        reset = getattr(part, "reset_parameters", None)
        if callable(reset):
            reset()  # BatchNorm's also resets its running statistics
        elif hasattr(part, "reset_running_stats"):
            part.reset_running_stats()


@dataclass
class CascadeStep:
    label: str            # the deepest group randomised so far, e.g. "blocks.3"
    groups: int           # how many groups are random
    model: torch.nn.Module


def randomised_cascade(model: torch.nn.Module, steps: int | None, seed: int = 0) -> list[CascadeStep]:
    """Copies of `model` with its top 1.., then all, parameter groups re-initialised (the
    layers' own initialisers, seeded; the global RNG is left as it was)."""
    groups = cascade_groups(model)
    out = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        current = copy.deepcopy(model)
        names = [name for name, _ in groups]
        done = 0
        for depth in cut_points(len(groups), steps):
            for name in names[done:depth]:
                _reinitialise(current.get_submodule(name))
            done = depth
            out.append(CascadeStep(names[depth - 1], depth, copy.deepcopy(current).eval()))
    return out


def rank_similarity(reference: np.ndarray, other: np.ndarray) -> float:
    """|Spearman rho| between two maps of one shape; NaN when the reference is constant (no
    ranking to keep), 0.0 when only `other` is (nothing of the reference survived)."""
    from scipy.stats import spearmanr

    a, b = np.asarray(reference, dtype=np.float64).ravel(), np.asarray(other, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise BoneHealthError(f"randomisation test: maps of shapes {reference.shape} and {other.shape}")
    if np.ptp(a) == 0:
        return math.nan
    if np.ptp(b) == 0:
        return 0.0
    return float(abs(spearmanr(a, b).statistic))
