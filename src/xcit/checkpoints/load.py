"""Loading weights into a model from any supported checkpoint, with errors that say what does not fit."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.nn as nn

from ..registry import WeightsGuess, get_checkpoint_adapter, guess_architecture
from .errors import CheckpointError
from .io import read_checkpoint
from .paddle import from_paddle, is_paddle_layout

_logger = logging.getLogger(__name__)

# where training frameworks nest the weights, in the order they are looked for
_WEIGHT_KEYS = ('model', 'state_dict', 'module')
_EMA_KEYS = ('model_ema', 'state_dict_ema')
_DISTILL_PREFIXES = ('Student.', 'Teacher.')
_SSL_PARTS = ('teacher', 'student')  # DINO: facebookresearch/dino's full checkpoints, and our dino task's


@dataclass
class LoadResult:
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # 'key: checkpoint (...) vs model (...)'
    dropped_classifier: list[str] = field(default_factory=list)


def extract_state_dict(obj: Any, use_ema: bool = False, source: str = 'checkpoint', part: str = 'Student',
                       ssl_part: str = 'teacher') -> dict[str, torch.Tensor]:
    """The flat name -> tensor mapping inside a checkpoint object, in PyTorch's conventions.

    Unwraps training checkpoints (official, timm, PASSL, ours), DDP's `module.`
    prefix, PASSL's distillation wrapper (its `part`: the `Student.` being trained,
    or the `Teacher.`) and DINO's checkpoints (`ssl_part`: the `teacher`, whose
    backbone DINO's evaluations and released files use, or the `student`; the DINO
    head is dropped), and converts Paddle's layout. Family-specific layouts (timm's,
    PASSL's RegNet) are left to the model's adapter.
    """
    if part not in ('Student', 'Teacher'):
        raise ValueError(f"part must be 'Student' or 'Teacher', not {part!r}")
    if ssl_part not in _SSL_PARTS:
        raise ValueError(f"ssl_part must be 'teacher' or 'student', not {ssl_part!r}")
    if not isinstance(obj, Mapping):
        raise CheckpointError(f'{source}: expected a mapping of weights, found {type(obj).__name__}')
    if all(isinstance(obj.get(k), Mapping) for k in _SSL_PARTS):  # facebookresearch/dino's full checkpoint
        _logger.info('%s: DINO checkpoint, loading its %s backbone', source, ssl_part)
        return _dino_backbone(obj[ssl_part], source, ssl_part)
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
    not_names = [k for k in state_dict if not isinstance(k, str)]
    if not_names:
        raise CheckpointError(f'{source}: entries are named by {type(not_names[0]).__name__}s such as '
                              f'{_short(not_names[0])}, not by parameter names; expected a state dict')
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(
            f"{source}: entries {', '.join(_short(k) for k in not_tensors[:5])} are not tensors; expected a "
            f"state dict (or one under {', '.join(repr(k) for k in _WEIGHT_KEYS)})")
    not_dense = [k for k, v in state_dict.items() if v.layout != torch.strided or v.is_quantized]
    if not_dense:
        raise CheckpointError(f"{source}: entries {', '.join(_short(k) for k in not_dense[:5])} are sparse or "
                              'quantized tensors; only dense weights can be loaded')
    if state_dict and all(k.startswith('module.') for k in state_dict):  # saved from a DDP wrapper
        state_dict = {k[len('module.'):]: v for k, v in state_dict.items()}
    if state_dict and all(k.startswith(tuple(f'{p}.' for p in _SSL_PARTS)) for k in state_dict):  # task: dino
        _logger.info('%s: DINO training checkpoint, loading its %s backbone', source, ssl_part)
        return _dino_backbone({k[len(ssl_part) + 1:]: v for k, v in state_dict.items()
                               if k.startswith(ssl_part + '.')}, source, ssl_part)
    if state_dict and all(k.startswith(_DISTILL_PREFIXES) for k in state_dict):
        # a distillation checkpoint (PASSL's DistillationWrapper)
        _logger.info('%s: distillation checkpoint, loading its %s. weights', source, part)
        state_dict = {k[len(part) + 1:]: v for k, v in state_dict.items() if k.startswith(part + '.')}
        if not state_dict:
            raise CheckpointError(f'{source}: a distillation checkpoint without {part}. weights')
    if is_paddle_layout(state_dict):
        state_dict = from_paddle(state_dict)
    return state_dict


def _dino_backbone(state_dict: Mapping[str, Any], source: str, ssl_part: str) -> dict[str, torch.Tensor]:
    """The backbone of one DINO network (`module.backbone.*` / `backbone.*` beside `head.*`), without the head."""
    state_dict = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state_dict.items()}
    backbone = {k[len('backbone.'):]: v for k, v in state_dict.items() if k.startswith('backbone.')}
    if not backbone:
        raise CheckpointError(f'{source}: a DINO checkpoint whose {ssl_part} has no backbone.* weights')
    return extract_state_dict(backbone, source=source)


def _short(key: Any, limit: int = 80) -> str:
    text = repr(key)
    return text if len(text) <= limit else text[:limit] + '...'


def nonfinite_tensors(state_dict: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point tensors that hold NaN or infinite values."""
    return [k for k, v in state_dict.items()
            if isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex())
            and v.layout == torch.strided and not bool(torch.isfinite(v).all())]


def describe_nonfinite(names: list[str], limit: int = 8) -> str:
    """'3 tensors hold NaN or infinite values (a, b, c)', naming at most `limit` of them."""
    shown = ', '.join(names[:limit]) + (f', ... and {len(names) - limit} more' if len(names) > limit else '')
    return f"{len(names)} tensor{'s hold' if len(names) > 1 else ' holds'} NaN or infinite values ({shown})"


# what a family's layout code raises on a state dict with damaged shapes or missing parts
_LAYOUT_ERRORS = (KeyError, IndexError, ValueError, TypeError, RuntimeError)


def guess_weights(state_dict: Mapping[str, Any]) -> WeightsGuess | None:
    """`guess_architecture`, reading damaged state dicts (a shape with too few sides) as unrecognised."""
    try:
        return guess_architecture(state_dict)
    except _LAYOUT_ERRORS:
        return None


def _model_name(model: nn.Module) -> str:
    return getattr(model, 'pretrained_cfg', {}).get('architecture') or type(model).__name__


def _listing(title: str, items: list[str], limit: int = 12) -> str:
    # names come from the file: a hostile one could be megabytes long
    shown = ', '.join(i if len(i) <= 120 else i[:120] + '...' for i in items[:limit])
    shown += f', ... and {len(items) - limit} more' if len(items) > limit else ''
    return f'\n  {title} ({len(items)}): {shown}'


def load_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True,
                    source: str = 'checkpoint', new_classifier: bool = False) -> LoadResult:
    """Copy `state_dict` (already in the model's layout) into `model`.

    BatchNorm's `num_batches_tracked` may be absent (Paddle files have none).
    With `new_classifier`, classifier entries whose shape differs from the
    model's are dropped with a warning, leaving a freshly initialised head for fine-tuning
    (as does a checkpoint with no classifier at all, a pretrained backbone).
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
        elif own[key].is_floating_point() and not (value.is_floating_point() or value.is_complex()):
            # integers where the model has floats: copying would convert them silently, and they are not weights
            result.mismatched.append(f'{key}: checkpoint {value.dtype} vs model {own[key].dtype}')
        else:
            to_load[key] = value
    result.missing = [k for k in own if k not in state_dict and not k.endswith('num_batches_tracked')]
    if new_classifier and not any(k.startswith(classifier + '.') for k in state_dict):  # a bare backbone (DINO's)
        fresh = [k for k in result.missing if k.startswith(classifier + '.')]
        if fresh:
            _logger.info('%s: a backbone without a classifier; %s start from their initialisation', source,
                         ', '.join(fresh))
            result.missing = [k for k in result.missing if k not in fresh]

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
        message += _describe_mismatch(model, state_dict)
        bias = f'{classifier}.bias'
        if (bias in state_dict and bias in own and state_dict[bias].ndim == 1
                and state_dict[bias].shape != own[bias].shape):
            message += (f'\n  The checkpoint has {state_dict[bias].shape[0]} classes: build the model with that '
                        'num_classes, or use create_model(name, num_classes=N, checkpoint_path=...) '
                        'to fine-tune a new classifier.')
        if strict:
            raise CheckpointError(message)
        _logger.warning(message)
    nonfinite = nonfinite_tensors(to_load)
    if nonfinite:
        _logger.warning('%s: %s; the model will compute NaN from them', source, describe_nonfinite(nonfinite))
    model.load_state_dict(to_load, strict=False)
    return result


def _describe_mismatch(model: nn.Module, state_dict: dict) -> str:
    """Say which model the weights look like, next to the one they were loaded into."""
    ours, theirs = guess_weights(model.state_dict()), guess_weights(state_dict)
    if theirs is None:
        return f"\n  The checkpoint does not look like any model this package knows (first keys: {', '.join(k[:80] for k in list(state_dict)[:3])})."
    if ours is not None and ours.description == theirs.description:
        return ''
    looks_like = f'{theirs.architecture} ({theirs.description})' if theirs.architecture else theirs.description
    asked = f'{_model_name(model)} ({ours.description})' if ours else _model_name(model)
    return f'\n  The checkpoint looks like {looks_like}; you asked for {asked}.'


def read_state_dict(checkpoint: str | os.PathLike | Mapping[str, Any], use_ema: bool = False, part: str = 'Student',
                    ssl_part: str = 'teacher') -> tuple[dict[str, torch.Tensor], str]:
    """The state dict in a file or loaded object, in PyTorch conventions, and a name for it in messages
    (`part`: which model of a distillation checkpoint; `ssl_part`: which network of a DINO one)."""
    if isinstance(checkpoint, (str, os.PathLike)):
        return (extract_state_dict(read_checkpoint(checkpoint), use_ema, str(checkpoint), part, ssl_part),
                str(checkpoint))
    return extract_state_dict(checkpoint, use_ema, 'state dict', part, ssl_part), 'state dict'


def load_checkpoint(model: nn.Module, checkpoint: str | os.PathLike | Mapping[str, Any], strict: bool = True,
                    use_ema: bool = False) -> LoadResult:
    """Load official, timm, PASSL, safetensors or our own weights into `model`.

    `checkpoint` is a file path or an already loaded object (state dict or
    training checkpoint). Files are never unpickled beyond weights. With
    `strict`, anything missing, unexpected or mis-shaped raises a
    `CheckpointError` that lists it; otherwise it is logged and skipped.
    """
    state_dict, source = read_state_dict(checkpoint, use_ema)
    return load_into(model, state_dict, strict=strict, source=source)


def load_into(model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True, source: str = 'state dict',
              new_classifier: bool = False) -> LoadResult:
    """Map a state dict onto the model's own layout with its family's adapter, then load it."""
    adapter = get_checkpoint_adapter(model)
    if adapter is not None:
        try:
            state_dict = adapter.filter_fn(state_dict, model)
        except _LAYOUT_ERRORS as e:
            raise CheckpointError(f'{source} does not fit {_model_name(model)}: {" ".join(str(e).split())[:300]}'
                                  ) from None
    return load_state_dict(model, state_dict, strict=strict, source=source, new_classifier=new_classifier)
