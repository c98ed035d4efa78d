"""AdamW with the official or PASSL weight-decay exclusions, and a per-iteration warmup + cosine schedule."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..config import OptimConfig, ScheduleConfig


def decay_groups(model: nn.Module, weight_decay: float, rule: str = 'official',
                 no_decay_names: tuple[str, ...] | list[str] = ()) -> list[dict]:
    """Split parameters into decayed and non-decayed groups.

    official (facebookresearch/xcit with timm 0.4.9): no decay for 1-D parameters,
    biases and the names in `model.no_weight_decay()` (the class token); XCA's
    temperature (h, 1, 1) is decayed.
    passl: no decay for names containing any of `no_decay_names` (substring match,
    so 'pos_embed' also matches `pos_embeder.*`); norms, biases and LayerScale gammas are decayed.
    """
    skip = set(getattr(model, 'no_weight_decay', lambda: set())())
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if rule == 'official':
            exempt = param.ndim <= 1 or name.endswith('.bias') or name in skip
        elif rule == 'passl':
            exempt = any(s in name for s in no_decay_names)
        else:
            raise ValueError(f"unknown weight-decay rule {rule!r}: 'official' or 'passl'")
        (no_decay if exempt else decay).append(param)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


def peak_lr(optim: OptimConfig, global_batch: int) -> float:
    """The configured lr, scaled linearly with the global batch (all ranks and accumulation steps)
    when `optim.scale_lr` (official recipe)."""
    if not optim.scale_lr:
        return optim.lr
    return optim.lr * global_batch / optim.lr_base_batch


def build_optimizer(model: nn.Module, optim: OptimConfig, lr: float) -> torch.optim.Optimizer:
    groups = decay_groups(model, optim.weight_decay, optim.no_decay, optim.no_decay_names)
    return torch.optim.AdamW(groups, lr=lr, betas=optim.betas, eps=optim.eps)


@dataclass
class WarmupCosine:
    """Linear warmup from `warmup_lr` to `peak_lr`, then cosine to `min_lr`, evaluated per optimizer step."""
    peak_lr: float
    total_steps: int
    warmup_steps: int
    warmup_lr: float
    min_lr: float

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_lr + (self.peak_lr - self.warmup_lr) * step / self.warmup_steps
        decay_steps = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / decay_steps, 1.0)
        return self.min_lr + 0.5 * (self.peak_lr - self.min_lr) * (1 + math.cos(math.pi * progress))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        lr = self(step)
        for group in optimizer.param_groups:
            group['lr'] = lr
        return lr


def build_schedule(s: ScheduleConfig, lr: float, steps_per_epoch: int) -> WarmupCosine:
    return WarmupCosine(peak_lr=lr, total_steps=s.epochs * steps_per_epoch,
                        warmup_steps=round(s.warmup_epochs * steps_per_epoch), warmup_lr=s.warmup_lr, min_lr=s.min_lr)
