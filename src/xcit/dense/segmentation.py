"""Semantic FPN and UperNet (the official XCiT segmenters, mmseg's FPNHead and UPerHead) over any of our
`features_only` backbones.

Semantic FPN:
The pyramid goes through torchvision's FeaturePyramidNetwork (out channels = the backbone's
width in the official configs). Each level then gets conv 3x3 - BatchNorm - ReLU units, each
followed by a 2x bilinear upsampling, until it reaches stride 4 (one unit and no upsampling
at stride 4 itself); the levels are summed, dropped out at 0.1 and classified by a 1x1 conv;
the logits are resized to the input.

UperNet: no neck. A pyramid pooling module (average pools of 1, 2, 3 and 6 cells, each conv 1x1 -
BN - ReLU and upsampled back) over the stride-32 map, 1x1 laterals on the others, a top-down
path, 3x3 convs, all levels upsampled to stride 4, concatenated and fused by a 3x3 conv, then
dropout 0.1 and a 1x1 classifier. In training an auxiliary FCN head on the stride-16 map (one
3x3 conv of 256, dropout 0.1, 1x1) adds its loss at weight 0.4, as the official recipe has it.
Train either with cross-entropy and ignore index 255.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import FeaturePyramidNetwork


def _unit(in_channels: int, out_channels: int, kernel: int = 3) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


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


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=size, mode='bilinear', align_corners=False)


class UperNet(nn.Module):
    """(B, 3, H, W) images -> (B, num_classes, H, W) logits; in training with the auxiliary head,
    {'out': logits, 'aux': the auxiliary head's logits}, which the loss weighs 1 and `aux_weight`."""

    def __init__(self, backbone: nn.Module, num_classes: int, channels: int = 512,
                 pool_scales: tuple[int, ...] = (1, 2, 3, 6), aux_channels: int = 256, aux_weight: float = 0.4,
                 dropout: float = 0.1):
        super().__init__()
        self.backbone = backbone
        widths = [info['num_chs'] for info in backbone.feature_info]
        self.strides = [info['reduction'] for info in backbone.feature_info]
        self.pools = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(scale), *_unit(widths[-1], channels, 1))
                                   for scale in pool_scales)
        self.ppm_bottleneck = nn.Sequential(*_unit(widths[-1] + len(pool_scales) * channels, channels))
        self.laterals = nn.ModuleList(nn.Sequential(*_unit(w, channels, 1)) for w in widths[:-1])
        self.fpn_convs = nn.ModuleList(nn.Sequential(*_unit(channels, channels)) for _ in widths[:-1])
        self.fpn_bottleneck = nn.Sequential(*_unit(len(widths) * channels, channels))
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        self.aux_weight = aux_weight
        self.aux_head = None
        if aux_channels:  # on the stride-16 map, the third of four
            self.aux_head = nn.Sequential(*_unit(widths[min(2, len(widths) - 1)], aux_channels), nn.Dropout2d(dropout),
                                          nn.Conv2d(aux_channels, num_classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        H, W = x.shape[-2:]
        features = self.backbone(x)  # (B, C_i, H / s_i, W / s_i), strides 4 to 32
        top = features[-1]
        pooled = [_resize(pool(top), top.shape[-2:]) for pool in self.pools]
        levels = [lateral(f) for lateral, f in zip(self.laterals, features[:-1])]
        levels.append(self.ppm_bottleneck(torch.cat([top, *pooled], 1)))  # (B, channels, H / 32, W / 32)
        for i in range(len(levels) - 1, 0, -1):  # top-down
            levels[i - 1] = levels[i - 1] + _resize(levels[i], levels[i - 1].shape[-2:])
        outs = [conv(level) for conv, level in zip(self.fpn_convs, levels[:-1])] + [levels[-1]]
        size = outs[0].shape[-2:]
        fused = self.fpn_bottleneck(torch.cat([outs[0]] + [_resize(o, size) for o in outs[1:]], 1))
        logits = _resize(self.classifier(self.dropout(fused)), (H, W))  # (B, K, H, W)
        if self.training and self.aux_head is not None:
            aux = _resize(self.aux_head(features[min(2, len(features) - 1)]), (H, W))
            return dict(out=logits, aux=aux)
        return logits


SEGMENTERS = dict(semfpn=SemanticFPN, upernet=UperNet)


def _padded(x: torch.Tensor, divisor: int) -> torch.Tensor:
    H, W = x.shape[-2:]
    return F.pad(x, (0, -W % divisor, 0, -H % divisor))


@torch.no_grad()
def whole_image_logits(model: nn.Module, image: torch.Tensor, short_side: int | None = None,
                       max_side: int | None = None, divisor: int = 32) -> torch.Tensor:
    """(3, H, W) normalised image -> (K, H, W) logits from one pass over the whole image (mmseg's 'whole'
    mode): resized keeping its ratio to `short_side` (the long side at most `max_side`) when given, padded
    to a multiple of `divisor`, and the logits of the image's own area resized back to H x W."""
    H, W = image.shape[-2:]
    x = image[None]
    if short_side:
        scale = short_side / min(H, W)
        if max_side:
            scale = min(scale, max_side / max(H, W))
        x = _resize(x, (max(round(H * scale), 1), max(round(W * scale), 1)))
    h, w = x.shape[-2:]
    logits = model(_padded(x, divisor))[..., :h, :w]  # (1, K, h, w)
    return _resize(logits, (H, W))[0] if (h, w) != (H, W) else logits[0]


@torch.no_grad()
def sliding_window_logits(model: nn.Module, image: torch.Tensor, crop: int = 512, stride: int = 341,
                          divisor: int = 32) -> torch.Tensor:
    """(3, H, W) normalised image -> (K, H, W) logits averaged over `crop` x `crop` windows `stride` apart
    (mmseg's 'slide' mode), the last row and column of windows flush with the far edges; an image smaller
    than a window is one window. Memory stays that of one window at any image size."""
    H, W = image.shape[-2:]
    rows = range(0, max(H - crop, 0) + 1, stride)
    cols = range(0, max(W - crop, 0) + 1, stride)
    tops = sorted({*rows, max(H - crop, 0)})
    lefts = sorted({*cols, max(W - crop, 0)})
    total = counts = None
    for top in tops:
        for left in lefts:
            window = image[None, :, top:top + crop, left:left + crop]
            h, w = window.shape[-2:]
            logits = model(_padded(window, divisor))[0, :, :h, :w]  # (K, h, w)
            if total is None:
                total = logits.new_zeros(logits.shape[0], H, W)
                counts = logits.new_zeros(1, H, W)
            total[:, top:top + h, left:left + w] += logits
            counts[:, top:top + h, left:left + w] += 1
    return total / counts


def build_segmenter(backbone: str | nn.Module, num_classes: int, head: str = 'semfpn', **kwargs) -> nn.Module:
    """Semantic FPN (`head='semfpn'`) or UperNet (`'upernet'`) over `backbone`: a registered name, built with
    `features_only=True`, or such a module. Other keywords go to the head (e.g. `channels`)."""
    if head not in SEGMENTERS:
        raise ValueError(f"head must be one of {', '.join(SEGMENTERS)}, not {head!r}")
    if isinstance(backbone, str):
        from ..factory import create_model
        backbone = create_model(backbone, features_only=True)
    return SEGMENTERS[head](backbone, num_classes, **kwargs)
