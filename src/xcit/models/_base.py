"""What the three families share: the walk over their layers, timm's model API on top of it, and their builders.

Each family's trunk is a stem followed by `num_layers` layers (XCiT's XCA blocks, the
stages of CvT and FCViT) and supplies three hooks: `_stem(x)` starts the walk's state,
`_layer(i, state)` runs layer i, and `_tap(i, state)` reads that layer's patch tokens.
`forward_features`, `forward_intermediates` and the feature backbones are written once here.
"""
from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .fastpath import get_fast_path
from .layers import Linear, take_indices
from ..registry import IMAGENET_MEAN, IMAGENET_STD

State = Any  # what a family's layers hand each other: tokens and grid, a map and a class token, ...


def tokens_to_map(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, N, C) patch tokens -> (B, C, H, W)."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *grid)


def map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, C), a view."""
    return x.flatten(2).transpose(1, 2)


def plan_intermediates(num_layers: int, indices: int | Sequence[int] | None, output_fmt: str, stop_early: bool,
                       intermediates_only: bool) -> tuple[list[int], int]:
    """For `forward_intermediates`: the layers to tap and the last one to run.

    Nothing after the last tap is returned with `intermediates_only`, so the walk stops there.
    `stop_early` without it would hand back the final norm of a layer that is not the last
    as if it were the model's features: that is refused.
    """
    if output_fmt not in ('NCHW', 'NLC'):
        raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', not {output_fmt!r}")
    take = take_indices(num_layers, indices)
    if stop_early and not intermediates_only and take[-1] < num_layers - 1:
        raise ValueError(f'stop_early stops after layer {take[-1]} of {num_layers}, leaving no final features; '
                         'pass intermediates_only=True to get the intermediates alone')
    return take, take[-1] if stop_early or intermediates_only else num_layers - 1


class GradCheckpointing:
    """`set_grad_checkpointing`, and `run_block` for every module that runs blocks (the model, CvT's stages)."""

    grad_checkpointing: bool = False

    def run_block(self, block: nn.Module, *args) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass, trading compute for activation memory."""
        for module in self.modules():
            if isinstance(module, GradCheckpointing):
                module.grad_checkpointing = enable


class Trunk(GradCheckpointing):
    """A stem and `num_layers` layers, walked through the family's hooks."""

    num_layers: int

    def _stem(self, x: torch.Tensor) -> State:
        raise NotImplementedError

    def _layer(self, i: int, state: State) -> State:
        raise NotImplementedError

    def _tap(self, i: int, state: State) -> tuple[torch.Tensor, tuple[int, int]]:
        """Layer i's patch tokens (B, N, C) and their grid (H, W)."""
        raise NotImplementedError

    def _walk(self, x: torch.Tensor, take: Sequence[int], last: int
              ) -> tuple[State, list[tuple[torch.Tensor, tuple[int, int]]]]:
        """Run layers 0..last; the state after the last and the taps of the layers in `take`."""
        state = self._stem(x)
        taps = []
        for i in range(last + 1):
            state = self._layer(i, state)
            if i in take:
                taps.append(self._tap(i, state))
        return state, taps

    def feature_maps(self, x: torch.Tensor, indices: Sequence[int]) -> list[torch.Tensor]:
        """The (B, C, H, W) outputs of the layers `indices` (sorted, non-negative); nothing after the last runs."""
        _, taps = self._walk(x, indices, indices[-1])
        return [tokens_to_map(tokens, grid) for tokens, grid in taps]


class FeatureBackbone:
    """A trunk as a dense-prediction backbone: each chosen layer's (B, C, H, W) output, no final norm or head."""

    def __init__(self, out_indices: Sequence[int] | None = None, **trunk_kwargs):
        super().__init__(**trunk_kwargs)
        self.out_indices = take_indices(self.num_layers, out_indices)
        self.feature_info = [self.feature_info[i] for i in self.out_indices]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.feature_maps(x, self.out_indices)


class ClassifierMixin:
    """timm's classifier API over a `Trunk`, for classes that set `num_features`, `head`, `head_drop` and
    `global_pool` (and `num_prefix_tokens` for token pooling; FCViT pools maps instead), and supply
    `_final(state)` (forward_features' output from the last layer's state) and `_norm_tap`."""

    pool_types: tuple[str, ...] = ('token', 'avg', '')

    def _final(self, state: State) -> torch.Tensor:
        raise NotImplementedError

    def _norm_tap(self, i: int, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Layer i's tokens through the final norm, where that norm has their width."""
        raise NotImplementedError

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
        # on the path the rest of the model takes
        head = Linear(self.num_features, num_classes, device=next(self.parameters()).device,
                      impl=get_fast_path(self))
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

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        state, _ = self._walk(x, (), self.num_layers - 1)
        return self._final(state)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: int | Sequence[int] | None = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Layer outputs (patch tokens only), as (B, C, H, W) maps or (B, N, C) tokens.

        `indices`: None for every layer, an int n for the last n, or layer numbers (negatives count
        from the end). `norm` passes them through the final norm where it has their width. Unless
        `intermediates_only`, `forward_features`' output comes first in the returned pair, and
        `stop_early` (stop after the last tap) is refused if that leaves out any layer.
        """
        take, last = plan_intermediates(self.num_layers, indices, output_fmt, stop_early, intermediates_only)
        state, taps = self._walk(x, take, last)
        intermediates = []
        for i, (tokens, grid) in zip(take, taps):
            if norm:
                tokens = self._norm_tap(i, tokens, grid)
            intermediates.append(tokens if output_fmt == 'NLC' else tokens_to_map(tokens, grid))
        if intermediates_only:
            return intermediates
        return self._final(state), intermediates

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


def init_weights(module: nn.Module, norms: tuple[type, ...] = ()) -> None:
    """The official initialisation the families share (for `Module.apply`): trunc-normal(0.02) Linear
    weights and zero biases, unit scale and zero shift for the norm types `norms`; other modules keep PyTorch's."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, norms):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def staged_group_matcher(coarse: bool, stem: str, stage: str, block: str, stage_entry: str) -> dict:
    """timm's layer-decay groups for a model in stages: the stem first, then each stage (`coarse`) or each
    block, the layers that open a stage (`stage_entry`) joining its first block, the final norm last."""
    final = (r'^norm', (99999,))
    return dict(stem=stem, blocks=[(stage, None), final] if coarse else [(block, None), (stage_entry, (0,)), final])


def create_family(classifier: type, backbone: type, features_only: bool = False,
                  out_indices: Sequence[int] | None = None, **kwargs) -> nn.Module:
    """A registered name's model: the classifier, or with `features_only` the dense-prediction backbone.

    The backbone has no head, so the classifier's own keywords (those it does not pass on to the trunk) are dropped.
    """
    if features_only:
        own = {name for name, p in inspect.signature(classifier).parameters.items() if p.kind is not p.VAR_KEYWORD}
        return backbone(out_indices=out_indices, **{k: v for k, v in kwargs.items() if k not in own})
    if out_indices is not None:
        raise ValueError('out_indices applies to features_only=True')
    return classifier(**kwargs)


def shared_cfg(**fields) -> dict:
    """A pretrained cfg with what every released model here shares (1000 ImageNet classes, bicubic,
    ImageNet mean and std, any input size, the classifier `head`); `fields` add to or override it."""
    return dict(num_classes=1000, interpolation='bicubic', fixed_input_size=False, mean=IMAGENET_MEAN,
                std=IMAGENET_STD, classifier='head') | fields


def head_classes(state_dict: dict) -> int:
    """For the weight guessers: the classes of a state dict's `head`, 0 without one."""
    head = state_dict.get('head.weight')
    return head.shape[0] if head is not None else 0
