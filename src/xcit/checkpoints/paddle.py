"""PaddlePaddle `.pdparams` / `.pd` files: bare pickles of NumPy arrays, read without running code.

`paddle.save` pickles each tensor as a NumPy array (inside nested objects as a
`(parameter_name, array)` pair) and adds a `StructuredToParameterName@@` name
table. The unpickler below can rebuild exactly that, numpy arrays, dtypes and
plain containers, and refuses every other global, so a file that would run code
on load is rejected before anything runs.
"""
from __future__ import annotations

import contextlib
import importlib
import pickle
import sys
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


def _latin1_encode(text: str, encoding: str = 'utf-8') -> bytes:
    # protocol 2 pickles bytes as _codecs.encode(text, 'latin1'); no other codec is needed, so none is reachable
    if not isinstance(text, str) or encoding.lower().replace('_', '-') not in ('latin1', 'latin-1'):
        raise _ForbiddenGlobal(f'_codecs.encode with the {encoding!r} codec')
    return text.encode('latin1')


class _WeightsOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise _ForbiddenGlobal(f'{module}.{name}')
        if (module, name) == ('_codecs', 'encode'):
            return _latin1_encode
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


_KIND_NAMES = {'U': 'text', 'S': 'bytes', 'O': 'Python objects', 'V': 'raw records', 'M': 'dates',
               'm': 'time spans'}


class _NotNumeric(Exception):
    def __init__(self, key: str, dtype: np.dtype):
        super().__init__(key, dtype)
        self.key, self.dtype = key, dtype


def _to_tensor(array: np.ndarray, key: str) -> torch.Tensor:
    dtype = array.dtype
    if dtype.kind not in 'biufc':  # strings, objects, records, dates: not weights
        raise _NotNumeric(key, dtype)
    if not dtype.isnative:  # big-endian files: the same values in the machine's byte order
        array = array.astype(dtype.newbyteorder('='))
    try:
        return torch.from_numpy(np.ascontiguousarray(array))
    except TypeError:  # numeric, but without a torch dtype (long double)
        raise _NotNumeric(key, dtype) from None


def _to_torch(obj: Any, key: str = '', done: dict[int, Any] | None = None) -> Any:
    """Arrays -> tensors, Paddle's (name, array) pairs -> tensors, containers recursively.

    `key` is where `obj` sits in the file (`state_dict.backbone.cls_token`), for error messages.
    A pickle can reference one object many times (a few hundred bytes can nest lists
    2**30 references deep), so each object is converted once and shared, as in the file.
    """
    done = {} if done is None else done
    if id(obj) in done:
        return done[id(obj)]
    if isinstance(obj, np.ndarray):
        out = _to_tensor(obj, key or '(top level)')
    elif isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[0], str) and isinstance(obj[1], np.ndarray):
        out = _to_torch(obj[1], key, done)
    elif isinstance(obj, dict):
        out = {k: _to_torch(v, f'{key}.{k}' if key else str(k), done) for k, v in obj.items()}
    elif isinstance(obj, (list, tuple)):
        out = type(obj)(_to_torch(v, f'{key}[{i}]', done) for i, v in enumerate(obj))
    else:
        return obj
    done[id(obj)] = out
    return out


def _one_line(error: BaseException) -> str:
    """An error message as one short line: a damaged file can put anything in it, newlines included."""
    text = ' '.join(str(error).split())
    return text if len(text) <= 200 else text[:200] + '...'


@contextlib.contextmanager
def _numpy_internal_errors():
    """Collect the errors NumPy reports through sys.unraisablehook (printed as a traceback otherwise).

    A damaged dtype in a pickle can leave an array NumPy cannot clean up; it says so only there.
    """
    errors: list[BaseException] = []
    previous = sys.unraisablehook
    sys.unraisablehook = lambda info: errors.append(info.exc_value)
    try:
        yield errors
    finally:
        sys.unraisablehook = previous


def read_paddle_pickle(path: str | Path) -> Any:
    """The file's contents with arrays as CPU tensors and Paddle's name table removed."""
    path = Path(path)
    try:
        with open(path, 'rb') as f, _numpy_internal_errors() as internal:
            obj = _WeightsOnlyUnpickler(f, encoding='latin1').load()
        if internal:
            raise internal[0]
    except _ForbiddenGlobal as e:
        raise CheckpointError(
            f'{path}: refused: the pickle references {_one_line(e)}, which is code, not weights; '
            f'loading it could run arbitrary commands') from None
    except OSError as e:
        raise CheckpointError(f'{path}: cannot read the file ({e.strerror or e})') from None
    except Exception as e:  # a damaged pickle surfaces as almost any error type from the unpickler and NumPy
        raise CheckpointError(
            f'{path}: the file is truncated or corrupt ({type(e).__name__}: {_one_line(e)})') from None
    if isinstance(obj, dict):
        obj.pop(NAME_TABLE_KEY, None)
        if BIG_PARAM_KEY in obj:
            raise CheckpointError(f'{path}: parameters split into slices ({BIG_PARAM_KEY}) are not supported')
        if isinstance(obj.get('state_dict'), dict):
            obj['state_dict'].pop(NAME_TABLE_KEY, None)
    try:
        return _to_torch(obj)
    except _NotNumeric as e:
        what = (f'{_KIND_NAMES[e.dtype.kind]} ({e.dtype.str}), not numbers' if e.dtype.kind in _KIND_NAMES
                else f'{e.dtype.str} numbers, which PyTorch has no dtype for')
        raise CheckpointError(f'{path}: entry {e.key[:200]!r} holds {what}: not a weights file') from None
    except RecursionError:
        raise CheckpointError(f'{path}: the file nests containers too deeply to be a weights file') from None


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


def to_paddle(state_dict: dict, wrapped: bool = True) -> dict[str, np.ndarray]:
    """Our state dict in Paddle's conventions, NumPy arrays: Linear weights [in, out], BatchNorm `_mean` /
    `_variance`. `wrapped`: inside PASSL's `backbone.*` + `head.fc_cls.*` (what its `--load` expects);
    else flat, under the module names as they are (what a Paddle port of the PyTorch module tree loads
    with `set_state_dict`)."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith('num_batches_tracked'):  # Paddle's BatchNorm has no such buffer
            continue
        for new, old in _BN_RENAMES:
            if key.endswith(old):
                key = key[: -len(old)] + new
        if wrapped:
            key = 'head.fc_cls.' + key[len('head.'):] if key.startswith('head.') else 'backbone.' + key
        array = value.detach().cpu()
        out[key] = to_numpy(array.t() if array.ndim == 2 else array)
    return out


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A contiguous NumPy copy; bfloat16, which NumPy lacks, is widened to float32 without loss."""
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.contiguous().numpy()


def write_paddle_pickle(obj: Any, path: str | Path) -> None:
    """What `paddle.save` writes for a dict of arrays (pickle protocol 4), without needing Paddle."""
    with open(path, 'wb') as f:
        pickle.dump(obj, f, protocol=4)
