"""AdamW with the official, PASSL or dense-recipe weight-decay exclusions and optional layer-wise lr decay,
and a per-iteration warmup + cosine, step or poly schedule."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..config import OptimConfig, ScheduleConfig


def _exempt_from_decay(model: nn.Module, rule: str, no_decay_names) -> set[str]:
    """Names of the parameters a rule keeps out of weight decay.

    official (facebookresearch/xcit with timm 0.4.9): 1-D parameters, biases and the names in
    `model.no_weight_decay()` (the class token); XCA's temperature (h, 1, 1) is decayed.
    passl: names containing any of `no_decay_names` (substring match, so 'pos_embed' also matches
    `pos_embeder.*`); norms, biases and LayerScale gammas are decayed.
    layernorm (the official detection and segmentation recipes, whose `norm` key matches the block
    LayerNorms only): LayerNorm weights and biases; BatchNorm, biases and everything else are decayed.
    dino (facebookresearch/dino): 1-D parameters and biases; the class token and temperatures are decayed.
    """
    if rule in ('official', 'dino'):
        skip = set(getattr(model, 'no_weight_decay', lambda: set())()) if rule == 'official' else set()
        return {n for n, p in model.named_parameters() if p.ndim <= 1 or n.endswith('.bias') or n in skip}
    if rule == 'passl':
        return {n for n, _ in model.named_parameters() if any(s in n for s in no_decay_names)}
    if rule == 'layernorm':
        return {f'{m_name}.{p_name}' if m_name else p_name for m_name, module in model.named_modules()
                if isinstance(module, nn.LayerNorm) for p_name, _ in module.named_parameters(recurse=False)}
    raise ValueError(f"unknown weight-decay rule {rule!r}: 'official', 'passl', 'layernorm' or 'dino'")


_BLOCK = re.compile(r'(?:^|\.)blocks\.(\d+)\.')
_STEM = {'patch_embed', 'pos_embed', 'pos_embeder', 'cls_token', 'dist_token'}


def layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    """Each parameter's depth for layer-wise lr decay, and the top: the stem (patch embedding, positional
    encoding, tokens) is 0, `blocks.i` is i + 1, the rest (class attention, adapters, necks, heads) the top."""
    names = [n for n, _ in model.named_parameters()]
    blocks = [int(m.group(1)) for m in map(_BLOCK.search, names) if m]
    if not blocks:
        raise ValueError(f'optim.layer_decay needs a model with numbered `blocks.N`; {type(model).__name__} has none')
    top = max(blocks) + 2
    ids = {}
    for name in names:
        match = _BLOCK.search(name)
        ids[name] = int(match.group(1)) + 1 if match else 0 if _STEM & set(name.split('.')) else top
    return ids, top


def decay_groups(model: nn.Module, weight_decay: float, rule: str = 'official',
                 no_decay_names: tuple[str, ...] | list[str] = (), layer_decay: float | None = None) -> list[dict]:
    """Parameter groups: decayed or not by `rule`, and, with `layer_decay`, one pair per depth whose
    `lr_scale` the schedule multiplies in."""
    exempt = _exempt_from_decay(model, rule, no_decay_names)
    ids, top = layer_ids(model) if layer_decay is not None else ({}, 0)
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        depth, decayed = ids.get(name, top), name not in exempt
        group = groups.setdefault((depth, decayed), dict(params=[], weight_decay=weight_decay if decayed else 0.0,
                                                         decayed=decayed))
        if layer_decay is not None:
            group['lr_scale'] = layer_decay ** (top - depth)
        group['params'].append(param)
    if layer_decay is None:  # always the two groups, decayed first, so optimizer states keep their layout
        return [groups.get((0, True), dict(params=[], weight_decay=weight_decay, decayed=True)),
                groups.get((0, False), dict(params=[], weight_decay=0.0, decayed=False))]
    return [groups[key] for key in sorted(groups, key=lambda k: (k[0], not k[1]))]


def peak_lr(optim: OptimConfig, global_batch: int) -> float:
    """The configured lr, scaled linearly with the global batch (all ranks and accumulation steps)
    when `optim.scale_lr` (official recipe)."""
    if not optim.scale_lr:
        return optim.lr
    return optim.lr * global_batch / optim.lr_base_batch


def build_optimizer(model: nn.Module, optim: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """AdamW over `decay_groups`, fused (one kernel over all tensors, the same update) where every parameter
    is a float on the CPU or CUDA: a per-tensor loop over a small model's few hundred tensors costs a
    noticeable share of a CPU step."""
    groups = decay_groups(model, optim.weight_decay, optim.no_decay, optim.no_decay_names, optim.layer_decay)
    params = [p for g in groups for p in g['params']]
    fused = bool(params) and all(p.is_floating_point() and p.device.type in ('cpu', 'cuda') for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=optim.betas, eps=optim.eps, fused=fused or None)


@dataclass
class WarmupDecay:
    """Linear warmup from `warmup_lr` to `peak_lr`, then a decay, evaluated per optimizer step.

    cosine: half a cosine down to `min_lr` (timm, the classification recipes); step: `peak_lr` times
    `gamma` per milestone passed (mmdet's Mask R-CNN schedules); poly: `(1 - progress) ** power` down to
    `min_lr` (mmseg's). Progress runs from the end of warmup to the last step. With `weight_decay`
    (start, end), the decayed groups' weight decay follows half a cosine from start to end over all
    steps, without warmup (DINO).
    """
    peak_lr: float
    total_steps: int
    warmup_steps: int
    warmup_lr: float
    min_lr: float
    decay: str = 'cosine'
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    power: float = 1.0
    weight_decay: tuple[float, float] | None = None

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_lr + (self.peak_lr - self.warmup_lr) * step / self.warmup_steps
        if self.decay == 'step':
            return self.peak_lr * self.gamma ** sum(step >= m for m in self.milestones)
        progress = min((step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1), 1.0)
        if self.decay == 'poly':
            return self.min_lr + (self.peak_lr - self.min_lr) * (1 - progress) ** self.power
        return self.min_lr + 0.5 * (self.peak_lr - self.min_lr) * (1 + math.cos(math.pi * progress))

    def weight_decay_at(self, step: int) -> float | None:
        if self.weight_decay is None:
            return None
        start, end = self.weight_decay
        return end + 0.5 * (start - end) * (1 + math.cos(math.pi * min(step / max(self.total_steps, 1), 1.0)))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        lr, weight_decay = self(step), self.weight_decay_at(step)
        for group in optimizer.param_groups:
            group['lr'] = lr * group.get('lr_scale', 1.0)
            if weight_decay is not None and group.get('decayed', group['weight_decay'] > 0):
                group['weight_decay'] = weight_decay
        return lr


def build_schedule(s: ScheduleConfig, lr: float, steps_per_epoch: int, optim: OptimConfig | None = None
                   ) -> WarmupDecay:
    warmup = s.warmup_steps if s.warmup_steps is not None else round(s.warmup_epochs * steps_per_epoch)
    weight_decay = None
    if optim is not None and optim.weight_decay_end is not None:
        weight_decay = (optim.weight_decay, optim.weight_decay_end)
    return WarmupDecay(peak_lr=lr, total_steps=s.epochs * steps_per_epoch, warmup_steps=warmup,
                       warmup_lr=s.warmup_lr, min_lr=s.min_lr, decay=s.decay,
                       milestones=tuple(round(m * steps_per_epoch) for m in s.milestones), gamma=s.gamma,
                       power=s.power, weight_decay=weight_decay)
