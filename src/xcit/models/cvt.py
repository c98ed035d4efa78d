"""CvT: Convolutional vision Transformers (Wu et al., https://arxiv.org/abs/2103.15808).

Three stages, each a strided convolutional token embedding followed by
transformer blocks whose queries, keys and values come from depthwise
convolutions over the token map (keys and values at stride 2, so attention is
rectangular). There is no positional embedding: the convolutions carry the
position, and any input size runs. A class token joins in the last stage only.

State-dict keys are those of microsoft/CvT (`stage{i}.patch_embed`,
`blocks.{j}.attn.conv_proj_{q,k,v}.{conv,bn}`, `proj_{q,k,v}`, `norm`, `head`),
so the released `.pth` files load unchanged; `checkpoint_filter_fn` maps
Hugging Face transformers' layout (`cvt.encoder.stages...`) onto them.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from functools import partial
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._base import (ClassifierMixin, FeatureBackbone, GradCheckpointing, Trunk, create_family, head_classes,
                    init_weights, map_to_tokens, shared_cfg, staged_group_matcher)
from .layers import DropPath, Linear, Mlp
from ..registry import CheckpointAdapter, WeightsGuess, register_checkpoint_adapter, register_model

__all__ = ['CvT', 'CvTFeatures', 'QuickGELU', 'checkpoint_filter_fn', 'cvt_from_spec']

PROJECTION_METHODS = ('dw_bn', 'avg', 'linear')


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation the released CvT weights were trained with (not exact GELU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ConvEmbed(nn.Module):
    """Strided conv (with bias) -> tokens -> LayerNorm: the token embedding that opens every stage.

    The stem is 7x7 / stride 4 with padding 2, not 3: both give the same grid
    size, but padding 3 shifts the sampling grid that the released weights saw.
    """

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, stride: int, padding: int, norm_layer):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride, padding=padding)
        self.norm = norm_layer(embed_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(x)  # (B, C, H, W)
        H, W = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), (H, W)  # (B, N, C)


def _conv_projection(dim: int, kernel_size: int, padding: int, stride: int, method: str) -> nn.Module:
    """The spatial part of a q/k/v projection, on (B, C, H, W) maps; the pointwise part is `proj_{q,k,v}`."""
    if method == 'dw_bn':
        conv = nn.Conv2d(dim, dim, kernel_size, stride=stride, padding=padding, bias=False, groups=dim)
        # its (dim, 1, k, k) weight in the channels-last strides of its gradient (the same bytes), as DDP expects
        conv.to(memory_format=torch.channels_last)
        return nn.Sequential(OrderedDict([('conv', conv), ('bn', nn.BatchNorm2d(dim))]))
    if method == 'avg':
        # floor mode: the same grid as the conv projection (the reference's ceil_mode=True adds a row and a column)
        return nn.AvgPool2d(kernel_size, stride=stride, padding=padding)
    if method == 'linear':
        return nn.Identity()
    raise ValueError(f'projection method must be one of {PROJECTION_METHODS}, not {method!r}')


class ConvAttention(nn.Module):
    """Multi-head attention with convolutional q/k/v projections (depthwise conv + BN, then a Linear).

    The class token, when the stage has one, bypasses the convolutions and is
    prepended to q, k and v. The softmax scale is dim ** -0.5 over the whole
    embedding width, not the head width: the released weights were trained that way.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            qkv_bias: bool = True,
            attn_drop: float = 0.0,
            proj_drop: float = 0.0,
            method: str = 'dw_bn',
            kernel_size: int = 3,
            stride_q: int = 1,
            padding_q: int = 1,
            stride_kv: int = 2,
            padding_kv: int = 1,
            with_cls_token: bool = False,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'embed_dim {dim} is not divisible by num_heads {num_heads}')
        if stride_q != 1:
            raise ValueError('stride_q must be 1: the attention output is added back onto every input token')
        self.num_heads = num_heads
        self.scale = dim ** -0.5
        self.with_cls_token = with_cls_token
        # 'avg' pools keys and values only; queries keep every token
        q_method = 'linear' if method == 'avg' else method
        self.conv_proj_q = _conv_projection(dim, kernel_size, padding_q, stride_q, q_method)
        self.conv_proj_k = _conv_projection(dim, kernel_size, padding_kv, stride_kv, method)
        self.conv_proj_v = _conv_projection(dim, kernel_size, padding_kv, stride_kv, method)
        self.proj_q = Linear(dim, dim, bias=qkv_bias)
        self.proj_k = Linear(dim, dim, bias=qkv_bias)
        self.proj_v = Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        return x.reshape(B, N, self.num_heads, C // self.num_heads).transpose(1, 2)  # (B, h, N, d)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, _, C = x.shape
        if self.with_cls_token:
            cls_token, x = x.split([1, H * W], dim=1)
        x = x.transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)
        q = self.conv_proj_q(x).flatten(2).transpose(1, 2)  # (B, Nq, C)
        k = self.conv_proj_k(x).flatten(2).transpose(1, 2)  # (B, Nkv, C)
        v = self.conv_proj_v(x).flatten(2).transpose(1, 2)
        if self.with_cls_token:
            q, k, v = (torch.cat((cls_token, t), dim=1) for t in (q, k, v))
        q, k, v = self._heads(self.proj_q(q)), self._heads(self.proj_k(k)), self._heads(self.proj_v(v))
        x = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_drop if self.training else 0.0, scale=self.scale)  # (B, h, Nq, d)
        x = x.transpose(1, 2).reshape(B, -1, C)  # (B, Nq, C)
        return self.proj_drop(self.proj(x))


class CvTBlock(nn.Module):
    """Pre-norm transformer block; one drop-path module serves both residual branches."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, proj_drop: float = 0.0,
                 drop_path: float = 0.0, act_layer=QuickGELU, norm_layer=partial(nn.LayerNorm, eps=1e-5),
                 **attn_kwargs):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = ConvAttention(dim, num_heads, proj_drop=proj_drop, **attn_kwargs)
        self.drop_path = DropPath(drop_path)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), H, W))  # (B, [1+]N, C)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class CvTStage(GradCheckpointing, nn.Module):
    """Token embedding, optional class token and blocks; returns the (B, C, H, W) map and the class token."""

    def __init__(self, in_chans: int, dim: int, num_heads: int, patch_size: int, patch_stride: int,
                 patch_padding: int, with_cls_token: bool, drop_path_rates: Sequence[float],
                 proj_drop: float = 0.0, norm_layer=partial(nn.LayerNorm, eps=1e-5), **block_kwargs):
        super().__init__()
        self.patch_embed = ConvEmbed(in_chans, dim, patch_size, patch_stride, patch_padding, norm_layer)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if with_cls_token else None
        self.pos_drop = nn.Dropout(proj_drop)
        self.blocks = nn.ModuleList([
            CvTBlock(dim, num_heads, proj_drop=proj_drop, drop_path=rate, norm_layer=norm_layer,
                     with_cls_token=with_cls_token, **block_kwargs)
            for rate in drop_path_rates])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x, (H, W) = self.patch_embed(x)  # (B, N, C)
        B, _, C = x.shape
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)  # (B, 1+N, C)
        x = self.pos_drop(x)
        for block in self.blocks:
            x = self.run_block(block, x, H, W)
        cls_token = None
        if self.cls_token is not None:
            cls_token, x = x.split([1, H * W], dim=1)
        return x.transpose(1, 2).reshape(B, C, H, W), cls_token


def _per_stage(value: Any, num_stages: int, name: str) -> list:
    """One value per stage: a scalar is repeated, a sequence must have one entry per stage."""
    if isinstance(value, (str, int, float, bool)):
        return [value] * num_stages
    values = list(value)
    if len(values) != num_stages:
        raise ValueError(f'{name} needs one value per stage ({num_stages}), got {values}')
    return values


def _drop_path_ramps(drop_path_rate: float | Sequence[float], depths: Sequence[int]) -> list[list[float]]:
    """Per-stage ramps 0 -> rate over each stage's blocks.

    A single float is the last stage's rate, the others 0: every released recipe
    drops only in the last stage (0.1 for CvT-13/21, 0.3 for W24).
    """
    if isinstance(drop_path_rate, (int, float)):
        rates = [0.0] * (len(depths) - 1) + [float(drop_path_rate)]
    else:
        rates = [float(r) for r in _per_stage(drop_path_rate, len(depths), 'drop_path_rate')]
    # plain Python, not torch.linspace: models are also built on the meta device
    return [[rate * j / (depth - 1) if depth > 1 else 0.0 for j in range(depth)] for rate, depth in zip(rates, depths)]


# the official trunc_norm initialisation; convs keep PyTorch's default
_init_weights = partial(init_weights, norms=(nn.LayerNorm, nn.BatchNorm2d))


class _CvTTrunk(Trunk, nn.Module):
    """The stages, as modules `stage0`, `stage1`, ...: what the classifier and the feature backbone share."""

    def __init__(
            self,
            in_chans: int = 3,
            embed_dims: Sequence[int] = (64, 192, 384),
            depths: Sequence[int] = (1, 2, 10),
            num_heads: Sequence[int] = (1, 3, 6),
            patch_sizes: Sequence[int] = (7, 3, 3),
            patch_strides: Sequence[int] = (4, 2, 2),
            patch_paddings: Sequence[int] = (2, 1, 1),
            cls_token: bool | Sequence[bool] = (False, False, True),
            mlp_ratios: float | Sequence[float] = 4.0,
            qkv_bias: bool | Sequence[bool] = True,
            qkv_proj_method: str | Sequence[str] = 'dw_bn',
            kernel_qkv: int | Sequence[int] = 3,
            stride_q: int | Sequence[int] = 1,
            padding_q: int | Sequence[int] = 1,
            stride_kv: int | Sequence[int] = 2,
            padding_kv: int | Sequence[int] = 1,
            proj_drop_rate: float | Sequence[float] = 0.0,
            attn_drop_rate: float | Sequence[float] = 0.0,
            drop_path_rate: float | Sequence[float] = 0.0,
            act_layer=None,
            norm_layer=None,
            img_size: int | tuple[int, int] = 224,
    ):
        super().__init__()
        n = self.num_stages = self.num_layers = len(embed_dims)
        act_layer = act_layer or QuickGELU
        # the reference's LayerNorm upcasts to float32 for AMP; under autocast nn.LayerNorm already does
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-5)
        per_stage = dict(
            depth=_per_stage(depths, n, 'depths'), num_heads=_per_stage(num_heads, n, 'num_heads'),
            patch_size=_per_stage(patch_sizes, n, 'patch_sizes'),
            patch_stride=_per_stage(patch_strides, n, 'patch_strides'),
            patch_padding=_per_stage(patch_paddings, n, 'patch_paddings'),
            with_cls_token=_per_stage(cls_token, n, 'cls_token'), mlp_ratio=_per_stage(mlp_ratios, n, 'mlp_ratios'),
            qkv_bias=_per_stage(qkv_bias, n, 'qkv_bias'), method=_per_stage(qkv_proj_method, n, 'qkv_proj_method'),
            kernel_size=_per_stage(kernel_qkv, n, 'kernel_qkv'), stride_q=_per_stage(stride_q, n, 'stride_q'),
            padding_q=_per_stage(padding_q, n, 'padding_q'), stride_kv=_per_stage(stride_kv, n, 'stride_kv'),
            padding_kv=_per_stage(padding_kv, n, 'padding_kv'),
            proj_drop=_per_stage(proj_drop_rate, n, 'proj_drop_rate'),
            attn_drop=_per_stage(attn_drop_rate, n, 'attn_drop_rate'),
        )
        ramps = _drop_path_ramps(drop_path_rate, per_stage['depth'])
        self.embed_dims = list(embed_dims)
        self.in_chans = in_chans
        self.img_size = img_size
        self.num_features = self.head_hidden_size = self.embed_dims[-1]
        self.num_prefix_tokens = int(per_stage['with_cls_token'][-1])
        self.feature_info = []
        reduction, chans = 1, in_chans
        for i in range(n):
            stage_kwargs = {k: v[i] for k, v in per_stage.items() if k != 'depth'}
            stage = CvTStage(chans, self.embed_dims[i], drop_path_rates=ramps[i], act_layer=act_layer,
                             norm_layer=norm_layer, **stage_kwargs)
            self.add_module(f'stage{i}', stage)  # the official names; a ModuleList would rename every key
            chans = self.embed_dims[i]
            reduction *= per_stage['patch_stride'][i]
            self.feature_info.append(dict(num_chs=chans, reduction=reduction, module=f'stage{i}'))
        for stage in self.stages:
            stage.apply(_init_weights)
            if stage.cls_token is not None:
                nn.init.trunc_normal_(stage.cls_token, std=0.02)

    @property
    def stages(self) -> list[CvTStage]:
        return [getattr(self, f'stage{i}') for i in range(self.num_stages)]

    def _stem(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return x, None  # each stage embeds its own input

    def _layer(self, i: int, state: tuple[torch.Tensor, torch.Tensor | None]
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.stages[i](state[0])  # (B, C, H, W), (B, 1, C) or None

    def _tap(self, i: int, state: tuple[torch.Tensor, torch.Tensor | None]
             ) -> tuple[torch.Tensor, tuple[int, int]]:
        return map_to_tokens(state[0]), state[0].shape[-2:]  # the patch tokens only

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        # the official optimizer also exempts every 1-D parameter (norms, biases)
        return {f'stage{i}.cls_token' for i, s in enumerate(self.stages) if s.cls_token is not None}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups for layer-wise learning-rate decay (timm's convention)."""
        return staged_group_matcher(coarse, stem=r'^stage0\.patch_embed', stage=r'^stage(\d+)',
                                    block=r'^stage(\d+)\.blocks\.(\d+)',
                                    stage_entry=r'^stage(\d+)\.(?:patch_embed|cls_token)')


class CvT(ClassifierMixin, _CvTTrunk):
    """CvT image classifier.

    The head reads the final LayerNorm of the last stage's class token
    (`global_pool='token'`), or the mean of its normalised patch tokens when the
    last stage has no class token (`'avg'`). Any input size runs, batch 1 included.
    """

    def __init__(self, num_classes: int = 1000, global_pool: str | None = None, drop_rate: float = 0.0,
                 **trunk_kwargs):
        """`trunk_kwargs`: in_chans, embed_dims, depths, num_heads, patch_sizes, patch_strides,
        patch_paddings, cls_token, mlp_ratios, qkv_bias, qkv_proj_method ('dw_bn', 'avg', 'linear'),
        kernel_qkv, stride_q, padding_q, stride_kv, padding_kv, proj_drop_rate, attn_drop_rate,
        drop_path_rate, act_layer, norm_layer, img_size. Per-stage settings take a scalar or one value per stage.
        """
        super().__init__(**trunk_kwargs)
        self.global_pool = self._check_pool(global_pool)
        self.num_classes = num_classes
        norm_layer = trunk_kwargs.get('norm_layer') or partial(nn.LayerNorm, eps=1e-5)
        self.norm = norm_layer(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = self._new_head(num_classes)
        _init_weights(self.norm)

    def _check_pool(self, global_pool: str | None) -> str:
        if global_pool is None:
            return 'token' if self.num_prefix_tokens else 'avg'
        if global_pool == 'token' and not self.num_prefix_tokens:
            raise ValueError("global_pool='token' needs a class token in the last stage")
        return super()._check_pool(global_pool)

    def _init_head(self, head: nn.Linear) -> None:
        nn.init.trunc_normal_(head.weight, std=0.02)  # the bias keeps PyTorch's default, as in the reference

    def _final(self, state: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
        """Final normalised tokens (B, 1+N, C), class token first (no class token: (B, N, C))."""
        x, cls_token = state
        x = map_to_tokens(x)  # (B, N, C)
        if cls_token is not None:
            x = torch.cat((cls_token, x), dim=1)  # (B, 1+N, C)
        return self.norm(x)

    def _norm_tap(self, i: int, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return self.norm(tokens) if i == self.num_stages - 1 else tokens  # the only stage of the norm's width


class CvTFeatures(FeatureBackbone, _CvTTrunk):
    """Backbone for dense prediction: the (B, C, H, W) output of each chosen stage (strides 4, 8, 16).

    No final norm or head; the last stage's class token still takes part in its attention.
    """


# --- checkpoints ----------------------------------------------------------------------------------

# Hugging Face transformers -> official names, applied in order to what follows `stage{i}.`
_QKV = {'query': 'q', 'key': 'k', 'value': 'v'}
_HF_RENAMES = [
    (r'^embedding\.convolution_embeddings\.projection\.', 'patch_embed.proj.'),
    (r'^embedding\.convolution_embeddings\.normalization\.', 'patch_embed.norm.'),
    (r'^layers\.(\d+)\.', r'blocks.\1.'),
    (r'\.attention\.attention\.convolution_projection_(query|key|value)\.convolution_projection\.convolution\.',
     lambda m: f'.attn.conv_proj_{_QKV[m.group(1)]}.conv.'),
    (r'\.attention\.attention\.convolution_projection_(query|key|value)\.convolution_projection\.normalization\.',
     lambda m: f'.attn.conv_proj_{_QKV[m.group(1)]}.bn.'),
    (r'\.attention\.attention\.projection_(query|key|value)\.', lambda m: f'.attn.proj_{_QKV[m.group(1)]}.'),
    (r'\.attention\.output\.dense\.', '.attn.proj.'),  # before the MLP's `output.dense`
    (r'\.intermediate\.dense\.', '.mlp.fc1.'),
    (r'\.output\.dense\.', '.mlp.fc2.'),
    (r'\.layernorm_before\.', '.norm1.'),
    (r'\.layernorm_after\.', '.norm2.'),
]
_HF_STAGE = re.compile(r'^(?:cvt\.)?encoder\.stages\.(\d+)\.(.*)$')


def _is_hf_layout(state_dict: dict) -> bool:
    return any(_HF_STAGE.match(k) for k in state_dict)


def _from_hf(state_dict: dict) -> dict:
    """`CvtForImageClassification` / `CvtModel` names -> official ones; shapes are identical."""
    out = {}
    for key, value in state_dict.items():
        stage = _HF_STAGE.match(key)
        if stage:
            index, rest = stage.groups()
            for pattern, replacement in _HF_RENAMES:
                rest = re.sub(pattern, replacement, rest)
            key = f'stage{index}.{rest}'
        elif key.startswith('layernorm.'):
            key = 'norm.' + key[len('layernorm.'):]
        elif key.startswith('classifier.'):
            key = 'head.' + key[len('classifier.'):]
        out[key] = value
    return out


# PASSL's port builds each convolutional projection as a plain Sequential(conv, BatchNorm): its
# entries are `.0.` and `.1.` where the official (and our) names are `.conv.` and `.bn.`
_PASSL_PROJ = re.compile(r'\.attn\.conv_proj_([qkv])\.([01])\.')
_OFFICIAL_PROJ = re.compile(r'\.attn\.conv_proj_([qkv])\.(conv|bn)\.')


def _from_passl(state_dict: dict) -> dict:
    return {_PASSL_PROJ.sub(lambda m: f'.attn.conv_proj_{m.group(1)}.{("conv", "bn")[int(m.group(2))]}.', k): v
            for k, v in state_dict.items()}


def passl_state_dict(state_dict: dict) -> dict:
    """Ours (the official names) under the names of PASSL's CvT port."""
    return {_OFFICIAL_PROJ.sub(lambda m: f'.attn.conv_proj_{m.group(1)}.{int(m.group(2) == "bn")}.', k): v
            for k, v in state_dict.items()}


def checkpoint_filter_fn(state_dict: dict, model: nn.Module) -> dict:
    """Map a CvT state dict in Hugging Face transformers' or PASSL's layout to ours (the official one).

    Official files pass through unchanged. For the feature backbone, the
    classifier's final norm and head are dropped.
    """
    if _is_hf_layout(state_dict):
        state_dict = _from_hf(state_dict)
    state_dict = _from_passl(state_dict)
    if isinstance(model, CvTFeatures):
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(('norm.', 'head.'))}
    return state_dict


def guess_weights(state_dict: dict) -> WeightsGuess | None:
    """Which CvT a state dict (ours, HF's or PASSL's layout) belongs to, from its shapes; None if it is no CvT.

    Head counts leave no trace in the weights, so sizes are matched on widths and depths.
    """
    if _is_hf_layout(state_dict):
        state_dict = _from_hf(state_dict)
    state_dict = _from_passl(state_dict)
    if 'stage0.patch_embed.proj.weight' not in state_dict:
        return None
    dims, depths = [], []
    while f'stage{len(dims)}.patch_embed.proj.weight' in state_dict:
        i = len(dims)
        dims.append(state_dict[f'stage{i}.patch_embed.proj.weight'].shape[0])
        blocks = {int(m.group(1)) for k in state_dict if (m := re.match(rf'stage{i}\.blocks\.(\d+)\.', k))}
        depths.append(max(blocks) + 1 if blocks else 0)
    cls_stages = [i for i in range(len(dims)) if f'stage{i}.cls_token' in state_dict]
    conv_proj = 'stage0.blocks.0.attn.conv_proj_q.conv.weight' in state_dict
    num_classes = head_classes(state_dict)
    description = (f"embed_dims {'/'.join(map(str, dims))}, depths {'/'.join(map(str, depths))}, "
                   f"class token in stage {'/'.join(map(str, cls_stages)) or 'none'}, {num_classes} classes")
    size = next((s for s, cfg in _CVT_SIZES.items()
                 if (list(cfg['embed_dims']), list(cfg['depths'])) == (dims, depths)), None)
    architecture = None
    if size and conv_proj and cls_stages == [len(dims) - 1]:
        architecture = next(name for name in _CVT_VARIANTS if name.startswith(f'cvt_{size}_'))
    return WeightsGuess(architecture, num_classes, description)


register_checkpoint_adapter((CvT, CvTFeatures), CheckpointAdapter(checkpoint_filter_fn, guess_weights,
                                                                 passl_fn=passl_state_dict))


# --- construction from the official config --------------------------------------------------------

# MODEL.SPEC key in microsoft/CvT's yaml files -> our keyword
_SPEC_KEYS = {
    'PATCH_SIZE': 'patch_sizes', 'PATCH_STRIDE': 'patch_strides', 'PATCH_PADDING': 'patch_paddings',
    'DIM_EMBED': 'embed_dims', 'NUM_HEADS': 'num_heads', 'DEPTH': 'depths', 'MLP_RATIO': 'mlp_ratios',
    'ATTN_DROP_RATE': 'attn_drop_rate', 'DROP_RATE': 'proj_drop_rate', 'DROP_PATH_RATE': 'drop_path_rate',
    'QKV_BIAS': 'qkv_bias', 'CLS_TOKEN': 'cls_token', 'QKV_PROJ_METHOD': 'qkv_proj_method',
    'KERNEL_QKV': 'kernel_qkv', 'PADDING_KV': 'padding_kv', 'STRIDE_KV': 'stride_kv', 'PADDING_Q': 'padding_q',
    'STRIDE_Q': 'stride_q',
}


def cvt_from_spec(spec: dict, num_classes: int = 1000, **kwargs) -> CvT:
    """Build a CvT from an official `MODEL.SPEC` dict (`NUM_STAGES`, `DIM_EMBED`, `DEPTH`, ...).

    Built as the official factory builds it: QuickGELU, LayerNorm eps 1e-5.
    Other keyword arguments go to `CvT` and override the spec.
    """
    spec = dict(spec)
    num_stages = spec.pop('NUM_STAGES', None)
    if any(spec.pop('POS_EMBED', ())):
        raise ValueError('positional embeddings (POS_EMBED) are not supported: no released CvT uses them')
    init = spec.pop('INIT', 'trunc_norm')
    if init != 'trunc_norm':
        raise ValueError(f"only INIT 'trunc_norm' (every released model's) is supported, not {init!r}")
    unknown = sorted(set(spec) - set(_SPEC_KEYS))
    if unknown:
        raise ValueError(f'unknown CvT spec keys: {unknown}')
    args = {_SPEC_KEYS[k]: v for k, v in spec.items()}
    if num_stages is not None and len(args.get('embed_dims', ())) != num_stages:
        raise ValueError(f"NUM_STAGES is {num_stages} but DIM_EMBED has {len(args.get('embed_dims', ()))} entries")
    args.update(kwargs)
    return CvT(num_classes=num_classes, **args)


# --- variants -------------------------------------------------------------------------------------

# size: architecture; every variant has head width 64, MLP ratio 4 and a class token in the last stage
_CVT_SIZES = {
    '13': dict(embed_dims=(64, 192, 384), depths=(1, 2, 10), num_heads=(1, 3, 6)),
    '21': dict(embed_dims=(64, 192, 384), depths=(1, 4, 16), num_heads=(1, 3, 6)),
    'w24': dict(embed_dims=(192, 768, 1024), depths=(2, 2, 20), num_heads=(3, 12, 16)),
}
_HF_URL = 'https://huggingface.co/{}/resolve/main/pytorch_model.bin'
# architecture -> {tag: (Hugging Face hub repo, official release file name, ImageNet-1k top-1 in the CvT README)};
# the first tag is the default
_CVT_VARIANTS = {
    'cvt_13_224': {'ms_in1k': ('microsoft/cvt-13', 'CvT-13-224x224-IN-1k.pth', 81.6)},
    'cvt_13_384': {'ms_in22k_ft_in1k': ('microsoft/cvt-13-384-22k', 'CvT-13-384x384-IN-22k.pth', 83.3),
                   'ms_in1k': ('microsoft/cvt-13-384', 'CvT-13-384x384-IN-1k.pth', 83.0)},
    'cvt_21_224': {'ms_in1k': ('microsoft/cvt-21', 'CvT-21-224x224-IN-1k.pth', 82.5)},
    'cvt_21_384': {'ms_in22k_ft_in1k': ('microsoft/cvt-21-384-22k', 'CvT-21-384x384-IN-22k.pth', 84.9),
                   'ms_in1k': ('microsoft/cvt-21-384', 'CvT-21-384x384-IN-1k.pth', 83.3)},
    'cvt_w24_384': {'ms_in22k_ft_in1k': ('microsoft/cvt-w24-384-22k', 'CvT-w24-384x384-IN-22k.pth', 87.6)},
}


def _cfg(resolution: int, hub_id: str, file_name: str, top1: float) -> dict:
    # official evaluation: 224 models resize to 256 and center-crop; 384 models are resized (warped) to 384x384
    crop = dict(crop_pct=0.875, crop_mode='center') if resolution == 224 else dict(crop_pct=1.0, crop_mode='squash')
    return shared_cfg(
        url=_HF_URL.format(hub_id), hf_hub_id=hub_id, file_name=file_name, input_size=(3, resolution, resolution),
        first_conv='stage0.patch_embed.proj', license='mit', paper_ids='arXiv:2103.15808',
        origin_url='https://github.com/microsoft/CvT', checkpoint_format='hf_transformers', top1=top1,
        top1_source='microsoft/CvT README', **crop)


for _name, _tags in _CVT_VARIANTS.items():
    _size, _res = _name.split('_')[1:]
    register_model(
        _name,
        partial(create_family, CvT, CvTFeatures, img_size=int(_res), **_CVT_SIZES[_size]),
        family='cvt',
        cfgs={tag: _cfg(int(_res), *release) for tag, release in _tags.items()},
    )
