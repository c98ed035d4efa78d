"""FCViT: fully convolutional vision transformer (Ma et al., "A Close Look at Spatial Modeling:
From Attention to Convolution", https://arxiv.org/abs/2212.12552).

A MetaFormer with four stages in which attention is replaced by what its maps
were found to compute: one global context per image, weighted at each position
by its similarity to that position, plus large (11x11) depthwise convolutions
for local mixing. Everything is convolutional, so any input size runs.

State-dict keys are those of ma-xu/FCViT (`patch_embed`, `network.{i}.{j}`,
`token_mixer.gc1`, `layer_scale_1`, `norm`, `head`), so its released timm
training checkpoints load unchanged. The released models all share one
setting (competing global context, 11x11 kernels, no spatial or channel
attention); it is the only one built here.
"""
from __future__ import annotations

import re
from functools import partial
from typing import Sequence

import torch
import torch.nn as nn

from ._base import (ClassifierMixin, FeatureBackbone, Trunk, create_family, head_classes, init_weights, map_to_tokens,
                    shared_cfg, staged_group_matcher, tokens_to_map)
from .layers import DropPath
from ..registry import CheckpointAdapter, WeightsGuess, register_checkpoint_adapter, register_model

__all__ = ['FCViT', 'FCViTFeatures', 'checkpoint_filter_fn']


def group_norm(num_channels: int) -> nn.GroupNorm:
    """GroupNorm with one group: statistics over C, H and W jointly, per-channel affine (PoolFormer's "LayerNorm")."""
    return nn.GroupNorm(1, num_channels)


class PatchEmbed(nn.Module):
    """Strided conv (padding k // 2) + BatchNorm: the stem (7x7 / 4) and the downsampling between stages (3x3 / 2)."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, stride: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride, padding=patch_size // 2)
        self.norm = nn.BatchNorm2d(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


class GlobalContext(nn.Module):
    """A global context vector, spread over the map by each position's similarity to the image mean.

    Per head, the similarity of a position to the global average (scaled by
    1/sqrt(head width), no softmax) is standardised jointly over heads and
    positions, then given a learned per-head affine. The context vector comes
    from the average through a "compete" bottleneck: two linear halves, element-wise max.
    """

    def __init__(self, dim: int, num_heads: int = 8, reduction: int = 8, eps: float = 1e-5):
        super().__init__()
        if dim % num_heads or dim % reduction:
            raise ValueError(f'dim {dim} must be divisible by num_heads {num_heads} and reduction {reduction}')
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.eps = eps
        self.fc1 = nn.Linear(dim, 2 * dim // reduction)
        self.fc2 = nn.Linear(dim // reduction, dim)
        self.rescale_weight = nn.Parameter(torch.ones(num_heads))
        self.rescale_bias = nn.Parameter(torch.zeros(num_heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.num_heads
        x = x.flatten(2)  # (B, C, N)
        gap = x.mean(dim=-1)  # (B, C)
        sim = gap.reshape(B, h, 1, C // h) @ x.reshape(B, h, C // h, H * W)  # (B, h, 1, N)
        sim = sim.squeeze(2) * self.scale  # (B, h, N)
        std, mean = torch.std_mean(sim, dim=(1, 2), keepdim=True)  # unbiased std, as the weights were trained
        sim = (sim - mean) / (std + self.eps)
        sim = sim * self.rescale_weight[:, None] + self.rescale_bias[:, None]
        # the first and second halves of fc1's output compete element-wise
        context = self.fc2(self.fc1(gap).reshape(B, 2, -1).max(dim=1).values)  # (B, C)
        out = context.reshape(B, h, C // h, 1) * sim.reshape(B, h, 1, H * W)  # (B, h, C/h, N)
        return out.reshape(B, C, H, W)


def _pointwise_bottleneck(dim: int, hidden: int, act: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(dim, hidden, 1), act, nn.Conv2d(hidden, dim, 1))


class TokenMixer(nn.Module):
    """Twice: add the global context, then depthwise conv -> pointwise bottleneck -> GELU."""

    def __init__(self, dim: int, kernel_size: int = 11, fc_reduction: int = 8, fc_min_width: int = 16,
                 gc_heads: int = 8, gc_reduction: int = 8, act_layer=nn.GELU):
        super().__init__()
        hidden = max(dim // fc_reduction, fc_min_width)
        self.act = act_layer()  # also the activation inside fc1/fc2 (parameterless, so sharing is harmless)
        self.gc1 = GlobalContext(dim, gc_heads, gc_reduction)
        self.dw1 = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.fc1 = _pointwise_bottleneck(dim, hidden, self.act)
        self.gc2 = GlobalContext(dim, gc_heads, gc_reduction)
        self.dw2 = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.fc2 = _pointwise_bottleneck(dim, hidden, self.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.gc1(x)  # (B, C, H, W)
        x = self.act(self.fc1(self.dw1(x)))
        x = x + self.gc2(x)
        return self.act(self.fc2(self.dw2(x)))


class ChannelMixer(nn.Module):
    """1x1 expand -> 3x3 depthwise -> GELU -> 1x1 project; no activation before the depthwise conv."""

    def __init__(self, dim: int, hidden: int, act_layer=nn.GELU, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.act = act_layer()
        self.drop = nn.Dropout(drop)
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.act(self.dwconv(self.fc1(x))))  # (B, hidden, H, W)
        return self.drop(self.fc2(x))


class FCViTBlock(nn.Module):
    """MetaFormer block on (B, C, H, W) maps: token and channel mixers, each with layer scale and drop path."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, drop: float = 0.0, drop_path: float = 0.0,
                 layer_scale_init: float = 1e-5, act_layer=nn.GELU, norm_layer=group_norm, **mixer_kwargs):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.token_mixer = TokenMixer(dim, act_layer=act_layer, **mixer_kwargs)
        self.norm2 = norm_layer(dim)
        self.channel_mixer = ChannelMixer(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)
        self.drop_path = DropPath(drop_path)
        self.layer_scale_1 = nn.Parameter(layer_scale_init * torch.ones(dim))
        self.layer_scale_2 = nn.Parameter(layer_scale_init * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.layer_scale_1[:, None, None] * self.token_mixer(self.norm1(x)))  # (B, C, H, W)
        x = x + self.drop_path(self.layer_scale_2[:, None, None] * self.channel_mixer(self.norm2(x)))
        return x


def _init_weights(module: nn.Module) -> None:
    # the official initialisation: He-normal convs over fan-out, trunc-normal Linears, zero biases
    if isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, std=(2.0 / fan_out) ** 0.5)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    else:
        init_weights(module)  # trunc-normal Linears


class _FCViTTrunk(Trunk, nn.Module):
    """Stem and `network` = [stage 0, downsample, stage 1, ..., stage 3]: what the classifier and the backbone share."""

    def __init__(
            self,
            in_chans: int = 3,
            embed_dims: Sequence[int] = (64, 128, 320, 512),
            depths: Sequence[int] = (2, 2, 6, 2),
            mlp_ratios: Sequence[float] = (8, 8, 4, 4),
            kernel_size: int = 11,
            gc_heads: int = 8,
            proj_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            layer_scale_init: float = 1e-5,
            act_layer=None,
            norm_layer=None,
            img_size: int | tuple[int, int] = 224,
    ):
        super().__init__()
        if not len(embed_dims) == len(depths) == len(mlp_ratios):
            raise ValueError('embed_dims, depths and mlp_ratios need one entry per stage')
        act_layer = act_layer or nn.GELU
        norm_layer = norm_layer or group_norm
        self.embed_dims = list(embed_dims)
        self.num_stages = self.num_layers = len(embed_dims)
        self.in_chans = in_chans
        self.img_size = img_size
        self.num_features = self.head_hidden_size = self.embed_dims[-1]
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0], patch_size=7, stride=4)
        # one linear drop-path ramp over all blocks of all stages
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        network: list[nn.Module] = []
        self.feature_info = []
        for i, (dim, depth, ratio) in enumerate(zip(embed_dims, depths, mlp_ratios)):
            if i:
                network.append(PatchEmbed(embed_dims[i - 1], dim, patch_size=3, stride=2))
            first = sum(depths[:i])
            network.append(nn.Sequential(*[
                FCViTBlock(dim, mlp_ratio=ratio, drop=proj_drop_rate, drop_path=rates[first + j],
                           layer_scale_init=layer_scale_init, act_layer=act_layer, norm_layer=norm_layer,
                           kernel_size=kernel_size, gc_heads=gc_heads)
                for j in range(depth)]))
            self.feature_info.append(dict(num_chs=dim, reduction=4 * 2 ** i, module=f'network.{2 * i}'))
        self.network = nn.ModuleList(network)
        self.apply(_init_weights)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch_embed(x)  # (B, C0, H/4, W/4)

    def _layer(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Stage i on the previous stage's output (the stem's output for stage 0): downsample, then blocks."""
        if i:
            x = self.network[2 * i - 1](x)  # (B, C_i, H_i, W_i)
        for block in self.network[2 * i]:
            x = self.run_block(block, x)
        return x

    def _tap(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        return map_to_tokens(x), x.shape[-2:]

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        # the official (timm) recipe exempts only 1-D parameters, which covers layer scales and norms
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups for layer-wise learning-rate decay (timm's convention)."""
        return staged_group_matcher(coarse, stem=r'^patch_embed', stage=r'^network\.(\d+)',
                                    block=r'^network\.(\d+)\.(\d+)\.', stage_entry=r'^network\.(\d+)\.(?:proj|norm)\.')


class FCViT(ClassifierMixin, _FCViTTrunk):
    """FCViT image classifier: GroupNorm on the last map, global average, Linear head."""

    pool_types = ('avg', '')

    def __init__(self, num_classes: int = 1000, global_pool: str = 'avg', drop_rate: float = 0.0, **trunk_kwargs):
        """`trunk_kwargs`: in_chans, embed_dims, depths, mlp_ratios, kernel_size, gc_heads,
        proj_drop_rate, drop_path_rate, layer_scale_init, act_layer, norm_layer, img_size.
        """
        super().__init__(**trunk_kwargs)
        self.global_pool = self._check_pool(global_pool)
        self.num_classes = num_classes
        self.norm = (trunk_kwargs.get('norm_layer') or group_norm)(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = self._new_head(num_classes)

    def _final(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's map after the final GroupNorm, (B, C, H, W)."""
        return self.norm(x)

    def _norm_tap(self, i: int, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        if i < self.num_stages - 1:  # only the last stage has the norm's width
            return tokens
        return map_to_tokens(self.norm(tokens_to_map(tokens, grid)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool and classify; with global_pool='' the head runs at every position, (B, H, W, classes)."""
        x = x.mean(dim=(2, 3)) if self.global_pool == 'avg' else x.permute(0, 2, 3, 1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)


class FCViTFeatures(FeatureBackbone, _FCViTTrunk):
    """Backbone for dense prediction: the (B, C, H, W) output of each chosen stage (strides 4, 8, 16, 32).

    No final norm or head. (The official detection/segmentation backbones add a
    GroupNorm per output, `norm0`/`norm2`/...; their checkpoints are not covered.)
    """


# --- checkpoints ----------------------------------------------------------------------------------

def checkpoint_filter_fn(state_dict: dict, model: nn.Module) -> dict:
    """Released files are already in our layout; the feature backbone drops the classifier's norm and head."""
    if isinstance(model, FCViTFeatures):
        return {k: v for k, v in state_dict.items() if not k.startswith(('norm.', 'head.'))}
    return state_dict


def guess_weights(state_dict: dict) -> WeightsGuess | None:
    """Which FCViT a state dict belongs to, from its shapes alone; None if it is no FCViT."""
    if 'network.0.0.token_mixer.gc1.rescale_weight' not in state_dict or 'patch_embed.proj.weight' not in state_dict:
        return None
    blocks: dict[int, set[int]] = {}
    for key in state_dict:
        m = re.match(r'network\.(\d+)\.(\d+)\.norm1\.weight$', key)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    stages = sorted(blocks)
    dims = [state_dict[f'network.{i}.0.norm1.weight'].shape[0] for i in stages]
    depths = [max(blocks[i]) + 1 for i in stages]
    num_classes = head_classes(state_dict)
    description = (f"embed_dims {'/'.join(map(str, dims))}, depths {'/'.join(map(str, depths))}, "
                   f'{num_classes} classes')
    architecture = next((f'fcvit_{size}' for size, cfg in _FCVIT_SIZES.items()
                         if (list(cfg['embed_dims']), list(cfg['depths'])) == (dims, depths)), None)
    return WeightsGuess(architecture, num_classes, description)


register_checkpoint_adapter((FCViT, FCViTFeatures), CheckpointAdapter(checkpoint_filter_fn, guess_weights))


# --- variants -------------------------------------------------------------------------------------

# size: architecture and evaluation crop; MLP ratios 8/8/4/4, 8 global-context heads everywhere
_FCVIT_SIZES = {
    'tiny': dict(embed_dims=(32, 64, 160, 320), depths=(3, 3, 5, 2), crop_pct=0.9,
                 download='https://drive.google.com/drive/folders/1YSa8tkXkUQT94mgo-L7q4pv5KiHRTAaR'),
    'b12': dict(embed_dims=(64, 128, 320, 512), depths=(2, 2, 6, 2), crop_pct=0.9,
                download='https://drive.google.com/drive/folders/1QuyalIGhJeD2pxcVxR0_gJNrk2mZ8WEb'),
    'b24': dict(embed_dims=(64, 128, 320, 512), depths=(4, 4, 12, 4), crop_pct=0.95,
                download='https://drive.google.com/drive/folders/1II2v1rhNe9sgLJtoSR-cgSh2mpPQMt4t'),
    'b48': dict(embed_dims=(64, 128, 320, 512), depths=(8, 8, 24, 8), crop_pct=0.95,
                download='https://drive.google.com/drive/folders/16joP1cQwbx4oICL-WbPC1SqGNoc4-NZm'),
}


def _cfg(crop_pct: float, download: str) -> dict:
    # the weights sit in Google Drive folders, which have no direct file URL
    return shared_cfg(
        url='', download_page=download, input_size=(3, 224, 224), crop_pct=crop_pct, crop_mode='center',
        first_conv='patch_embed.proj', paper_ids='arXiv:2212.12552', origin_url='https://github.com/ma-xu/FCViT')


for _size, _arch in _FCVIT_SIZES.items():
    register_model(
        f'fcvit_{_size}',
        partial(create_family, FCViT, FCViTFeatures, embed_dims=_arch['embed_dims'], depths=_arch['depths']),
        family='fcvit',
        cfgs={'in1k': _cfg(_arch['crop_pct'], _arch['download'])},
    )
