"""Writing weights in every supported layout, and converting checkpoints between them.

Conversion always goes through a model: the source is loaded strictly into the
architecture it belongs to, so a converted file is known to be complete and
correctly shaped before it is written.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from ..registry import build_model, get_checkpoint_adapter, is_model
from .errors import CheckpointError
from .io import atomic_write, read_checkpoint, sniff_format
from .load import describe_nonfinite, guess_weights, load_into, nonfinite_tensors, read_state_dict
from .paddle import from_paddle, is_paddle_layout, to_numpy, to_paddle, write_paddle_pickle

FORMATS = ('passl', 'paddle', 'timm', 'official', 'safetensors')
SAFETENSORS_FORMAT_VERSION = '1'
_PADDLE_SUFFIXES = ('.pdparams', '.pd')

_logger = logging.getLogger(__name__)


def format_for_path(path: str | os.PathLike, requested: str | None = None) -> str:
    """The output format: the requested one, else what the file extension says."""
    suffix = Path(path).suffix.lower()
    if requested is not None:
        if requested not in FORMATS:
            raise ValueError(f"unknown format {requested!r}; choose one of {', '.join(FORMATS)}")
        paddle = requested in ('passl', 'paddle')
        if paddle and suffix not in _PADDLE_SUFFIXES:
            raise ValueError(f'Paddle weights are .pdparams files, not {suffix or "extension-less"} ones')
        if not paddle and suffix in _PADDLE_SUFFIXES:
            raise ValueError(f'{path}: a {suffix} file would hold Paddle weights; use --to passl|paddle or another name')
        return requested
    if suffix in _PADDLE_SUFFIXES:
        return 'passl'
    if suffix == '.safetensors':
        return 'safetensors'
    if suffix in ('.pth', '.pt', '.bin', '.tar'):
        return 'official'
    raise ValueError(f'cannot tell the format from {Path(path).name!r}; pass --to {"|".join(FORMATS)}')


def _refuse_overwriting_source(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    src, dst = Path(src), Path(dst)
    if dst.exists() and src.exists() and os.path.samefile(src, dst):
        raise CheckpointError(f'{dst}: is the file being read; write the result to another name')


def save_state_dict(state_dict: dict[str, torch.Tensor], path: str | os.PathLike, fmt: str,
                    model_name: str | None = None, timm_fn=None, passl_fn=None,
                    metadata: dict[str, str] | None = None) -> None:
    """Write our state dict as `fmt`.

    - passl: `backbone.*` + `head.fc_cls.*` NumPy pickle, what PASSL's `--load` reads, under the
      names of PASSL's port (`passl_fn` renames ours, where its port renamed modules);
    - paddle: the flat Paddle layout of our module names (Linear weights [in, out], BatchNorm
      `_mean` / `_variance`), what a Paddle port mirroring the PyTorch modules loads;
    - official: `{'model': state_dict}`, like facebookresearch/xcit's released files;
    - timm: timm's key layout, flat (`.pth`) or as safetensors when the path ends so;
    - safetensors: our layout, with the model name and format version in the metadata.

    `metadata` adds to or overrides a safetensors file's metadata (the Hugging Face Hub's readers
    expect `format: pt`).
    """
    path = Path(path)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == 'timm':
        if timm_fn is None:
            raise ValueError(f'timm has no implementation of {model_name or "this model"}: no timm layout to write')
        state_dict = timm_fn(state_dict)
    with atomic_write(path) as tmp:
        if fmt == 'passl':
            write_paddle_pickle(to_paddle(passl_fn(state_dict) if passl_fn else state_dict), tmp)
        elif fmt == 'paddle':
            write_paddle_pickle(to_paddle(state_dict, wrapped=False), tmp)
        elif fmt == 'safetensors' or path.suffix.lower() == '.safetensors':
            from safetensors.torch import save
            metadata = dict(format='xcit', format_version=SAFETENSORS_FORMAT_VERSION,
                            layout='timm' if fmt == 'timm' else 'xcit', model=model_name or '') | (metadata or {})
            data = save({k: v.contiguous() for k, v in state_dict.items()}, metadata=metadata)
            # written by Python, not by safetensors.save_file: that one does not report a full disk
            with open(tmp, 'wb') as f:
                f.write(data)
        else:
            # through a Python file, so a full disk is an OSError, not the zip writer's bare RuntimeError
            with open(tmp, 'wb') as f:
                torch.save({'model': state_dict} if fmt == 'official' else state_dict, f)


def _build_timm_model(model_name: str, num_classes: int | None):
    import timm
    if not timm.is_model(model_name):
        raise ValueError(f'{model_name!r} is neither an xcit nor a timm model')
    kwargs = {} if num_classes is None else dict(num_classes=num_classes)
    return timm.create_model(model_name, pretrained=False, **kwargs)


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, model_name: str | None = None,
                       to: str | None = None, use_ema: bool = False, allow_nonfinite: bool = False,
                       ssl_part: str = 'teacher') -> tuple[str, str]:
    """Convert `src` (any readable format) to `dst`; returns (model name, written format).

    `model_name` may also be a timm model outside this package's families (a distillation
    teacher such as `regnety_160`): its weights are read through any adapter registered for
    it (PASSL's RegNet files) and written in timm's layout, the Teacher of a distillation
    checkpoint being the part taken. Of a DINO checkpoint (ours or facebookresearch/dino's)
    `ssl_part`'s backbone is written, a classification-ready file. Weights holding NaN or
    infinity are refused unless `allow_nonfinite`: a converted file should not pass a broken
    training run on as a usable one.
    """
    fmt = format_for_path(dst, to)
    _refuse_overwriting_source(src, dst)
    foreign = model_name is not None and not is_model(model_name)
    if foreign and fmt in ('passl', 'paddle'):
        raise ValueError(f'{model_name} is a timm model: it is written in timm\'s layout (--to timm), not Paddle\'s')
    state_dict, label = read_state_dict(src, use_ema, part='Teacher' if foreign else 'Student',
                                        ssl_part=ssl_part)
    nonfinite = nonfinite_tensors(state_dict)
    if nonfinite and not allow_nonfinite:
        raise CheckpointError(f'{label}: {describe_nonfinite(nonfinite)}; '
                              'pass allow_nonfinite=True (xcit convert --allow-nonfinite) to convert it anyway')
    guess = guess_weights(state_dict)
    if foreign and guess is not None and guess.architecture is not None and is_model(guess.architecture):
        foreign = False  # weights of one of our families: another --model is a wrong name, reported as such
    if model_name is None:
        if guess is None or guess.architecture is None:
            found = f' ({guess.description})' if guess else ''
            raise CheckpointError(f'{label}: cannot tell which model these weights belong to{found}; pass --model NAME')
        model_name = guess.architecture
        foreign = not is_model(model_name)
    num_classes = guess.num_classes if guess else None
    model = _build_timm_model(model_name, num_classes) if foreign else build_model(model_name, num_classes=num_classes)
    load_into(model, state_dict, strict=True, source=label)
    adapter = get_checkpoint_adapter(model)
    if fmt == 'passl' and not foreign and (adapter is None or adapter.passl_fn is None):
        raise ValueError(f'PASSL has no port of {model_name}; --to paddle writes the flat Paddle layout')
    timm_fn = dict if foreign else adapter and adapter.timm_fn  # a timm model is in timm's layout already
    save_state_dict(model.state_dict(), dst, fmt, model_name=model_name, timm_fn=timm_fn,
                    passl_fn=adapter and adapter.passl_fn)
    return model_name, fmt


def extract_weights(src: str | os.PathLike, output: str | os.PathLike, prefix: str = 'backbone',
                    remove_prefix: bool = False) -> int:
    """PASSL's `extract_weight.py`: keep the entries whose name starts with `prefix`, optionally without it.

    Typical use: the student of a distillation checkpoint (`--prefix Student --remove-prefix`).
    A `.pdparams`/`.pd` output is in PASSL's layout, anything else in ours. Returns the entry count.
    """
    prefix = prefix.rstrip('.')
    if not prefix:
        raise ValueError('the prefix is empty: name the part to keep, e.g. --prefix Student')
    _refuse_overwriting_source(src, output)
    obj = read_checkpoint(src)
    if not isinstance(obj, dict):
        raise CheckpointError(f'{src}: expected a mapping of weights, found {type(obj).__name__}')
    obj = next((obj[k] for k in ('state_dict', 'model') if isinstance(obj.get(k), dict)), obj)
    # whole name parts only: 'Student' keeps 'Student.*', never 'StudentX.*' (which removing would mangle)
    selected = {k: v for k, v in obj.items()
                if isinstance(k, str) and isinstance(v, torch.Tensor) and k.startswith(prefix + '.')}
    if not selected:
        heads = sorted({k.split('.')[0][:40] for k, v in obj.items()
                        if isinstance(k, str) and isinstance(v, torch.Tensor)})
        found = f"the tensors' names start with: {', '.join(heads[:10])}" if heads else 'it holds no named tensors'
        raise CheckpointError(f'{src}: no entry starts with {prefix[:100]!r}; {found}')
    nonfinite = nonfinite_tensors(selected)
    if nonfinite:
        _logger.warning('%s: %s', src, describe_nonfinite(nonfinite))
    if remove_prefix:
        selected = {k[len(prefix) + 1:]: v for k, v in selected.items()}
    from_passl = sniff_format(src) == 'pickle' or is_paddle_layout(selected)
    output = Path(output)
    suffix = output.suffix.lower()
    if suffix in _PADDLE_SUFFIXES and from_passl:
        with atomic_write(output) as tmp:  # already PASSL's layout: written exactly as selected
            write_paddle_pickle({k: to_numpy(v) for k, v in selected.items()}, tmp)
    elif suffix in _PADDLE_SUFFIXES:
        save_state_dict(selected, output, 'passl')
    else:
        ours = from_paddle(selected) if from_passl else selected
        save_state_dict(ours, output, 'safetensors' if suffix == '.safetensors' else 'official')
    return len(selected)
