"""Semantic FPN (the official XCiT segmenter, mmseg's FPNHead) over any of our `features_only` backbones.

The pyramid goes through torchvision's FeaturePyramidNetwork (out channels = the backbone's
width in the official configs). Each level then gets conv 3x3 - BatchNorm - ReLU units, each
followed by a 2x bilinear upsampling, until it reaches stride 4 (one unit and no upsampling
at stride 4 itself); the levels are summed, dropped out at 0.1 and classified by a 1x1 conv;
the logits are resized to the input. Train it with cross-entropy and ignore index 255.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import FeaturePyramidNetwork


def _unit(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True)]


class SemanticFPN(nn.Module):
    """(B, 3, H, W) images -> (B, num_classes, H, W) logits."""

    def __init__(self, backbone: nn.Module, num_classes: int, fpn_channels: int | None = None,
                 channels: int = 128, dropout: float = 0.1):
        super().__init__()
        self.backbone = backbone
        widths = [info['num_chs'] for info in backbone.feature_info]
        self.strides = [info['reduction'] for info in backbone.feature_info]
        fpn_channels = fpn_channels or widths[-1]
        self.fpn = FeaturePyramidNetwork(widths, fpn_channels)
        base = self.strides[0]
        self.scale_heads = nn.ModuleList()
        for stride in self.strides:
            layers: list[nn.Module] = []
            for k in range(max(1, int(math.log2(stride // base)))):
                layers += _unit(fpn_channels if k == 0 else channels, channels)
                if stride > base:
                    layers.append(nn.Upsample(scale_factor=2, mode='bilinear', align_corners=False))
            self.scale_heads.append(nn.Sequential(*layers))
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        features = self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.backbone(x))))
        maps = list(features.values())  # (B, fpn_channels, H / s_i, W / s_i)
        fused = self.scale_heads[0](maps[0])  # (B, channels, H / 4, W / 4)
        for head, level in zip(self.scale_heads[1:], maps[1:]):
            fused = fused + F.interpolate(head(level), size=fused.shape[-2:], mode='bilinear', align_corners=False)
        logits = self.classifier(self.dropout(fused))
        return F.interpolate(logits, size=(H, W), mode='bilinear', align_corners=False)  # (B, K, H, W)


def build_segmenter(backbone: str | nn.Module, num_classes: int, **kwargs) -> SemanticFPN:
    """Semantic FPN over `backbone`: a registered name, built with `features_only=True`, or such a module."""
    if isinstance(backbone, str):
        from ..factory import create_model
        backbone = create_model(backbone, features_only=True)
    return SemanticFPN(backbone, num_classes, **kwargs)
