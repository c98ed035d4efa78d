"""Reading checkpoint files without trusting them, and writing files so a failure never corrupts one.

Every common weight format except safetensors is a pickle, and unpickling can
run arbitrary code. PyTorch files go through `torch.load(weights_only=True)`;
the format is recognised from the file's first bytes, not its extension.
Checkpoints and converted weights are written through `atomic_write`.
"""
from __future__ import annotations

import argparse
import errno
import os
import pickle
import re
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from .errors import CheckpointError, WriteError
from .paddle import read_paddle_pickle

# torch.save's legacy (non-zip) format starts by pickling this magic number (opcode LONG1, 10 bytes)
_LEGACY_TORCH_MAGIC = b'\x8a\x0a' + (0x1950A86A20F9469CFC6C).to_bytes(10, 'little')


def sniff_format(path: str | os.PathLike) -> str:
    """'torch', 'torch-legacy', 'pickle', 'safetensors', or 'unknown', from the file's first bytes."""
    with open(path, 'rb') as f:
        head = f.read(16)
        size = f.seek(0, os.SEEK_END)
    if head.startswith(b'PK\x03\x04'):
        return 'torch'
    # safetensors: an 8-byte little-endian header length, then the JSON header; checked before the pickle
    # marker, since a header length whose low byte is 0x80 starts the file as a pickle does
    if len(head) >= 9 and head[8:9] == b'{' and int.from_bytes(head[:8], 'little') + 8 <= size:
        return 'safetensors'
    if head[:1] == b'\x80':
        return 'torch-legacy' if head[2:14] == _LEGACY_TORCH_MAGIC else 'pickle'
    return 'unknown'


def _check_file(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f'{path}: no such file')
    if path.is_dir():
        raise CheckpointError(f'{path}: is a directory, not a checkpoint file')
    if path.stat().st_size == 0:
        raise CheckpointError(f'{path}: the file is empty')


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= 200 else text[:200] + '...'


def _refusal(path: Path, error: pickle.UnpicklingError) -> CheckpointError:
    """What the weights-only unpickler refused, without PyTorch's advice to load the file unsafely."""
    message = str(error)
    found = re.search(r'GLOBAL ([\w.]+)', message)
    if found:
        what = f'references {found.group(1)}, which is code, not weights'
    else:
        detail = re.search(r'WeightsUnpickler error: ([^\n]*)', message)
        what = 'holds objects other than tensors and plain values' + (
            f' ({detail.group(1).split(". ")[0][:150]})' if detail else '')
    return CheckpointError(f'{path}: refused: the pickle {what}; loading it could run arbitrary code')


def _torch_load(path: Path) -> Any:
    try:
        # argparse.Namespace is only attribute storage: official training checkpoints keep their args in one
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            # a damaged header reads as an odd protocol number: the error that follows says enough
            warnings.filterwarnings('ignore', message='Detected pickle protocol', category=UserWarning)
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        if 'Weights only load failed' in str(e):
            raise _refusal(path, e) from None
        raise CheckpointError(f'{path}: the file is truncated or corrupt ({_first_line(e)})') from None
    except Exception as e:  # a damaged file surfaces as almost any error type from the zip and pickle readers
        raise CheckpointError(f'{path}: the file is truncated or corrupt ({_first_line(e)})') from None


def _safetensors_load(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors import safe_open
    except ImportError:
        raise CheckpointError(f'{path}: reading safetensors files needs the safetensors package') from None
    try:
        with safe_open(str(path), framework='pt', device='cpu') as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
            tensors['__metadata__'] = f.metadata() or {}
        return tensors
    except Exception as e:  # safetensors raises its own error types for every kind of corruption
        raise CheckpointError(f'{path}: the safetensors file is truncated or corrupt ({_first_line(e)})') from None


def read_checkpoint(path: str | os.PathLike) -> Any:
    """Load a checkpoint file's contents on the CPU, refusing anything that could execute code."""
    path = Path(path)
    try:
        _check_file(path)
        fmt = sniff_format(path)
    except OSError as e:
        raise CheckpointError(f'{path}: cannot read the file ({e.strerror or e})') from None
    if fmt in ('torch', 'torch-legacy'):
        return _torch_load(path)
    if fmt == 'safetensors':
        return _safetensors_load(path)
    if fmt == 'pickle':
        return read_paddle_pickle(path)
    raise CheckpointError(
        f'{path}: not a checkpoint: expected a PyTorch (.pth), PaddlePaddle (.pdparams, .pd) '
        f'or safetensors file')


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path next to `path` to write to, renamed onto `path` once the block succeeds.

    The file is flushed to disk before the rename, so `path` holds either its old
    contents or the complete new ones, never a partial file. On any failure the
    temporary file is removed; an OSError (full disk, read-only folder) becomes a
    one-line `WriteError` naming `path`. Missing parent folders are created.
    """
    path = Path(path)
    tmp = path.with_name(f'{path.name}.{os.getpid()}.tmp')  # per process: two writers never share one
    try:
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, 'it is a directory')
        blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        if blocking is not None:  # mkdir would only say 'File exists'
            raise NotADirectoryError(errno.ENOTDIR, f'{blocking} is a file, not a folder')
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.unlink(missing_ok=True)
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except OSError as e:
        _discard(tmp)
        raise WriteError(e.errno, e.strerror or _first_line(e), str(path)) from None
    except BaseException:
        _discard(tmp)
        raise
    try:  # the rename itself survives a power cut only once the folder is flushed too
        _fsync(path.parent)
    except OSError:
        pass  # some platforms and file systems cannot fsync a folder; the data itself is already on disk


def _discard(tmp: Path) -> None:
    try:
        tmp.unlink(missing_ok=True)
    except OSError:
        pass  # the original error matters more than a temporary file that could not be removed
