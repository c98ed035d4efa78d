"""The classifier half of timm's model API, shared by every family."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from .layers import Linear, take_indices


def plan_intermediates(num_layers: int, indices: int | Sequence[int] | None, output_fmt: str, stop_early: bool
                       ) -> tuple[list[int], int]:
    """For `forward_intermediates`: the layers to tap and the last one to run (all of them unless `stop_early`)."""
    if output_fmt not in ('NCHW', 'NLC'):
        raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', not {output_fmt!r}")
    take = take_indices(num_layers, indices)
    return take, take[-1] if stop_early else num_layers - 1


class ClassifierMixin:
    """Pooling choices, a replaceable head and `forward`, for classes that set `num_features`, `head`,
    `head_drop` and `global_pool` (and `num_prefix_tokens` for token pooling; FCViT pools maps instead)."""

    pool_types: tuple[str, ...] = ('token', 'avg', '')

    def _check_pool(self, global_pool: str) -> str:
        if global_pool not in self.pool_types:
            choices = ', '.join(repr(p) for p in self.pool_types)
            raise ValueError(f'global_pool must be one of {choices}, not {global_pool!r}')
        return global_pool

    def _init_head(self, head: nn.Linear) -> None:
        nn.init.trunc_normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)

    def _new_head(self, num_classes: int) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        head = Linear(self.num_features, num_classes, device=next(self.parameters()).device)
        self._init_head(head)
        return head

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            self.global_pool = self._check_pool(global_pool)
        self.num_classes = num_classes
        self.head = self._new_head(num_classes)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool (B, prefix + N, C) tokens, the class token or the patches' mean, and classify."""
        if self.global_pool == 'token':
            x = x[:, 0]  # (B, C)
        elif self.global_pool == 'avg':
            x = x[:, self.num_prefix_tokens:].mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
