"""Backbone weights for a detector or segmenter from any checkpoint this package reads.

A classification checkpoint (official, timm, PASSL, DINO, ours) or a dense model's own
(its `backbone.body.` or `backbone.` part) loads into the `features_only` backbone. What the
backbone has no place for (the class token, class attention, final norm, classifier) is
skipped, and the pyramid adapters a classifier never had keep their initialisation; the
report says which, by name.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..checkpoints import CheckpointError
from ..checkpoints.load import read_state_dict
from ..registry import get_checkpoint_adapter

_logger = logging.getLogger(__name__)
_DENSE_PREFIXES = ('backbone.body.', 'backbone.')  # a detector's, a segmenter's


@dataclass
class BackboneLoad:
    loaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # in the checkpoint, not used by the backbone
    initialised: list[str] = field(default_factory=list)  # in the backbone, not in the checkpoint

    def summary(self, source: str) -> str:
        return (f'{source}: loaded {len(self.loaded)} backbone tensors; skipped {_groups(self.skipped) or "nothing"}; '
                f'kept their initialisation: {_groups(self.initialised) or "nothing"}')


def _groups(keys: list[str]) -> str:
    """'blocks.0.attn.qkv.weight', ... -> 'blocks.* (24)': names grouped by their first part."""
    counts: dict[str, int] = {}
    for key in keys:
        head = re.sub(r'\.\d+$', '', key.split('.')[0])
        counts[head] = counts.get(head, 0) + 1
    return ', '.join(f'{head}.* ({n})' if n > 1 else head for head, n in counts.items())


def _backbone_part(state_dict: dict) -> dict:
    for prefix in _DENSE_PREFIXES:
        if any(k.startswith(prefix) for k in state_dict):
            return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return state_dict


def load_backbone_weights(backbone: nn.Module, source: str | os.PathLike | dict) -> BackboneLoad:
    """Load what fits of `source` into `backbone` and log what was skipped; refuse weights of another model."""
    state_dict, label = read_state_dict(source)
    state_dict = _backbone_part(state_dict)
    own = backbone.state_dict()
    adapter = get_checkpoint_adapter(backbone)
    mapped = adapter.filter_fn(dict(state_dict), backbone) if adapter else dict(state_dict)
    standin = lambda key, value: key in own and value.data_ptr() == own[key].data_ptr()  # noqa: E731
    # a part the checkpoint lacks, filled in by the adapter with the backbone's own (initial) tensor
    usable = {k: v for k, v in mapped.items() if not standin(k, v) and k in own and own[k].shape == v.shape}
    report = BackboneLoad(loaded=list(usable))
    for key, value in state_dict.items():  # one at a time through the adapter, to name the original keys
        try:
            names = [k for k, v in (adapter.filter_fn({key: value}, backbone) if adapter else {key: value}).items()
                     if not standin(k, v)]
        except (KeyError, ValueError):
            continue  # one part of a tensor the adapter assembles from several (timm's split q, k, v)
        if not any(name in usable for name in names):
            report.skipped.append(key)
    report.initialised = [k for k in own if k not in usable and not k.endswith('num_batches_tracked')]
    learnable = [k for k, v in own.items() if v.is_floating_point()]
    if len(usable) < len(learnable) / 2:
        raise CheckpointError(f'{label} does not fit the {type(backbone).__name__} backbone: only {len(usable)} of '
                              f'its {len(learnable)} tensors found a place (first keys: '
                              f"{', '.join(list(state_dict)[:3])})")
    with torch.no_grad():
        backbone.load_state_dict(usable, strict=False)
    _logger.info(report.summary(label))
    return report
