"""Mask R-CNN and Faster R-CNN (torchvision's) over any of our `features_only` backbones.

The backbone's pyramid (XCiT's official stride 4/8/16/32 adapters, CvT's and FCViT's stages)
goes through torchvision's FeaturePyramidNetwork with the extra max-pooled level, 256
channels, as the official XCiT Mask R-CNN (mmdet) has it; anchors of 32 px at stride 4
doubling per level, ratios 0.5 / 1 / 2; RoIAlign of 7 (boxes) and 14 (masks) with sampling
ratio 2 (0, adaptive, in the official recipes of configs/dense/); the heads are torchvision's (two 1024-wide FC layers; four 256-channel mask convs).
The widths are arguments so that a small CPU can train a lighter detector of the same design.
The detector keeps torchvision's calling convention: a list of (3, H, W) images in; in
training, with targets, a dict of losses; in eval, one dict per image with `boxes`, `labels`,
`scores` (and `masks`).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn as nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from ..registry import IMAGENET_MEAN, IMAGENET_STD


class PyramidBackbone(nn.Module):
    """A `features_only` backbone and an FPN: (B, 3, H, W) -> {'0': stride 4, ..., 'pool'}, each `out_channels`."""

    def __init__(self, body: nn.Module, out_channels: int = 256):
        super().__init__()
        self.body = body
        self.strides = [info['reduction'] for info in body.feature_info]
        self.fpn = FeaturePyramidNetwork([info['num_chs'] for info in body.feature_info], out_channels,
                                         extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        features = self.body(x)  # one (B, C_i, H / s_i, W / s_i) map per stride
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(features)))


def build_detector(backbone: str | nn.Module, num_classes: int, masks: bool = True,
                   min_size: int | Sequence[int] = 800, max_size: int = 1333, box_detections_per_img: int = 100,
                   fpn_channels: int = 256, smallest_anchor: int = 32, box_head_width: int = 1024,
                   mask_head_layers: Sequence[int] = (256, 256, 256, 256), roi_sampling_ratio: int = 2,
                   **detector_kwargs) -> nn.Module:
    """torchvision's MaskRCNN (FasterRCNN without `masks`) over `backbone`: a registered name, built with
    `features_only=True`, or such a module. `num_classes` counts the background. Images are resized
    keeping their ratio to a short side of `min_size` (in training one of them, when several) and a long
    side of at most `max_size`. Anchors are `smallest_anchor` px at the finest level, doubling per level.
    `roi_sampling_ratio` 0 samples each RoIAlign bin adaptively (mmdet's setting). Other keywords go to
    torchvision's constructor (e.g. `rpn_post_nms_top_n_train`, `box_batch_size_per_image`)."""
    if isinstance(backbone, str):
        from ..factory import create_model
        backbone = create_model(backbone, features_only=True)
    pyramid = PyramidBackbone(backbone, fpn_channels)
    levels = len(pyramid.strides)
    names = [str(i) for i in range(levels)]
    sizes = tuple((smallest_anchor * 2 ** i,) for i in range(levels + 1))  # one size per level, 'pool' included
    anchors = AnchorGenerator(sizes=sizes, aspect_ratios=((0.5, 1.0, 2.0),) * len(sizes))
    box_pool = MultiScaleRoIAlign(names, output_size=7, sampling_ratio=roi_sampling_ratio)
    common = dict(rpn_anchor_generator=anchors, min_size=min_size, max_size=max_size,
                  image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD), box_roi_pool=box_pool,
                  box_head=TwoMLPHead(fpn_channels * 7 * 7, box_head_width),
                  box_predictor=FastRCNNPredictor(box_head_width, num_classes),
                  box_detections_per_img=box_detections_per_img, **detector_kwargs)
    if masks:
        mask_layers = list(mask_head_layers)
        return MaskRCNN(pyramid, mask_roi_pool=MultiScaleRoIAlign(names, output_size=14, sampling_ratio=roi_sampling_ratio),
                        mask_head=MaskRCNNHeads(fpn_channels, mask_layers, dilation=1),
                        mask_predictor=MaskRCNNPredictor(mask_layers[-1], mask_layers[-1], num_classes), **common)
    return FasterRCNN(pyramid, **common)
