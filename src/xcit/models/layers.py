"""Small layers shared by the model families."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn


class DropPath(nn.Module):
    """Stochastic depth: drops a residual branch for whole samples during training."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        mask_shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = x.new_empty(mask_shape).bernoulli_(keep_prob)
        return x * mask / keep_prob

    def extra_repr(self) -> str:
        return f'drop_prob={self.drop_prob}'


class Mlp(nn.Module):
    """Two-layer feed-forward network; `fc1`/`fc2` are the names every released checkpoint uses."""

    def __init__(self, in_features: int, hidden_features: int, act_layer=nn.GELU, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


def take_indices(num_blocks: int, indices: int | Sequence[int] | None) -> list[int]:
    """Resolve timm's `indices` convention: None = all blocks, int n = the last n, sequence = those (negatives count from the end)."""
    if indices is None:
        return list(range(num_blocks))
    if isinstance(indices, int):
        if not 0 < indices <= num_blocks:
            raise ValueError(f'cannot take the last {indices} of {num_blocks} blocks')
        return list(range(num_blocks - indices, num_blocks))
    resolved = sorted({i + num_blocks if i < 0 else i for i in indices})
    bad = [i for i in resolved if not 0 <= i < num_blocks]
    if bad:
        raise ValueError(f'block indices {bad} are out of range for a model with {num_blocks} blocks')
    return resolved
