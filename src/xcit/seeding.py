"""Seeded randomness that leaves the caller's random generators as it found them.

Augmentations (timm's transforms, Mixup) and layers (dropout, drop path) draw
from the global Python, NumPy and torch generators. Rather than reseeding those
globals and leaving them changed, every random piece of work runs inside
`rng_scope(seed)`: the generators are seeded (with `sample_seed(*parts)` of
e.g. seed, epoch and sample index) and restored afterwards. What happens inside
a scope is then a function of its seed alone, whatever ran before it, which is what
makes augmentation independent of workers and ranks and a resumed run bit-exact.
"""
from __future__ import annotations

import contextlib
import random
import zlib
from typing import Iterator

import numpy as np
import torch


def sample_seed(*parts: int) -> int:
    """A stable 32-bit seed from integers (Python's hash() of ints is not mixed enough)."""
    return zlib.crc32(np.asarray(parts, dtype=np.int64).tobytes())


@contextlib.contextmanager
def rng_scope(seed: int) -> Iterator[None]:
    """Run the block with Python's, NumPy's and torch's (CPU and CUDA) generators seeded with `seed`."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    # this process's GPU only: touching the others would create a CUDA context on each
    devices = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        # torch.manual_seed would also queue seeds for every GPU and backend: 100x slower, per sample
        torch.default_generator.manual_seed(seed)
        if devices:
            torch.cuda.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
