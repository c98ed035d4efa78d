"""Loading weights into a model from any supported checkpoint, with errors that say what does not fit."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.nn as nn

from .io import CheckpointError, read_checkpoint

_logger = logging.getLogger(__name__)

# where training frameworks nest the weights, in the order they are looked for
_WEIGHT_KEYS = ('model', 'state_dict', 'module')
_EMA_KEYS = ('model_ema', 'state_dict_ema')


@dataclass
class LoadResult:
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # 'key: checkpoint (...) vs model (...)'
    dropped_classifier: list[str] = field(default_factory=list)


def extract_state_dict(obj: Any, use_ema: bool = False, source: str = 'checkpoint') -> dict[str, torch.Tensor]:
    """The flat name -> tensor mapping inside a checkpoint object (official, timm, DDP or plain)."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f'{source}: expected a mapping of weights, found {type(obj).__name__}')
    if use_ema:
        ema = next((k for k in _EMA_KEYS if isinstance(obj.get(k), Mapping)), None)
        if ema is None:
            raise CheckpointError(f'{source}: use_ema=True but the checkpoint has no {" or ".join(_EMA_KEYS)} entry')
        obj = obj[ema]
    else:
        nested = next((k for k in _WEIGHT_KEYS if isinstance(obj.get(k), Mapping)), None)
        if nested is not None:
            obj = obj[nested]
    state_dict = {k: v for k, v in obj.items() if k != '__metadata__'}
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(
            f'{source}: entries {not_tensors[:5]} are not tensors; expected a state dict '
            f"(or one under {', '.join(repr(k) for k in _WEIGHT_KEYS)})")
    if state_dict and all(k.startswith('module.') for k in state_dict):  # saved from a DDP wrapper
        state_dict = {k[len('module.'):]: v for k, v in state_dict.items()}
    return state_dict


def _model_name(model: nn.Module) -> str:
    return getattr(model, 'pretrained_cfg', {}).get('architecture') or type(model).__name__


def _listing(title: str, items: list[str], limit: int = 12) -> str:
    shown = ', '.join(items[:limit]) + (f', ... and {len(items) - limit} more' if len(items) > limit else '')
    return f'\n  {title} ({len(items)}): {shown}'


def load_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True,
                    source: str = 'checkpoint', new_classifier: bool = False) -> LoadResult:
    """Copy `state_dict` (already in the model's layout) into `model`.

    BatchNorm's `num_batches_tracked` may be absent (Paddle files have none).
    With `new_classifier`, classifier entries whose shape differs from the
    model's are dropped with a warning, leaving a freshly initialised head for fine-tuning.
    """
    own = model.state_dict()
    result = LoadResult()
    classifier = getattr(model, 'pretrained_cfg', {}).get('classifier', 'head')
    to_load = {}
    for key, value in state_dict.items():
        is_classifier = key.startswith(classifier + '.')
        if key not in own:
            if new_classifier and is_classifier:
                result.dropped_classifier.append(key)
            else:
                result.unexpected.append(key)
        elif own[key].shape != value.shape:
            if new_classifier and is_classifier:
                result.dropped_classifier.append(key)
            else:
                result.mismatched.append(f'{key}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}')
        else:
            to_load[key] = value
    result.missing = [k for k in own if k not in state_dict and not k.endswith('num_batches_tracked')]

    if result.dropped_classifier:
        _logger.warning('%s: not loading %s (the checkpoint\'s classifier has another class count); '
                        'the new classifier starts from its initialisation', source,
                        ', '.join(result.dropped_classifier))
    problems = result.missing or result.unexpected or result.mismatched
    if problems:
        message = f"{source} does not fit {_model_name(model)}:"
        if result.missing:
            message += _listing('missing from the checkpoint', result.missing)
        if result.unexpected:
            message += _listing('unexpected in the checkpoint', result.unexpected)
        if result.mismatched:
            message += _listing('shape mismatch', result.mismatched)
        head_mismatch = [m for m in result.mismatched if m.startswith(classifier + '.')]
        if head_mismatch:
            message += ('\n  The classifier has a different number of classes: build the model with the '
                        "checkpoint's num_classes, or with create_model(name, num_classes=N, checkpoint_path=...) "
                        'to fine-tune a new classifier.')
        if strict:
            raise CheckpointError(message)
        _logger.warning(message)
    model.load_state_dict(to_load, strict=False)
    return result


def load_checkpoint(model: nn.Module, checkpoint: str | os.PathLike | Mapping[str, Any], strict: bool = True,
                    use_ema: bool = False) -> LoadResult:
    """Load official, timm or plain PyTorch weights into `model`.

    `checkpoint` is a file path or an already loaded object (state dict or
    training checkpoint). Files are read with `torch.load(weights_only=True)`.
    With `strict`, anything missing, unexpected or mis-shaped raises a
    `CheckpointError` that lists it; otherwise it is logged and skipped.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        source = str(checkpoint)
        checkpoint = read_checkpoint(checkpoint)
    else:
        source = 'state dict'
    return _load(model, checkpoint, strict=strict, use_ema=use_ema, source=source)


def _load(model: nn.Module, obj: Any, strict: bool, use_ema: bool, source: str,
          new_classifier: bool = False) -> LoadResult:
    from ..models._registry import get_checkpoint_filter  # models import this module: resolve at call time

    state_dict = extract_state_dict(obj, use_ema=use_ema, source=source)
    filter_fn = get_checkpoint_filter(model)
    if filter_fn is not None:
        state_dict = filter_fn(state_dict, model)
    return load_state_dict(model, state_dict, strict=strict, source=source, new_classifier=new_classifier)
