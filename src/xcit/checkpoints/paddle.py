"""PaddlePaddle `.pdparams` / `.pd` files: bare pickles of NumPy arrays, read without running code.

`paddle.save` pickles each tensor as a NumPy array (inside nested objects as a
`(parameter_name, array)` pair) and adds a `StructuredToParameterName@@` name
table. The unpickler below can rebuild exactly that, numpy arrays, dtypes and
plain containers, and refuses every other global, so a file that would run code
on load is rejected before anything runs.
"""
from __future__ import annotations

import importlib
import pickle
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import CheckpointError

# (module, name) pairs a Paddle weights file may reference; NumPy 1 and 2 spell the core module differently
_ALLOWED_GLOBALS = {
    ('numpy', 'ndarray'),
    ('numpy', 'dtype'),
    ('numpy.core.multiarray', '_reconstruct'),
    ('numpy._core.multiarray', '_reconstruct'),
    ('numpy.core.multiarray', 'scalar'),
    ('numpy._core.multiarray', 'scalar'),
    ('numpy.core.numeric', '_frombuffer'),
    ('numpy._core.numeric', '_frombuffer'),
    ('_codecs', 'encode'),  # protocol 2 stores raw bytes as _codecs.encode(text, 'latin1')
    ('collections', 'OrderedDict'),
    ('builtins', 'tuple'),
}
NAME_TABLE_KEY = 'StructuredToParameterName@@'
BIG_PARAM_KEY = 'UnpackBigParamInfor@@'


class _ForbiddenGlobal(pickle.UnpicklingError):
    pass


class _WeightsOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise _ForbiddenGlobal(f'{module}.{name}')
        if module.startswith(('numpy.core', 'numpy._core')):
            # load the core module of the installed NumPy, whichever spelling wrote the file
            suffix = module.split('core', 1)[1]
            for candidate in ('numpy._core' + suffix, 'numpy.core' + suffix):
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter('ignore', DeprecationWarning)
                        return getattr(importlib.import_module(candidate), name)
                except (ImportError, AttributeError):
                    continue
        return super().find_class(module, name)


def _to_torch(obj: Any) -> Any:
    """Arrays -> tensors, Paddle's (name, array) pairs -> tensors, containers recursively."""
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[0], str) and isinstance(obj[1], np.ndarray):
        return _to_torch(obj[1])
    if isinstance(obj, dict):
        return {k: _to_torch(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_torch(v) for v in obj)
    return obj


def read_paddle_pickle(path: str | Path) -> Any:
    """The file's contents with arrays as CPU tensors and Paddle's name table removed."""
    path = Path(path)
    try:
        with open(path, 'rb') as f:
            obj = _WeightsOnlyUnpickler(f, encoding='latin1').load()
    except _ForbiddenGlobal as e:
        raise CheckpointError(
            f'{path}: refused: the pickle references {e}, which is code, not weights; '
            f'loading it could run arbitrary commands') from None
    except pickle.UnpicklingError as e:
        raise CheckpointError(f'{path}: the file is truncated or corrupt ({e})') from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, MemoryError) as e:
        raise CheckpointError(f'{path}: the file is truncated or corrupt ({type(e).__name__}: {e})') from None
    if isinstance(obj, dict):
        obj.pop(NAME_TABLE_KEY, None)
        if BIG_PARAM_KEY in obj:
            raise CheckpointError(f'{path}: parameters split into slices ({BIG_PARAM_KEY}) are not supported')
        if isinstance(obj.get('state_dict'), dict):
            obj['state_dict'].pop(NAME_TABLE_KEY, None)
    return _to_torch(obj)


# --- PASSL layout <-> ours -------------------------------------------------------------------------

_BN_RENAMES = (('._mean', '.running_mean'), ('._variance', '.running_var'))


def is_paddle_layout(state_dict: dict) -> bool:
    """Paddle names BatchNorm statistics `_mean`/`_variance`, and PASSL's classifier is `head.fc_cls`."""
    return any(k.endswith(('._mean', '._variance')) or k.startswith('head.fc_cls.') for k in state_dict)


def from_paddle(state_dict: dict) -> dict[str, torch.Tensor]:
    """A PASSL/Paddle state dict in PyTorch's conventions and our key layout.

    Linear weights are stored [in, out] by Paddle: every 2-D tensor is
    transposed, which is right for these models because their only 2-D
    parameters are Linear weights. BatchNorm statistics are renamed; the
    `backbone.` prefix and the `head.fc_cls` classifier wrapper are removed.
    """
    out = {}
    for key, value in state_dict.items():
        if key.startswith('backbone.'):
            key = key[len('backbone.'):]
        if key.startswith('head.fc_cls.'):
            key = 'head.' + key[len('head.fc_cls.'):]
        for old, new in _BN_RENAMES:
            if key.endswith(old):
                key = key[: -len(old)] + new
        out[key] = value.t().contiguous() if value.ndim == 2 else value
    return out


def to_paddle(state_dict: dict) -> dict[str, np.ndarray]:
    """Our state dict in the layout PASSL's `--load` expects: `backbone.*` + `head.fc_cls.*`, NumPy arrays."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith('num_batches_tracked'):  # Paddle's BatchNorm has no such buffer
            continue
        for new, old in _BN_RENAMES:
            if key.endswith(old):
                key = key[: -len(old)] + new
        key = 'head.fc_cls.' + key[len('head.'):] if key.startswith('head.') else 'backbone.' + key
        array = value.detach().cpu()
        out[key] = (array.t() if array.ndim == 2 else array).contiguous().numpy()
    return out


def write_paddle_pickle(obj: Any, path: str | Path) -> None:
    """What `paddle.save` writes for a dict of arrays (pickle protocol 4), without needing Paddle."""
    with open(path, 'wb') as f:
        pickle.dump(obj, f, protocol=4)
