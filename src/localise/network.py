"""The localiser network: a timm backbone's stride 4/8/16 features, merged top-down (a small
feature pyramid) into maps at stride 4: the centre heat-map, the centre's offset inside its
cell and the box size (CenterNet's three heads, Zhou et al. 2019, for one object class).

timm's `features_only` models are the well-kept component here: any of its backbones plugs
in by name, and the head is ~30 k parameters.  A detector (torchvision Faster R-CNN, keypoint
R-CNN) would predict box sizes and several objects, neither of which we need: the crop is a
fixed square around the box centre, so the centre is the answer that matters; the size head
only gives the box that IoU is scored on.
"""
from __future__ import annotations

import math

import timm
import torch
import torch.nn.functional as F
from torch import nn

STRIDE = 4          # heat-map cell = 4 overview pixels
FEATURES = (1, 2, 3)  # timm feature levels at strides 4, 8, 16
WIDTH = 32
OUTPUTS = 5         # centre logit | offset x, y | log size w, h
PRIOR = 0.01        # initial cell probability (CenterNet's bias init: early loss not swamped by background)


class Localiser(nn.Module):
    def __init__(self, backbone: str, in_chans: int = 1):
        super().__init__()
        self.backbone = timm.create_model(backbone, features_only=True, out_indices=FEATURES,
                                          in_chans=in_chans, pretrained=False)
        reductions = self.backbone.feature_info.reduction()
        if reductions[0] != STRIDE:
            raise ValueError(f"locate.model {backbone}: its first feature level has stride {reductions[0]}, "
                             f"need {STRIDE} (a timm CNN with features_only)")
        self.lateral = nn.ModuleList(nn.Conv2d(c, WIDTH, 1) for c in self.backbone.feature_info.channels())
        # One 3x3 trunk shared by the three outputs: CenterNet gives each its own, which at stride 4
        # cost more than the backbone (135 against 99 ms per step of 8 at 128x256 on 2 cores).
        self.trunk = nn.Sequential(nn.Conv2d(WIDTH, WIDTH, 3, padding=1, bias=False), nn.BatchNorm2d(WIDTH),
                                   nn.ReLU(inplace=True))
        self.head = nn.Conv2d(WIDTH, OUTPUTS, 1)
        with torch.no_grad():
            self.head.bias.zero_()
            self.head.bias[0] = -math.log((1 - PRIOR) / PRIOR)
        self.to(memory_format=torch.channels_last)  # see overview.to_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.backbone(x)
        merged = self.lateral[-1](feats[-1])
        for lateral, f in zip(reversed(self.lateral[:-1]), reversed(feats[:-1])):
            merged = lateral(f) + F.interpolate(merged, size=f.shape[-2:], mode="bilinear", align_corners=False)
        # channels: centre logit | offset x, y (fraction of a cell) | log box width, height (cells)
        return self.head(self.trunk(merged))
