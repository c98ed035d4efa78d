"""Training checkpoints: everything needed to continue a run exactly, written so a crash never corrupts one.

Each file is written under a temporary name and renamed into place, so `last.pth`
is always a complete checkpoint, even when the process is killed mid-write.
Files load with `torch.load(weights_only=True)`: RNG states are stored as
tensors and plain Python values, never as pickled objects.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

FORMAT = 'xcit-train'
FORMAT_VERSION = 1


def rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = dict(python=random.getstate(), torch=torch.get_rng_state(),
                 numpy=dict(kind=kind, keys=torch.from_numpy(keys.astype(np.int64)), pos=int(pos),
                            has_gauss=int(has_gauss), cached=float(cached)))
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state['python'])
    torch.set_rng_state(state['torch'])
    n = state['numpy']
    np.random.set_state((n['kind'], n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'], n['cached']))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def atomic_save(obj, path: Path) -> None:
    """`torch.save` that leaves the previous file intact, and no temporary one, when writing fails."""
    from ..checkpoints.io import atomic_write
    with atomic_write(path) as tmp, open(tmp, 'wb') as f:
        torch.save(obj, f)  # to a Python file: a full disk raises OSError rather than the zip writer's RuntimeError


class CheckpointWriter:
    """`last.pth` (every epoch, and every N steps if asked), `best.pth` by top-1, the last N `epoch_*.pth`."""

    def __init__(self, run_dir: Path, keep_last: int):
        self.run_dir = run_dir
        self.keep_last = keep_last

    @property
    def last(self) -> Path:
        return self.run_dir / 'last.pth'

    def save_last(self, state: dict) -> Path:
        atomic_save(dict(state, format=FORMAT, format_version=FORMAT_VERSION), self.last)
        return self.last

    def _copy_of_last(self, name: str) -> None:
        from ..checkpoints.io import atomic_write
        with atomic_write(self.run_dir / name) as tmp:
            try:
                os.link(self.last, tmp)  # a hard link: the bytes are shared, and last.pth's next rename leaves them intact
            except OSError:
                shutil.copyfile(self.last, tmp)

    def end_of_epoch(self, state: dict, epoch: int, is_best: bool) -> None:
        self.save_last(state)
        self._copy_of_last(f'epoch_{epoch:04d}.pth')
        for old in sorted(self.run_dir.glob('epoch_*.pth'))[:-self.keep_last]:
            old.unlink()
        if is_best:
            self._copy_of_last('best.pth')
