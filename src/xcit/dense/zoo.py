"""Registered dense models: `maskrcnn_<backbone>`, `semfpn_<backbone>` and `upernet_<backbone>` for every
XCiT size and patch, in the same registry (and `xcit models` listing) as the classifiers.

Each name builds the official recipe's model: the backbone's constant drop-path rate, 81 classes
(COCO's 80 and the background) for Mask R-CNN, 150 (ADE20K) for the segmenters. Keyword arguments
override it, so a config's `model.kwargs` can make a lighter head of the same design.
"""
from __future__ import annotations

from functools import partial

import torch.nn as nn

from .. import models  # noqa: F401  (registers the backbones)
from ..registry import IMAGENET_MEAN, IMAGENET_STD, list_models, register_model

# the official drop-path rate of each backbone depth and width (`../dense.md`): Mask R-CNN / UperNet / Sem-FPN
_DROP_PATH = {'nano_12': (0.0, 0.0, 0.0), 'tiny_12': (0.0, 0.0, 0.0), 'tiny_24': (0.1, 0.1, 0.1),
              'small_12': (0.05, 0.05, 0.05), 'small_24': (0.1, 0.1, 0.1), 'medium_24': (0.15, 0.15, 0.2),
              'large_24': (0.2, 0.2, 0.2)}
HEADS = ('maskrcnn', 'upernet', 'semfpn')


def _backbone(name: str, drop_path_rate: float, backbone_checkpoint: str | None) -> nn.Module:
    from ..factory import create_model
    from .weights import load_backbone_weights
    body = create_model(name, features_only=True, drop_path_rate=drop_path_rate)
    if backbone_checkpoint:
        load_backbone_weights(body, backbone_checkpoint)
    return body


def build_dense(head: str, backbone: str, drop_path_rate: float = 0.0, num_classes: int | None = None,
                backbone_checkpoint: str | None = None, **kwargs) -> nn.Module:
    """`head` over the `features_only` `backbone`; `backbone_checkpoint`: classification (or dense) weights for it."""
    from .detection import build_detector
    from .segmentation import build_segmenter
    body = _backbone(backbone, drop_path_rate, backbone_checkpoint)
    if head == 'maskrcnn':
        return build_detector(body, num_classes or 81, **kwargs)
    return build_segmenter(body, num_classes or 150, head=head, **kwargs)


def _register() -> None:
    for backbone in list_models('xcit_*_224'):  # xcit_nano_12_p16_224, ...
        size, patch = backbone[len('xcit_'):].rsplit('_', 2)[:2]  # 'nano_12', 'p16'
        for head, rate in zip(HEADS, _DROP_PATH[size]):
            detection = head == 'maskrcnn'
            cfg = dict(num_classes=81 if detection else 150, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                       input_size=(3, 800, 1333) if detection else (3, 512, 2048), fixed_input_size=False,
                       backbone=backbone, task='detection' if detection else 'segmentation',
                       classifier='roi_heads.box_predictor' if detection else 'classifier')
            register_model(f'{head}_xcit_{size}_{patch}', partial(build_dense, head, backbone, drop_path_rate=rate),
                           family=head, cfgs={'': cfg})


_register()
