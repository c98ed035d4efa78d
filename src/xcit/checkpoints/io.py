"""Reading checkpoint files without trusting them.

Every common weight format except safetensors is a pickle, and unpickling can
run arbitrary code. PyTorch files go through `torch.load(weights_only=True)`;
the format is recognised from the file's first bytes, not its extension.
"""
from __future__ import annotations

import argparse
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError
from .paddle import read_paddle_pickle

# torch.save's legacy (non-zip) format starts by pickling this magic number (opcode LONG1, 10 bytes)
_LEGACY_TORCH_MAGIC = b'\x8a\x0a' + (0x1950A86A20F9469CFC6C).to_bytes(10, 'little')


def sniff_format(path: str | os.PathLike) -> str:
    """'torch', 'torch-legacy', 'pickle', 'safetensors', or 'unknown', from the file's first bytes."""
    with open(path, 'rb') as f:
        head = f.read(16)
    if head.startswith(b'PK\x03\x04'):
        return 'torch'
    if head[:1] == b'\x80':
        return 'torch-legacy' if head[2:14] == _LEGACY_TORCH_MAGIC else 'pickle'
    if len(head) >= 9 and head[8:9] == b'{':
        return 'safetensors'
    return 'unknown'


def _check_file(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f'{path}: no such file')
    if path.is_dir():
        raise CheckpointError(f'{path}: is a directory, not a checkpoint file')
    if path.stat().st_size == 0:
        raise CheckpointError(f'{path}: the file is empty')


def _torch_load(path: Path) -> Any:
    try:
        # argparse.Namespace is only attribute storage: official training checkpoints keep their args in one
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f'{path}: refused: the file holds code or objects other than weights, which could run on load '
            f'({str(e).splitlines()[0][:200]})') from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f'{path}: the file is truncated or corrupt ({str(e).splitlines()[0][:200]})') from None


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
        raise CheckpointError(f'{path}: the safetensors file is truncated or corrupt ({e})') from None


def read_checkpoint(path: str | os.PathLike) -> Any:
    """Load a checkpoint file's contents on the CPU, refusing anything that could execute code."""
    path = Path(path)
    _check_file(path)
    fmt = sniff_format(path)
    if fmt in ('torch', 'torch-legacy'):
        return _torch_load(path)
    if fmt == 'safetensors':
        return _safetensors_load(path)
    if fmt == 'pickle':
        return read_paddle_pickle(path)
    raise CheckpointError(
        f'{path}: not a checkpoint: expected a PyTorch (.pth), PaddlePaddle (.pdparams, .pd) '
        f'or safetensors file')
