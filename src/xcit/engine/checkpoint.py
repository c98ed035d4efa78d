"""Training checkpoints: everything needed to continue a run exactly, written so a crash never corrupts one.

Each file is written under a temporary name and renamed into place, so `last.pth`
is always a complete checkpoint, even when the process is killed mid-write.
Files load with `torch.load(weights_only=True)`: they hold tensors and plain
Python values only. No random-generator state is stored: every step and every
sample runs in an RNG scope seeded from its position in the run (`xcit.seeding`).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

FORMAT = 'xcit-train'
FORMAT_VERSION = 2  # 2: the task's engine layout (`best`, `task`); no RNG state


def atomic_save(obj, path: Path) -> None:
    """`torch.save` that leaves the previous file intact, and no temporary one, when writing fails."""
    from ..checkpoints.io import atomic_write
    with atomic_write(path) as tmp, open(tmp, 'wb') as f:
        torch.save(obj, f)  # to a Python file: a full disk raises OSError rather than the zip writer's RuntimeError


class CheckpointWriter:
    """`last.pth` (every epoch, and every N steps if asked), `best.pth` by the task's metric, the last N `epoch_*.pth`."""

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
