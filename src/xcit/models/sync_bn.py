"""BatchNorm for multi-GPU training.

The models use plain BatchNorm2d so that they run on a CPU or a single GPU (the
official code hard-codes SyncBatchNorm, which fails there). Convert only when
training with several CUDA processes.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def convert_sync_batchnorm(model: nn.Module, process_group=None) -> nn.Module:
    """Every BatchNorm*d becomes SyncBatchNorm, sharing batch statistics across the process group."""
    if not torch.cuda.is_available():
        raise RuntimeError('SyncBatchNorm runs only on CUDA devices; keep BatchNorm2d for CPU training')
    return nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group)
