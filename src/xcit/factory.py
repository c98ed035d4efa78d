"""`create_model`: build a registered architecture and load its weights, as timm users expect."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch.nn as nn

from . import models  # noqa: F401  (registers every family)
from .checkpoints.errors import CheckpointError
from .checkpoints.hf_hub import (HUB_PREFIX, INSTALL_HINT, SOURCE_KEYS, hub_available, hub_weights, read_hub_config,
                                 source_weights, split_source)
from .checkpoints.hub import PretrainedUnavailableError, cached_download
from .checkpoints.load import load_into, read_state_dict
from .registry import build_model, get_pretrained_cfg, is_model

_logger = logging.getLogger(__name__)


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
    """Build `model_name` (`arch`, `arch.tag`, `hf-hub:ORG/REPO[@REVISION]`, `local-dir:DIR`), optionally with weights.

    `pretrained=True` downloads the tag's published file into torch.hub's cache, or, when its
    release URL fails, timm's copy on the Hugging Face Hub (the tag's `hf_hub_id`); a log line says
    which. `hf-hub:`/`local-dir:` names a timm-style repo or folder, whose `config.json` gives the
    architecture, class count and pretrained cfg, and whose weights `pretrained=True` loads.
    `checkpoint_path` loads a local file in any supported format instead. Giving
    a `num_classes` other than the weights' starts a new classifier for fine-tuning.
    `features_only=True` (with `out_indices`) returns the dense-prediction backbone.
    Other keyword arguments go to the model's constructor.
    """
    source, _ = split_source(model_name)
    architecture, pretrained_cfg = model_name, None
    kwargs.update(in_chans=in_chans, drop_path_rate=drop_path_rate)
    if source is not None:
        hub = read_hub_config(model_name)
        if not is_model(hub.architecture):
            raise CheckpointError(f'{model_name}: its config.json names the architecture {hub.architecture!r}, '
                                  'which this package does not implement (see xcit.list_models())')
        architecture = hub.architecture
        defaults = {k: v for k, v in get_pretrained_cfg(architecture).items() if k not in SOURCE_KEYS | {'tag'}}
        pretrained_cfg = defaults | hub.pretrained_cfg
        # the arguments that rebuild the saved model, unless given here; the class count is the cfg's
        kwargs = {k: v for k, v in hub.model_args.items() if k != 'num_classes'} | {
            k: v for k, v in kwargs.items() if v is not None}
    try:
        model = build_model(architecture, pretrained_cfg_overlay, pretrained_cfg, num_classes=num_classes, **kwargs)
    except TypeError as e:
        if source is None or not hub.model_args:
            raise
        raise CheckpointError(f'{model_name}: the model_args of its config.json do not fit {architecture} ({e})'
                              ) from None
    cfg = model.pretrained_cfg

    weights = checkpoint_path
    if weights is None and pretrained:
        weights = source_weights(model_name, cfg) if source is not None else published_weights(cfg)
    if weights is not None:
        new_classifier = num_classes is not None and num_classes != cfg.get('num_classes')
        state_dict, label = read_state_dict(weights)
        load_into(model, state_dict, strict=True, source=label, new_classifier=new_classifier)
    return model


def published_weights(cfg: dict[str, Any]) -> Path:
    """The published weights of a registered tag: its release URL, else its copy on the Hugging Face Hub."""
    name = f"{cfg['architecture']}.{cfg['tag']}"
    url, repo = cfg.get('url'), cfg.get('hf_hub_id')
    if not url and not repo:
        raise ValueError(f'{name} has no published weights; pass checkpoint_path= to load a file')
    url_error = None
    if url:
        try:
            path = cached_download(url, name)
        except PretrainedUnavailableError as e:
            if not repo:
                raise
            if not hub_available():
                raise PretrainedUnavailableError(f'{e}\nThe same weights are on the Hugging Face Hub '
                                                 f'({HUB_PREFIX}{repo}): {INSTALL_HINT} to fetch them from there'
                                                 ) from None
            url_error = e
            _logger.warning('%s: the release URL failed (%s); trying the Hugging Face Hub copy %s%s', name,
                            str(e).splitlines()[0].rstrip('.'), HUB_PREFIX, repo)
        else:
            _logger.info('%s: weights from the release URL %s', name, url)
            return path
    try:
        path = hub_weights(repo, cfg.get('hf_hub_filename'))
    except CheckpointError as e:
        if url_error is None:
            raise
        raise PretrainedUnavailableError(f'{url_error}\nThe Hugging Face Hub copy failed too: {e}') from None
    _logger.info('%s: weights from the Hugging Face Hub, %s%s', name, HUB_PREFIX, repo)
    return path
