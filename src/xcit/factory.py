"""`create_model`: build a registered architecture and load its weights, as timm users expect."""
from __future__ import annotations

import os
from typing import Any

import torch.nn as nn

from . import models  # noqa: F401  (registers every family)
from .checkpoints.hub import cached_download
from .checkpoints.load import load_into, read_state_dict
from .registry import build_model


def create_model(
        model_name: str,
        pretrained: bool = False,
        checkpoint_path: str | os.PathLike | None = None,
        num_classes: int | None = None,
        in_chans: int | None = None,
        drop_path_rate: float | None = None,
        pretrained_cfg_overlay: dict[str, Any] | None = None,
        **kwargs: Any,
) -> nn.Module:
    """Build `model_name` (`arch` or `arch.tag`), optionally with weights.

    `pretrained=True` downloads the tag's published file into torch.hub's cache;
    `checkpoint_path` loads a local file in any supported format instead. Giving
    a `num_classes` other than the weights' starts a new classifier for fine-tuning.
    `features_only=True` (with `out_indices`) returns the dense-prediction backbone.
    Other keyword arguments go to the model's constructor.
    """
    model = build_model(model_name, pretrained_cfg_overlay, num_classes=num_classes, in_chans=in_chans,
                        drop_path_rate=drop_path_rate, **kwargs)
    cfg = model.pretrained_cfg

    source = checkpoint_path
    if source is None and pretrained:
        if not cfg.get('url'):
            raise ValueError(f'{model_name} has no published weights; pass checkpoint_path= to load a file')
        source = cached_download(cfg['url'], f"{cfg['architecture']}.{cfg['tag']}")
    if source is not None:
        new_classifier = num_classes is not None and num_classes != cfg.get('num_classes')
        state_dict, label = read_state_dict(source)
        load_into(model, state_dict, strict=True, source=label, new_classifier=new_classifier)
    return model
