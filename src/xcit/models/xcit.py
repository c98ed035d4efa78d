"""XCiT: Cross-Covariance Image Transformers (El-Nouby et al., https://arxiv.org/abs/2106.09681).

Attention runs across feature channels instead of tokens: each head mixes its
d channels with a d x d softmax of the cross-covariance of L2-normalised keys
and queries. Cost and memory grow linearly with the number of tokens, and
nothing depends on the input size, so any resolution (even one that is not a
multiple of the patch size) runs without interpolation.

State-dict keys are those of facebookresearch/xcit (`pos_embeder`, `local_mp`,
`norm3`/`gamma3`, `cls_attn_blocks.j.attn.qkv`, `head`), so the released
weights and PASSL's ports of them load unchanged; `checkpoint_filter_fn` maps
timm's layout onto them.
"""
from __future__ import annotations

import logging
import math
import re
from functools import partial
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._base import ClassifierMixin, Trunk, create_family, head_classes, init_weights, shared_cfg
from .fastpath import FastPathModule, dtype_tag, mode_tag
from .layers import (DropPath, Linear, Mlp, autocast_active, autograd_records, fold_conv_bn, layer_scale_residual, linear,
                     on_contiguous_view, take_indices)
from .xca_triton import fused_xca_runs, triton_available, xca_fused
from ..registry import CheckpointAdapter, WeightsGuess, register_alias, register_checkpoint_adapter, register_model

__all__ = ['XCiT', 'XCiTDense', 'checkpoint_filter_fn']

_logger = logging.getLogger(__name__)


class PositionalEncodingFourier(nn.Module):
    """Sine/cosine features of each patch's (row, column), projected to the embedding width.

    Coordinates are scaled into (0, 2*pi] by the grid size, so one encoding serves
    every resolution. They are computed in float32 whatever the autocast or
    parameter dtype: low-precision coordinates would alias neighbouring patches.
    """

    def __init__(self, dim: int, hidden_dim: int = 32, temperature: float = 10000.0):
        super().__init__()
        self.token_projection = nn.Conv2d(hidden_dim * 2, dim, kernel_size=1)
        self.hidden_dim = hidden_dim
        self.temperature = temperature

    def _axis_features(self, length: int, device: torch.device) -> torch.Tensor:
        """(length, hidden_dim) interleaved sin/cos of positions 1..length."""
        pos = torch.arange(1, length + 1, dtype=torch.float32, device=device)
        pos = pos / (pos[-1:] + 1e-6) * (2 * math.pi)
        k = torch.arange(self.hidden_dim, dtype=torch.float32, device=device)
        freq = self.temperature ** (2 * torch.div(k, 2, rounding_mode='floor') / self.hidden_dim)
        phase = pos[:, None] / freq  # (length, hidden_dim)
        # channel 2m is sin and 2m+1 cos of the same frequency, as the released weights expect
        return torch.stack((phase[:, 0::2].sin(), phase[:, 1::2].cos()), dim=2).flatten(1)

    def forward(self, H: int, W: int) -> torch.Tensor:
        weight = self.token_projection.weight
        pos_y = self._axis_features(H, weight.device)[:, None, :].expand(H, W, self.hidden_dim)
        pos_x = self._axis_features(W, weight.device)[None, :, :].expand(H, W, self.hidden_dim)
        pos = torch.cat((pos_y, pos_x), dim=2).permute(2, 0, 1)[None]  # (1, 2*hidden, H, W): y-half first
        pos = self.token_projection(pos.to(weight.dtype))  # (1, D, H, W)
        return pos.flatten(2).transpose(1, 2)  # (1, N, D)


def _conv_bn(in_chs: int, out_chs: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_chs, out_chs, kernel_size=3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(out_chs),
    )


class ConvPatchEmbed(FastPathModule, nn.Module):
    """log2(patch) stride-2 3x3 conv+BN units with GELU between them (none after the last).

    Each unit maps a side L to ceil(L/2), which is why inputs that are not a
    multiple of the patch size still give a well-defined grid.

    The first maps are the largest tensors of the whole network (16 x 112 x 112 per
    image for nano at 224). The fast path convolves in channels-last, which oneDNN
    takes without reordering and which leaves the tokens contiguous, and in inference
    (eval mode, nothing for autograd to record) folds each BatchNorm into its conv and
    runs GELU in place, so no BN or GELU output is materialised beside the maps: a
    lower memory peak and two passes fewer. GELU runs on the maps' contiguous NHWC view
    (`on_contiguous_view`). The modules as written are the reference.

    Inference takes the batch in two halves, on either path: per image, the image's
    reordered copy and the first two maps of a p16 model outweigh a block's MLP
    activations about twice, so whole they set the model's peak and in halves they do
    not, for about a millisecond (BENCHMARKS.md).
    """

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768, act_layer=nn.GELU,
                 impl: str | None = None):
        super().__init__()
        if patch_size not in (8, 16):
            raise ValueError(f'XCiT has conv stems for patch sizes 8 and 16, not {patch_size}')
        num_units = int(math.log2(patch_size))
        widths = [embed_dim // 2 ** (num_units - 1 - i) for i in range(num_units)]  # p16: D/8, D/4, D/2, D
        layers: list[nn.Module] = []
        for i, width in enumerate(widths):
            if i:
                layers.append(act_layer())
            layers.append(_conv_bn(in_chans if i == 0 else widths[i - 1], width))
        self.proj = nn.Sequential(*layers)
        self.patch_size = patch_size
        self._init_fast_path(impl)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        if x.shape[0] > 1 and self._inference(x) and not torch.compiler.is_exporting():  # exports keep B free
            # each half is reordered on its own: no whole-batch copy of the image or of a map is ever made
            x = torch.cat([self._maps(half) for half in x.tensor_split(2)])
        else:
            x = self._maps(x)  # (B, D, Hp, Wp)
        Hp, Wp = x.shape[-2:]
        # contiguous tokens: otherwise every residual add keeps the conv's layout and every LayerNorm copies
        return x.flatten(2).transpose(1, 2).contiguous(), (Hp, Wp)  # (B, N, D)

    def _inference(self, x: torch.Tensor) -> bool:
        """Eval mode with nothing for autograd to record: what the memory-saving steps need."""
        return not (self.training or autograd_records(x, *self.parameters()))

    def _maps(self, x: torch.Tensor) -> torch.Tensor:
        """The last map (B, D, Hp, Wp), on the path chosen for x's shape."""
        grad = autograd_records(x, *self.parameters())
        key = f'xcit stem {mode_tag(self.training, grad)} {x.device.type} {dtype_tag(x)} {tuple(x.shape)}'
        # passed straight in, so that no name here keeps the reordered copy of the image alive
        return self.fastest(key, dict(channels_last_folded=self._fast, reference=self.proj), x, grad)(x)

    def _fast(self, x: torch.Tensor) -> torch.Tensor:
        """`self.proj(x)` in channels-last; in inference with BatchNorm folded into each conv and GELU in place."""
        if autocast_active(x) and x.dtype == torch.float32:
            # the first conv would cast the image anyway: cast and reorder in one copy of half the bytes,
            # rather than a float32 reordered copy and then a cast of it
            x = x.to(torch.get_autocast_dtype(x.device.type), memory_format=torch.channels_last)
        else:
            x = x.contiguous(memory_format=torch.channels_last)
        infer = self._inference(x)
        for layer in self.proj:
            if isinstance(layer, nn.Sequential) and infer:  # conv -> BN (or Identity once fold_batchnorm ran)
                conv, bn = layer
                weight, bias = fold_conv_bn(conv, bn) if isinstance(bn, nn.BatchNorm2d) else (conv.weight, conv.bias)
                x = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
            elif isinstance(layer, nn.Sequential):
                x = layer(x)
            elif infer and type(layer) is nn.GELU:
                on_contiguous_view(partial(torch.ops.aten.gelu_, approximate=layer.approximate), x)  # in place
            else:
                x = on_contiguous_view(layer, x)  # the activation
        return x


def l2_normalize_tokens(t: torch.Tensor) -> torch.Tensor:
    """L2-normalise along the last (token) axis in float32.

    Over N tokens the sum of squares overflows float16 at high resolution and
    F.normalize's eps underflows to zero in float16, giving NaN; the unit-norm
    result itself is safe to hand back in the input dtype.
    """
    return F.normalize(t.float(), dim=-1).to(t.dtype)


XCA_KERNELS = ('matmul', 'sdpa', 'triton')


def _head_columns(t: torch.Tensor, num_heads: int) -> list[torch.Tensor]:
    """Each head's (..., d) column block of a token-major (..., C) tensor, as strided views."""
    d = t.shape[-1] // num_heads
    return [t[..., j * d:(j + 1) * d] for j in range(num_heads)]


def _bmm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scratch: torch.Tensor) -> None:
    """`out = a @ b` for a strided `out` (a head's columns), through one batched GEMM.

    CPU bmm runs as one batched GEMM only into a contiguous result; into a strided one
    it falls back to a GEMM call per batch item, whose overhead is most of the cost at
    XCA's small (N x d) shapes. So with more than one item the product goes to a
    contiguous scratch and is copied into place (half the time at nano's shapes).
    """
    if out.shape[0] == 1 or out.device.type != 'cpu':
        torch.bmm(a, b, out=out)
    else:
        out.copy_(torch.bmm(a, b, out=scratch))


# XCA's core from the fused qkv (B, N, 3C) to the mixed values (B, N, C), as a pair of custom ops with the
# backward written out: eager runs call them as they are, and torch.compile keeps them whole (opaque ops)
# rather than tracing the head loops into a graph it schedules worse.
#
# Every matmul reads its head's columns of qkv in place (a (N x d) block with rows 3C apart is a valid BLAS
# operand), so no layout change of q, k or v is ever copied, and the backward pass stores only qkv and the
# small maps, kept head-major (h, B, d, d) so that each head's products are contiguous. The logits are the
# raw q^T k divided by the token-axis norms of q and k (F.normalize's value without writing normalised copies):
#
#     attn = softmax(t * (q^T k) / (|q| |k|^T)),  out_h = v_h @ attn_h^T
#
# Float32 and float64 only: raw q^T k can overflow float16, where the normalising paths run.

def _channel_attention(q: torch.Tensor, k: torch.Tensor, temperature: torch.Tensor, num_heads: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(norm_q, norm_k (h, B, d), cosine, attn (h, B, d, d)) from q and k (B, N, C), column blocks of the
    fused qkv read in place."""
    B, N, C = q.shape
    h = num_heads
    d = C // h
    norm_q = q.square().sum(dim=1).sqrt().clamp_min(1e-12).view(B, h, d).transpose(0, 1)  # (h, B, d)
    norm_k = k.square().sum(dim=1).sqrt().clamp_min(1e-12).view(B, h, d).transpose(0, 1)
    gram = q.new_empty(h, B, d, d)
    for j, (q_j, k_j) in enumerate(zip(_head_columns(q, h), _head_columns(k, h))):
        torch.bmm(q_j.transpose(1, 2), k_j, out=gram[j])  # (B, d, d)
    cosine = gram / (norm_q.unsqueeze(-1) * norm_k.unsqueeze(-2))
    attn = (cosine * temperature.view(h, 1, 1, 1)).softmax(dim=-1)  # (h, B, d, d)
    return norm_q, norm_k, cosine, attn


@torch.library.custom_op('xcit::xca_token_major', mutates_args=())
def _xca_token_major(qkv: torch.Tensor, temperature: torch.Tensor, num_heads: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out (B, N, C); for the backward: norm_q, norm_k (h, B, d), cosine, attn (h, B, d, d))."""
    B, N, C3 = qkv.shape
    C, h = C3 // 3, num_heads
    d = C // h
    v = qkv[..., 2 * C:]  # (B, N, C), rows 3C apart
    norm_q, norm_k, cosine, attn = _channel_attention(*qkv.split(C, dim=-1)[:2], temperature, h)
    out = qkv.new_empty(B, N, C)
    scratch = qkv.new_empty(B, N, d)
    for j, (v_j, out_j) in enumerate(zip(_head_columns(v, h), _head_columns(out, h))):
        _bmm_into(out_j, v_j, attn[j].transpose(1, 2), scratch)  # (B, N, d)
    return out, norm_q.contiguous(), norm_k.contiguous(), cosine, attn


@_xca_token_major.register_fake
def _(qkv, temperature, num_heads):
    B, N, C3 = qkv.shape
    h, d = num_heads, C3 // 3 // num_heads
    return (qkv.new_empty(B, N, C3 // 3), qkv.new_empty(h, B, d), qkv.new_empty(h, B, d), qkv.new_empty(h, B, d, d),
            qkv.new_empty(h, B, d, d))


@torch.library.custom_op('xcit::xca_token_major_backward', mutates_args=())
def _xca_token_major_backward(d_out: torch.Tensor, qkv: torch.Tensor, temperature: torch.Tensor, norm_q: torch.Tensor,
                              norm_k: torch.Tensor, cosine: torch.Tensor, attn: torch.Tensor, num_heads: int
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(d_qkv, d_temperature) from the gradient of `_xca_token_major`'s out and what it kept."""
    h = num_heads
    B, N, C3 = qkv.shape
    C = C3 // 3
    d = C // h
    if d_out.stride(-1) != 1:
        d_out = d_out.contiguous()
    q, k, v = qkv.split(C, dim=-1)
    d_qkv = qkv.new_empty(B, N, C3)
    d_q, d_k, d_v = d_qkv.split(C, dim=-1)  # written in place, head by head
    d_attn = qkv.new_empty(h, B, d, d)
    scratch = qkv.new_empty(B, N, d)
    for j, (d_out_j, v_j, d_v_j) in enumerate(zip(_head_columns(d_out, h), _head_columns(v, h), _head_columns(d_v, h))):
        torch.bmm(d_out_j.transpose(1, 2), v_j, out=d_attn[j])  # (B, d, d)
        _bmm_into(d_v_j, d_out_j, attn[j], scratch)  # (B, N, d)
    d_temperature = _channel_attention_backward(d_attn, qkv, temperature, norm_q, norm_k, cosine, attn, d_qkv, scratch)
    return d_qkv, d_temperature


def _channel_attention_backward(d_attn: torch.Tensor, qkv: torch.Tensor, temperature: torch.Tensor,
                                norm_q: torch.Tensor, norm_k: torch.Tensor, cosine: torch.Tensor, attn: torch.Tensor,
                                d_qkv: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """`_channel_attention`'s backward from d_attn (h, B, d, d): writes d_q and d_k into their columns of
    d_qkv (B, N, 3C) and returns d_temperature. `scratch` is a (B, N, d) buffer."""
    h, B, d, _ = attn.shape
    C = h * d
    q, k, _ = qkv.split(C, dim=-1)
    d_q, d_k, _ = d_qkv.split(C, dim=-1)
    d_logits = attn * (d_attn - (d_attn * attn).sum(dim=-1, keepdim=True))  # through the softmax
    d_temperature = (d_logits * cosine).sum(dim=(1, 2, 3)).view_as(temperature)
    d_cosine = d_logits * temperature.view(h, 1, 1, 1)
    d_gram = d_cosine / (norm_q.unsqueeze(-1) * norm_k.unsqueeze(-2))
    # cosine = gram / (|q| |k|): d/d|q_i| = -cosine_i. / |q_i|, and d|q_i| / dq_i = q_i / |q_i| (0 where clamped)
    pull = d_cosine * cosine
    coef_q = torch.where(norm_q > 1e-12, -pull.sum(dim=-1) / norm_q.square(), 0.0)  # (h, B, d)
    coef_k = torch.where(norm_k > 1e-12, -pull.sum(dim=-2) / norm_k.square(), 0.0)
    for j, (q_j, k_j, d_q_j, d_k_j) in enumerate(zip(_head_columns(q, h), _head_columns(k, h), _head_columns(d_q, h),
                                                      _head_columns(d_k, h))):
        _bmm_into(d_q_j, k_j, d_gram[j].transpose(1, 2), scratch)  # (B, N, d)
        _bmm_into(d_k_j, q_j, d_gram[j], scratch)
    d_q.addcmul_(q, coef_q.transpose(0, 1).reshape(B, 1, C))
    d_k.addcmul_(k, coef_k.transpose(0, 1).reshape(B, 1, C))
    return d_temperature


@_xca_token_major_backward.register_fake
def _(d_out, qkv, temperature, norm_q, norm_k, cosine, attn, num_heads):
    return qkv.new_empty(qkv.shape), temperature.new_empty(temperature.shape)


def _xca_token_major_setup_context(ctx, inputs, output):
    qkv, temperature, num_heads = inputs
    ctx.save_for_backward(qkv, temperature, *output[1:])
    ctx.num_heads = num_heads


def _xca_token_major_grad(ctx, d_out, *_unused_grads_of_the_kept_maps):
    d_qkv, d_temperature = _xca_token_major_backward(d_out, *ctx.saved_tensors, ctx.num_heads)
    return d_qkv, d_temperature, None


_xca_token_major.register_autograd(_xca_token_major_grad, setup_context=_xca_token_major_setup_context)


def token_major_xca(qkv: torch.Tensor, temperature: torch.Tensor, num_heads: int) -> torch.Tensor:
    """XCA's core on the fused qkv (B, N, 3C) -> (B, N, C) (float32 or float64), through the ops above."""
    return _xca_token_major(qkv, temperature, num_heads)[0]


# XCA's core and its output projection in one op, for the `through_projection` path. Head j's output
# v_j attn_j^T (N x d) meets the projection only through its d columns W_j, so
#
#     proj(out) = sum_j v_j (attn_j^T W_j^T) + b = v @ M + b,   M = [attn_j^T W_j^T]_j  (B, C, C)
#
# one batched GEMM with a (C x C) weight per image in place of the per-head value products and the
# projection: the core's (B, N, C) output is never written (nor kept for the weight gradient), and the
# B N C d multiply-adds of the value products become M's B C^2 d, fewer wherever N > C; the backward
# drops two such products per head. Float32 and float64 only, as the token-major op.

@torch.library.custom_op('xcit::xca_projected', mutates_args=())
def _xca_projected(qkv: torch.Tensor, temperature: torch.Tensor, num_heads: int, weight: torch.Tensor,
                   bias: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(projected out (B, N, C); for the backward: norm_q, norm_k (h, B, d), cosine, attn (h, B, d, d), M)."""
    B, N, C3 = qkv.shape
    C, h = C3 // 3, num_heads
    norm_q, norm_k, cosine, attn = _channel_attention(*qkv.split(C, dim=-1)[:2], temperature, h)
    w_t = weight.t().reshape(h, C // h, C)  # (h, d, C): head j's rows of W^T
    mixed = torch.matmul(attn.permute(1, 0, 3, 2), w_t).view(B, C, C)  # (B, C, C): [attn_j^T W_j^T]_j
    v = qkv[..., 2 * C:]  # (B, N, C), rows 3C apart
    out = torch.bmm(v, mixed) if bias is None else torch.baddbmm(bias, v, mixed)  # (B, N, C)
    return out, norm_q.contiguous(), norm_k.contiguous(), cosine, attn, mixed


@_xca_projected.register_fake
def _(qkv, temperature, num_heads, weight, bias):
    B, N, C3 = qkv.shape
    C, h = C3 // 3, num_heads
    d = C // h
    return (qkv.new_empty(B, N, C), qkv.new_empty(h, B, d), qkv.new_empty(h, B, d), qkv.new_empty(h, B, d, d),
            qkv.new_empty(h, B, d, d), qkv.new_empty(B, C, C))


@torch.library.custom_op('xcit::xca_projected_backward', mutates_args=())
def _xca_projected_backward(d_out: torch.Tensor, qkv: torch.Tensor, temperature: torch.Tensor, weight: torch.Tensor,
                            norm_q: torch.Tensor, norm_k: torch.Tensor, cosine: torch.Tensor, attn: torch.Tensor,
                            mixed: torch.Tensor, num_heads: int
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d_qkv, d_temperature, d_weight, d_bias) from the gradient of `_xca_projected`'s out."""
    B, N, C3 = qkv.shape
    C, h = C3 // 3, num_heads
    d = C // h
    if d_out.stride(-1) != 1:
        d_out = d_out.contiguous()
    v = qkv[..., 2 * C:]
    d_qkv = qkv.new_empty(B, N, C3)
    d_v = d_qkv[..., 2 * C:]
    scratch = qkv.new_empty(B, N, C)
    _bmm_into(d_v, d_out, mixed.transpose(1, 2), scratch)  # (B, N, C)
    d_mixed = torch.bmm(v.transpose(1, 2), d_out).view(B, h, d, C)  # (B, h, d, C)
    w_heads = weight.view(C, h, d).transpose(0, 1)  # (h, C, d): head j's columns W_j
    d_attn = torch.matmul(d_mixed, w_heads).permute(1, 0, 3, 2)  # (h, B, d, d): (dM_j W_j)^T
    # d W_j^T = sum_b attn_j[b] dM_j[b]: one GEMM per head over the images and the head's rows
    d_weight_t = torch.bmm(attn.permute(0, 2, 1, 3).reshape(h, d, B * d),
                           d_mixed.permute(1, 0, 2, 3).reshape(h, B * d, C))  # (h, d, C)
    d_temperature = _channel_attention_backward(d_attn, qkv, temperature, norm_q, norm_k, cosine, attn, d_qkv,
                                                qkv.new_empty(B, N, d))
    return d_qkv, d_temperature, d_weight_t.reshape(C, C).t().contiguous(), d_out.sum(dim=(0, 1))  # as the fake


@_xca_projected_backward.register_fake
def _(d_out, qkv, temperature, weight, norm_q, norm_k, cosine, attn, mixed, num_heads):
    C = weight.shape[0]
    return qkv.new_empty(qkv.shape), temperature.new_empty(temperature.shape), weight.new_empty(C, C), weight.new_empty(C)


def _xca_projected_setup_context(ctx, inputs, output):
    qkv, temperature, num_heads, weight, bias = inputs
    ctx.save_for_backward(qkv, temperature, weight, *output[1:])
    ctx.num_heads = num_heads
    ctx.has_bias = bias is not None


def _xca_projected_grad(ctx, d_out, *_unused_grads_of_the_kept_maps):
    d_qkv, d_temperature, d_weight, d_bias = _xca_projected_backward(d_out, *ctx.saved_tensors, ctx.num_heads)
    return d_qkv, d_temperature, None, d_weight, d_bias if ctx.has_bias else None


_xca_projected.register_autograd(_xca_projected_grad, setup_context=_xca_projected_setup_context)


def xca_through_projection(qkv: torch.Tensor, temperature: torch.Tensor, num_heads: int, proj_weight: torch.Tensor,
                           proj_bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(token_major_xca(qkv, ...), proj_weight, proj_bias)` (B, N, C), float32 or float64, with each
    head's value mixing folded into the projection's weights (the ops above)."""
    return _xca_projected(qkv, temperature, num_heads, proj_weight, proj_bias)[0]


# In inference the value projection folds in as well: with v = x W_v^T + b_v, XCA and its projection are
#
#     y = x [sum_j W_v,j^T A_j^T W_p,j^T] + [b_p + W_p (A_j b_v,j)_j],
#
# one (C x C) weight and a bias per image, built in O(B C^3), so the value third of the qkv GEMM
# (O(B N C^2)) is never computed. It pays where there are more tokens than channels (nano, tiny p8)
# and costs where there are not (small p16): the timing decides. No backward: inference only.

@torch.library.custom_op('xcit::xca_values_folded', mutates_args=())
def _xca_values_folded(x: torch.Tensor, qk: torch.Tensor, temperature: torch.Tensor, num_heads: int,
                       value_weight: torch.Tensor, value_bias: torch.Tensor | None, proj_weight: torch.Tensor,
                       proj_bias: torch.Tensor | None) -> torch.Tensor:
    """XCA's projected output (B, N, C) from its input x (B, N, C) and x's queries and keys qk (B, N, 2C)."""
    B, N, C = x.shape
    h = num_heads
    d = C // h
    _, _, _, attn = _channel_attention(*qk.split(C, dim=-1), temperature, h)  # (h, B, d, d)
    rows = attn.permute(0, 2, 1, 3).reshape(h, d * B, d)  # (h, d*B, d): head j's rows, ordered (row, image)
    mixed_values = torch.bmm(rows, value_weight.reshape(h, d, C))  # (h, d*B, C): A_j W_v,j per image
    weight = torch.mm(mixed_values.view(C, B * C).t(), proj_weight.t()).view(B, C, C)  # (B, C, C): (in, out)
    bias = proj_bias
    if value_bias is not None:
        shifts = torch.matmul(attn, value_bias.reshape(h, 1, d, 1)).view(h, B, d)  # (h, B, d): A_j b_v,j
        bias = F.linear(shifts.permute(1, 0, 2).reshape(B, 1, C), proj_weight, proj_bias)  # (B, 1, C)
    return torch.bmm(x, weight) if bias is None else torch.baddbmm(bias, x, weight)  # (B, N, C)


@_xca_values_folded.register_fake
def _(x, qk, temperature, num_heads, value_weight, value_bias, proj_weight, proj_bias):
    return x.new_empty(x.shape)


class XCA(FastPathModule, nn.Module):
    """Cross-covariance attention: a (d x d) softmax per head, linear in the number of tokens.

    No 1/sqrt(d) scale: queries and keys are unit vectors along the token axis
    and a learned per-head temperature sets the sharpness.

    `reference` is the official formulation, token-major. `token_major` (float32) is
    the same maths in `token_major_xca`, on strided views of the fused qkv with its
    backward written out. `through_projection` (float32) folds each head's value
    mixing into the output projection's weights (`xca_through_projection`), and
    `values_folded` (float32, inference) the value projection too, so that the
    values are never computed (`xcit::xca_values_folded`).
    `channel_major` moves q, k and v once to (3, B, h, d, N),
    where each head's tokens are contiguous rows; in lower precision it normalises q
    and k first, in float32, so q @ k^T stays in range.

    `kernel='sdpa'` (the model's `xca_impl`) hands the normalised q, k and v to
    scaled_dot_product_attention with the channels as the sequence and the tokens as
    the feature axis; it measured slower on CPUs (BENCHMARKS.md), hence 'matmul';
    `xcit bench --impls xcit,xcit-sdpa` measures both on other hardware.

    `kernel='triton'` runs the core as the fused Triton kernels of `xca_triton`
    (`torch.ops.xcit.xca_fused`, with its backward) wherever they run: CUDA tensors in
    float32, bfloat16 or float16 without attention dropout (CPU ones only in Triton's
    interpreter); elsewhere XCA runs as with 'matmul'. Under 'auto' on CUDA the fused
    kernels are also one of the timed candidates whenever Triton imports.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, kernel: str = 'matmul', impl: str | None = None):
        super().__init__()
        if kernel not in XCA_KERNELS:
            raise ValueError(f"xca_impl must be one of {', '.join(XCA_KERNELS)}, not {kernel!r}")
        if kernel == 'triton':
            triton_available()  # imported now, so that torch.compile finds it imported and does not trace that
        self.kernel = kernel
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self._init_fast_path(impl)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
        qkv = qkv.permute(2, 0, 3, 4, 1).contiguous()  # (3, B, h, d, N): one copy, every (B, h) slice in order
        return qkv.unbind(0)  # each (B, h, d, N), contiguous

    def attention_map(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (B, h, d, d) channel attention and the values (B, h, d, N) it mixes."""
        q, k, v = self._qkv(x)
        if q.dtype == torch.float32 and not autocast_active(q):
            # sqrt of a plain sum of squares: the same norm as vector_norm, which is ~10x slower here
            norm_q = (q * q).sum(dim=-1, keepdim=True).sqrt().clamp_min(1e-12)  # (B, h, d, 1)
            norm_k = (k * k).sum(dim=-1, keepdim=True).sqrt().clamp_min(1e-12)
            attn = (q @ k.transpose(-2, -1)) * (self.temperature / (norm_q * norm_k.transpose(-2, -1)))
        else:
            q, k = l2_normalize_tokens(q), l2_normalize_tokens(k)
            attn = (q @ k.transpose(-2, -1)) * self.temperature  # (B, h, d, d)
        return attn.softmax(dim=-1), v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        if self.kernel == 'sdpa':
            q, k, v = self._qkv(x)
            q = (l2_normalize_tokens(q) * self.temperature).to(v.dtype)
            x = F.scaled_dot_product_attention(q, l2_normalize_tokens(k), v, scale=1.0,
                                               dropout_p=self.attn_drop.p if self.training else 0.0)
            x = x.reshape(B, C, N).transpose(1, 2)  # (B, N, C)
            return self.proj_drop(self.proj(x))
        dropout = self.training and self.attn_drop.p > 0
        if self.kernel == 'triton' and not dropout and fused_xca_runs(x, C // self.num_heads):
            return self._fused(x)
        train = autograd_records(x, self.qkv.weight)
        forwards = dict(channel_major=self._channel_major, reference=self._reference)
        if x.dtype in (torch.float32, torch.float64) and not autocast_active(x) and not dropout:
            folded = {} if train else dict(values_folded=self._values_folded)
            forwards = dict(token_major=self._token_major, through_projection=self._through_projection, **folded,
                            **forwards)
        # only asked on CUDA and outside torch.compile (which takes the reference under 'auto'): the question
        # imports Triton, and the CPU path stays as it was
        if (x.device.type == 'cuda' and not dropout and not torch.compiler.is_compiling()
                and fused_xca_runs(x, C // self.num_heads)):
            forwards['triton'] = self._fused
        # the candidates are part of the question: a decision for 'triton' is not reused where Triton is missing
        key = (f'xca {"train" if train else "infer"} {x.device.type} {dtype_tag(x)} B{B} N{N} C{C} h{self.num_heads}'
               + (' attn_drop' if dropout else '') + (' triton' if 'triton' in forwards else ''))
        return self.fastest(key, forwards, x, train)(x)

    def _channel_major(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        attn, v = self.attention_map(x)
        x = self.attn_drop(attn) @ v  # (B, h, d, N)
        x = x.reshape(B, C, N).transpose(1, 2).contiguous()  # (B, N, C)
        return self.proj_drop(self.proj(x))

    def _token_major(self, x: torch.Tensor) -> torch.Tensor:
        x = token_major_xca(self.qkv(x), self.temperature, self.num_heads)  # (B, N, C)
        return self.proj_drop(self.proj(x))

    def _through_projection(self, x: torch.Tensor) -> torch.Tensor:
        x = xca_through_projection(self.qkv(x), self.temperature, self.num_heads, self.proj.weight, self.proj.bias)
        return self.proj_drop(x)  # (B, N, C)

    def _values_folded(self, x: torch.Tensor) -> torch.Tensor:
        C = x.shape[-1]
        w_qk, w_v = self.qkv.weight.split((2 * C, C))
        b_qk, b_v = self.qkv.bias.split((2 * C, C)) if self.qkv.bias is not None else (None, None)
        qk = linear(x, w_qk, b_qk, impl=self.qkv.impl)  # (B, N, 2C)
        x = _xca_values_folded(x, qk, self.temperature, self.num_heads, w_v, b_v, self.proj.weight, self.proj.bias)
        return self.proj_drop(x)  # (B, N, C)

    def _fused(self, x: torch.Tensor) -> torch.Tensor:
        x = xca_fused(self.qkv(x), self.temperature, self.num_heads)  # (B, N, C)
        return self.proj_drop(self.proj(x))

    def _reference(self, x: torch.Tensor) -> torch.Tensor:
        """The official XCA maths, token-major."""
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 4, 1)
        q, k, v = qkv.unbind(0)  # each (B, h, d, N)
        q, k = l2_normalize_tokens(q), l2_normalize_tokens(k)  # F.normalize, in float32 under autocast
        attn = ((q @ k.transpose(-2, -1)) * self.temperature).softmax(dim=-1)  # (B, h, d, d)
        x = (self.attn_drop(attn) @ v).permute(0, 3, 1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


def xca_reference(xca: XCA, x: torch.Tensor) -> torch.Tensor:
    """The official XCA maths, for checking the fast path against."""
    return xca._reference(x)


class LPI(nn.Module):
    """Local patch interaction: depthwise 3x3 conv -> GELU -> BN -> depthwise 3x3 conv.

    XCA mixes channels globally; these two convs are what exchanges information
    between neighbouring patches.
    """

    def __init__(self, dim: int, act_layer=nn.GELU):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.act = act_layer()
        self.bn = nn.BatchNorm2d(dim)
        self.conv2 = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        # the (dim, 1, 3, 3) weights in the channels-last strides their gradients come out with (the same
        # bytes): DDP compares strides literally and would warn, and copy, on every step otherwise
        self.conv1.to(memory_format=torch.channels_last)
        self.conv2.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, N, C = x.shape
        x = x.transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W); a view with channels_last strides
        x = self.conv2(self.bn(on_contiguous_view(self.act, self.conv1(x))))
        return x.reshape(B, C, N).transpose(1, 2)  # (B, N, C)


class XCABlock(nn.Module):
    """XCA, LPI and MLP residual branches, each with LayerScale and (constant-rate) drop path.

    LPI runs second but owns `norm3`/`gamma3`, while the MLP owns `norm2`/`gamma2`:
    LPI once came after the MLP, and the released weights kept the old names.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 act_layer=nn.GELU, norm_layer=partial(nn.LayerNorm, eps=1e-6), eta: float = 1.0,
                 xca_impl: str = 'matmul'):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = XCA(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop,
                        kernel=xca_impl)
        self.drop_path = DropPath(drop_path)
        self.norm3 = norm_layer(dim)
        self.local_mp = LPI(dim, act_layer=act_layer)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.gamma1 = nn.Parameter(eta * torch.ones(dim))
        self.gamma3 = nn.Parameter(eta * torch.ones(dim))
        self.gamma2 = nn.Parameter(eta * torch.ones(dim))

    def _residual(self, x: torch.Tensor, gamma: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        if self.training and self.drop_path.drop_prob > 0:
            return x + self.drop_path(gamma * branch)
        return layer_scale_residual(x, gamma, branch)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        x = self._residual(x, self.gamma1, self.attn(self.norm1(x)))  # (B, N, D)
        x = self._residual(x, self.gamma3, self.local_mp(self.norm3(x), H, W))
        x = self._residual(x, self.gamma2, self.mlp(self.norm2(x)))
        return x


class ClassAttention(FastPathModule, nn.Module):
    """Softmax attention of the class token over all tokens (CaiT), returning the new class token.

    Only the class token's query is used, so the query rows of the fused (official)
    `qkv` weight are applied to that token alone rather than to all N + 1.

    `folded` (the fast path) computes no keys or values at all. A head's logits are
    q . (W_k x + b_k) = (W_k^T q) . x + q . b_k, whose last term is the same for every
    token and leaves the softmax as it is; its output, sum_n a_n (W_v x_n + b_v), is
    W_v (sum_n a_n x_n) + b_v, as the weights sum to one. Both take O(N C) per head
    instead of the O(N C^2) of the keys and values of every token.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, impl: str | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self._init_fast_path(impl)

    def attention_map(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The class token's (B, h, 1, 1+N) attention over all tokens and the values (B, h, 1+N, d)."""
        B, N, C = x.shape
        h = self.num_heads
        w_q, w_kv = self.qkv.weight.split((C, 2 * C))
        b_q, b_kv = self.qkv.bias.split((C, 2 * C)) if self.qkv.bias is not None else (None, None)
        impl = self.qkv.impl
        q = linear(x[:, :1], w_q, b_q, impl=impl).reshape(B, 1, h, C // h).transpose(1, 2)  # (B, h, 1, d)
        kv = linear(x, w_kv, b_kv, impl=impl).reshape(B, N, 2, h, C // h)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, h, N, d)
        attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, h, 1, N)
        return attn.softmax(dim=-1), v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        train = autograd_records(x, self.qkv.weight)
        key = f'class attention {mode_tag(self.training, train)} {x.device.type} {dtype_tag(x)} B{B} N{N} C{C} ' \
              f'h{self.num_heads}'
        return self.fastest(key, dict(folded=self._folded, reference=self._reference), x, train)(x)

    def _reference(self, x: torch.Tensor) -> torch.Tensor:
        B, _, C = x.shape
        attn, v = self.attention_map(x)
        cls = (self.attn_drop(attn) @ v).transpose(1, 2).reshape(B, 1, C)  # (B, 1, C)
        return self.proj_drop(self.proj(cls))

    def _folded(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        h = self.num_heads
        d = C // h
        w_q, w_k, w_v = self.qkv.weight.split(C)  # each (C, C); row block j is head j's
        b_q, _, b_v = self.qkv.bias.split(C) if self.qkv.bias is not None else (None, None, None)
        q = linear(x[:, 0], w_q, b_q, impl=self.qkv.impl) * self.scale  # (B, C)
        # W_k,j^T q_j: the query taken back through the key weights, one (B, d) @ (d, C) per head
        query = torch.bmm(q.view(B, h, d).transpose(0, 1), w_k.view(h, d, C)).transpose(0, 1)  # (B, h, C)
        attn = torch.bmm(query, x.transpose(1, 2)).softmax(dim=-1)  # (B, h, N)
        mean = torch.bmm(self.attn_drop(attn), x)  # (B, h, C): each head's weighted mean of the tokens
        cls = torch.bmm(mean.transpose(0, 1), w_v.view(h, d, C).transpose(1, 2))  # (h, B, d): W_v,j mean_j
        cls = cls.transpose(0, 1).reshape(B, 1, C)  # (B, 1, C)
        return self.proj_drop(self.proj(cls if b_v is None else cls + b_v))


class ClassAttentionBlock(nn.Module):
    """Class-attention block with the released models' quirks, without which their weights do not reproduce.

    - the attention branch hands back norm1(patches), so patches become P + gamma1 * norm1(P);
    - `tokens_norm` (every size but nano) applies norm2 to the patches too, not only to the class token;
    - the MLP residual wraps a branch that returns the patches unchanged, so they are doubled.
    Only the class token reaches the head, but the patches are the keys and values
    of the next class-attention block and the input of 'avg' pooling.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, act_layer=nn.GELU,
                 norm_layer=partial(nn.LayerNorm, eps=1e-6), eta: float = 1.0, tokens_norm: bool = False):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = ClassAttention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                                   proj_drop=proj_drop)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.gamma1 = nn.Parameter(eta * torch.ones(dim))
        self.gamma2 = nn.Parameter(eta * torch.ones(dim))
        self.tokens_norm = tokens_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_norm = self.norm1(x)  # (B, 1+N, D)
        cls = x[:, :1] + self.gamma1 * self.attn(x_norm)  # (B, 1, D)
        patches = x[:, 1:] + self.gamma1 * x_norm[:, 1:]  # (B, N, D)
        if self.tokens_norm:
            patches = self.norm2(patches)
        cls = self.norm2(cls)
        cls = cls + self.gamma2 * self.mlp(cls)
        return torch.cat((cls, patches + patches), dim=1)


# the official initialisation: convs and BatchNorm keep PyTorch's defaults
_init_weights = partial(init_weights, norms=(nn.LayerNorm,))


class _XCiTTrunk(Trunk, nn.Module):
    """Conv stem, Fourier positions and XCA blocks: what the classifier and the dense backbone share."""

    def __init__(
            self,
            patch_size: int = 16,
            in_chans: int = 3,
            embed_dim: int = 768,
            depth: int = 12,
            num_heads: int = 12,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = True,
            pos_drop_rate: float = 0.0,
            proj_drop_rate: float = 0.0,
            attn_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            act_layer=None,
            norm_layer=None,
            eta: float = 1.0,
            use_pos_embed: bool = True,
            xca_impl: str = 'matmul',
    ):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f'embed_dim {embed_dim} is not divisible by num_heads {num_heads}')
        act_layer = act_layer or nn.GELU
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-6)
        # what the classifier's class-attention blocks share with the XCA blocks
        self.layer_kwargs = dict(mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, attn_drop=attn_drop_rate,
                                 act_layer=act_layer, norm_layer=norm_layer, eta=eta)
        self.embed_dim = self.num_features = self.head_hidden_size = embed_dim
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.num_layers = depth
        self.patch_embed = ConvPatchEmbed(patch_size, in_chans, embed_dim, act_layer=act_layer)
        self.pos_embeder = PositionalEncodingFourier(embed_dim) if use_pos_embed else None
        self.pos_drop = nn.Dropout(pos_drop_rate)
        # stochastic depth at the same rate in every block, not a linear ramp
        self.blocks = nn.ModuleList([
            XCABlock(embed_dim, num_heads, proj_drop=proj_drop_rate, drop_path=drop_path_rate, xca_impl=xca_impl,
                     **self.layer_kwargs)
            for _ in range(depth)])

    def _stem(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x, (Hp, Wp) = self.patch_embed(x)  # (B, N, D)
        if self.pos_embeder is not None:
            x = x + self.pos_embeder(Hp, Wp)
        return self.pos_drop(x), (Hp, Wp)

    def _layer(self, i: int, state: tuple[torch.Tensor, tuple[int, int]]) -> tuple[torch.Tensor, tuple[int, int]]:
        x, grid = state
        return self.run_block(self.blocks[i], x, *grid), grid  # (B, N, D)

    def _tap(self, i: int, state: tuple[torch.Tensor, tuple[int, int]]) -> tuple[torch.Tensor, tuple[int, int]]:
        return state

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set()


class XCiT(ClassifierMixin, _XCiTTrunk):
    """XCiT image classifier.

    The class token joins only after the XCA blocks (as in CaiT) and is refined by
    `cls_attn_layers` class-attention blocks. `forward` always returns logits;
    distillation belongs in a wrapper, not in a training-mode tuple.
    """

    def __init__(
            self,
            img_size: int | tuple[int, int] = 224,
            num_classes: int = 1000,
            global_pool: str = 'token',
            drop_rate: float = 0.0,
            cls_attn_layers: int = 2,
            tokens_norm: bool = False,
            **trunk_kwargs,
    ):
        """`img_size` is only the size the weights were trained at: any input size works.

        `trunk_kwargs`: patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio,
        qkv_bias, pos_drop_rate, proj_drop_rate, attn_drop_rate, drop_path_rate,
        act_layer, norm_layer, eta (LayerScale init), use_pos_embed, xca_impl ('matmul', 'sdpa' or 'triton', see XCA).
        """
        super().__init__(**trunk_kwargs)
        embed_dim = self.embed_dim
        self.num_classes = num_classes
        self.global_pool = self._check_pool(global_pool)
        self.img_size = img_size
        self.num_prefix_tokens = 1  # the class token, joining after the XCA blocks
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.cls_attn_blocks = nn.ModuleList([
            ClassAttentionBlock(embed_dim, self.num_heads, proj_drop=drop_rate, tokens_norm=tokens_norm,
                                **self.layer_kwargs)
            for _ in range(cls_attn_layers)])
        self.norm = self.layer_kwargs['norm_layer'](embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = self._new_head(num_classes)
        self.feature_info = [dict(num_chs=embed_dim, reduction=self.patch_size, module=f'blocks.{i}')
                             for i in range(len(self.blocks))]

        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        # as in the official recipe, whose optimizer also exempts every 1-D parameter and bias
        return {'cls_token'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups for layer-wise learning-rate decay (timm's convention)."""
        return dict(
            stem=r'^cls_token|^pos_embeder|^patch_embed',
            blocks=r'^blocks\.(\d+)' if coarse else [(r'^blocks\.(\d+)', None)],
            cls_attn_blocks=[(r'^cls_attn_blocks\.(\d+)', None), (r'^norm', (99999,))],
        )

    def forward_cls(self, x: torch.Tensor) -> torch.Tensor:
        """Prepend the class token to the patch tokens and run the class-attention blocks."""
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)  # (B, 1+N, D)
        for block in self.cls_attn_blocks:
            x = block(x)
        return x

    def _final(self, state: tuple[torch.Tensor, tuple[int, int]]) -> torch.Tensor:
        return self.norm(self.forward_cls(state[0]))  # (B, 1+N, D)

    def _norm_tap(self, i: int, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return self.norm(tokens)  # every XCA block has the final norm's width


class XCiTDense(_XCiTTrunk):
    """The official detection/segmentation backbone: four XCA block outputs turned into a stride 4/8/16/32 pyramid.

    No class token, class attention, final norm or head. Taps default to blocks
    [3, 5, 7, 11] (depth 12) or [7, 11, 15, 23] (depth 24) and are resized by
    transposed convs / max-pools, under the official module names `fpn1`..`fpn4`.
    """

    default_out_indices = {12: (3, 5, 7, 11), 24: (7, 11, 15, 23)}

    def __init__(self, out_indices: Sequence[int] | None = None, **trunk_kwargs):
        """`trunk_kwargs` as for `XCiT`."""
        super().__init__(**trunk_kwargs)
        depth, patch_size = len(self.blocks), self.patch_size
        if out_indices is None:
            if depth not in self.default_out_indices:
                raise ValueError(f'no default taps for depth {depth}; pass four block indices as out_indices')
            out_indices = self.default_out_indices[depth]
        self.out_indices = take_indices(depth, out_indices)
        if len(self.out_indices) != 4:
            raise ValueError(f'the pyramid needs 4 distinct block indices, got {list(out_indices)}')
        D = self.embed_dim
        if patch_size == 16:
            self.fpn1 = nn.Sequential(nn.ConvTranspose2d(D, D, 2, stride=2), nn.BatchNorm2d(D), nn.GELU(),
                                      nn.ConvTranspose2d(D, D, 2, stride=2))
            self.fpn2 = nn.Sequential(nn.ConvTranspose2d(D, D, 2, stride=2))
            self.fpn3 = nn.Identity()
            self.fpn4 = nn.MaxPool2d(kernel_size=2, stride=2)
        else:
            self.fpn1 = nn.Sequential(nn.ConvTranspose2d(D, D, 2, stride=2))
            self.fpn2 = nn.Identity()
            self.fpn3 = nn.Sequential(nn.MaxPool2d(kernel_size=2, stride=2))
            self.fpn4 = nn.Sequential(nn.MaxPool2d(kernel_size=4, stride=4))
        self.feature_info = [dict(num_chs=D, reduction=r, module=f'fpn{i + 1}') for i, r in enumerate((4, 8, 16, 32))]
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = self.feature_maps(x, self.out_indices)  # 4 x (B, D, Hp, Wp)
        adapters = (self.fpn1, self.fpn2, self.fpn3, self.fpn4)
        return [adapter(t) for adapter, t in zip(adapters, taps)]


_TIMM_SPLIT_QKV = re.compile(r'^(cls_attn_blocks\.\d+\.attn)\.([qkv])\.(weight|bias)$')


def checkpoint_filter_fn(state_dict: dict, model: nn.Module) -> dict:
    """Map a flat XCiT state dict from timm's layout to ours (the official one).

    timm renames `pos_embeder` to `pos_embed` and splits each class-attention
    `qkv` into `q`, `k`, `v`; both are undone here. For the dense backbone the
    classification-only entries (class token, class attention, norm, head) are dropped.
    """
    out = {}
    split_qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if key.startswith('pos_embed.'):
            key = 'pos_embeder.' + key[len('pos_embed.'):]
        split = _TIMM_SPLIT_QKV.match(key)
        if split:
            prefix, part, kind = split.groups()
            split_qkv.setdefault(f'{prefix}.qkv.{kind}', {})[part] = value
            continue
        out[key] = value
    for key, parts in split_qkv.items():
        if set(parts) != {'q', 'k', 'v'}:
            raise ValueError(f'{key}: the checkpoint has only {sorted(parts)} of q, k, v')
        out[key] = torch.cat([parts['q'], parts['k'], parts['v']], dim=0)
    if isinstance(model, XCiTDense):
        out = {k: v for k, v in out.items()
               if not (k == 'cls_token' or k.startswith(('cls_attn_blocks.', 'norm.', 'head.')))}
        if not any(k.startswith('fpn') for k in out):
            # a classification checkpoint: the pyramid adapters start from their initialisation, as in the official code
            _logger.debug('checkpoint has no fpn adapters; they keep their initialisation')
            out.update({k: v for k, v in model.state_dict().items() if k.startswith('fpn')})
    return out


def timm_state_dict(state_dict: dict) -> dict:
    """Our (official) layout -> timm's: `pos_embed` and split class-attention q/k/v."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith('pos_embeder.'):
            out['pos_embed.' + key[len('pos_embeder.'):]] = value
        elif key.startswith('cls_attn_blocks.') and '.attn.qkv.' in key:
            prefix, kind = key.split('.attn.qkv.')
            for part, chunk in zip('qkv', value.chunk(3, dim=0)):
                out[f'{prefix}.attn.{part}.{kind}'] = chunk.clone()
        else:
            out[key] = value
    return out


def guess_weights(state_dict: dict) -> WeightsGuess | None:
    """Which XCiT a state dict (in our layout) belongs to, from its shapes alone; None if it is no XCiT."""
    probe = state_dict.get('blocks.0.attn.temperature')
    if probe is None or probe.ndim != 3 or 'blocks.0.local_mp.conv1.weight' not in state_dict:
        return None
    heads = probe.shape[0]
    dim = state_dict['blocks.0.norm1.weight'].shape[0]
    depth = 1 + max(int(k.split('.')[1]) for k in state_dict if k.startswith('blocks.'))
    stem_units = sum(1 for k in state_dict if re.fullmatch(r'patch_embed\.proj\.\d+\.0\.weight', k))
    patch = {4: 16, 3: 8}.get(stem_units)
    num_classes = head_classes(state_dict)
    description = f'embed_dim {dim}, depth {depth}, {heads} heads, patch {patch}, {num_classes} classes'
    size = next((name for name, (d, n, h, _) in _XCIT_SIZES.items() if (d, n, h) == (dim, depth, heads)), None)
    architecture = f'xcit_{size}_p{patch}_224' if size and patch else None
    return WeightsGuess(architecture, num_classes, description)


# PASSL's XCiT port keeps the official module names
register_checkpoint_adapter((XCiT, XCiTDense), CheckpointAdapter(checkpoint_filter_fn, guess_weights, timm_state_dict,
                                                                 passl_fn=dict))


# --- variants -------------------------------------------------------------------------------------

_FB_URL = 'https://dl.fbaipublicfiles.com/xcit/{}.pth'
_PASSL_URL = 'https://passl.bj.bcebos.com/vision_transformers/xcit/{}.pdparams'
# timm's copies of the facebookresearch releases on the Hugging Face Hub, in timm's layout (`arch.tag` repos)
_TIMM_HUB_ID = 'timm/{}.{}'

# size: (embed_dim, depth, num_heads, tokens_norm); LayerScale eta is 1.0 at depth 12 and 1e-5 at depth 24
_XCIT_SIZES = {
    'nano_12': (128, 12, 4, False),
    'tiny_12': (192, 12, 4, True),
    'tiny_24': (192, 24, 4, True),
    'small_12': (384, 12, 8, True),
    'small_24': (384, 24, 8, True),
    'medium_24': (512, 24, 8, True),
    'large_24': (768, 24, 16, True),
}
# PASSL published its own distilled run for this one model only
_PASSL_DIST = {'xcit_nano_12_p8_224'}
# facebookresearch/dino's self-supervised backbones (the teacher, without a classifier)
_DINO = {'xcit_small_12_p16_224', 'xcit_small_12_p8_224', 'xcit_medium_24_p16_224', 'xcit_medium_24_p8_224'}
_DINO_URL = 'https://dl.fbaipublicfiles.com/dino/dino_{0}_pretrain/dino_{0}_pretrain.pth'


def _cfg(url: str, resolution: int, **kwargs) -> dict:
    return shared_cfg(url=url, input_size=(3, resolution, resolution), crop_pct=1.0, first_conv='patch_embed.proj.0.0',
                      license='apache-2.0', paper_ids='arXiv:2106.09681') | kwargs


# published ImageNet-1k top-1 (%), with the table that states it, so that `xcit models --pretrained` can show it:
# facebookresearch/xcit README (crop 1.0): (size, patch) -> (224, 224 distilled, 384 distilled)
_FB_TOP1 = {
    ('nano_12', 16): (69.9, 72.2, 75.4), ('nano_12', 8): (73.8, 76.3, 77.8),
    ('tiny_12', 16): (77.1, 78.6, 80.9), ('tiny_12', 8): (79.7, 81.2, 82.4),
    ('tiny_24', 16): (79.4, 80.4, 82.6), ('tiny_24', 8): (81.9, 82.6, 83.7),
    ('small_12', 16): (82.0, 83.3, 84.7), ('small_12', 8): (83.4, 84.2, 85.1),
    ('small_24', 16): (82.6, 83.9, 85.1), ('small_24', 8): (83.9, 84.9, 85.6),
    ('medium_24', 16): (82.7, 84.3, 85.4), ('medium_24', 8): (83.7, 85.1, 85.8),
    ('large_24', 16): (82.9, 84.9, 85.8), ('large_24', 8): (84.4, 85.4, 86.0),
}
_FB_TOP1_SOURCE = 'facebookresearch/xcit README'
# PaddlePaddle/PASSL configs/xcit/README.md (crop 1.0): (size, patch) -> top-1; its one distilled run apart
_PASSL_TOP1 = {
    ('nano_12', 16): 70.01, ('nano_12', 8): 73.90, ('tiny_12', 16): 77.15, ('tiny_12', 8): 79.68,
    ('tiny_24', 16): 79.42, ('tiny_24', 8): 81.87, ('small_12', 16): 81.89, ('small_12', 8): 83.36,
    ('small_24', 16): 82.51, ('small_24', 8): 83.82, ('medium_24', 16): 82.67, ('medium_24', 8): 83.73,
    ('large_24', 16): 82.89, ('large_24', 8): 84.42,
}
_PASSL_DIST_TOP1 = 77.28
_PASSL_TOP1_SOURCE = 'PaddlePaddle/PASSL configs/xcit/README.md'
# the DINO backbones carry no classifier: a linear classifier trained on their frozen features
_DINO_LINEAR_TOP1 = {('small_12', 16): 77.8, ('small_12', 8): 79.2, ('medium_24', 16): 78.8, ('medium_24', 8): 80.3}


def _xcit_cfgs(size: str, patch: int, resolution: int) -> dict[str, dict]:
    name = f'xcit_{size}_p{patch}_{resolution}'
    origin = dict(origin_url='https://github.com/facebookresearch/xcit', top1_source=_FB_TOP1_SOURCE)
    passl = dict(origin_url='https://github.com/PaddlePaddle/PASSL', checkpoint_format='passl',
                 top1_source=_PASSL_TOP1_SOURCE)
    plain, dist_224, dist_384 = _FB_TOP1[size, patch]
    cfgs = {}
    if resolution == 224:  # no undistilled 384 models were released
        cfgs['fb_in1k'] = _cfg(_FB_URL.format(name), resolution, hf_hub_id=_TIMM_HUB_ID.format(name, 'fb_in1k'),
                               top1=plain, **origin)
    cfgs['fb_dist_in1k'] = _cfg(_FB_URL.format(name + '_dist'), resolution,
                                hf_hub_id=_TIMM_HUB_ID.format(name, 'fb_dist_in1k'),
                                top1=dist_224 if resolution == 224 else dist_384, **origin)
    if resolution == 224:
        cfgs['passl_in1k'] = _cfg(_PASSL_URL.format(name), resolution, top1=_PASSL_TOP1[size, patch], **passl)
    if name in _PASSL_DIST:
        cfgs['passl_dist_in1k'] = _cfg(_PASSL_URL.format(name + '_dist'), resolution, top1=_PASSL_DIST_TOP1, **passl)
    if name in _DINO:
        cfgs['dino'] = _cfg(_DINO_URL.format(name.removesuffix('_224')), resolution, num_classes=0,
                            origin_url='https://github.com/facebookresearch/dino', paper_ids='arXiv:2104.14294',
                            top1=_DINO_LINEAR_TOP1[size, patch], top1_source=f'{_FB_TOP1_SOURCE} (linear evaluation)')
    return cfgs


for _size, (_dim, _depth, _heads, _tokens_norm) in _XCIT_SIZES.items():
    for _patch in (16, 8):
        for _res in (224, 384):
            _name = f'xcit_{_size}_p{_patch}_{_res}'
            register_model(
                _name,
                partial(create_family, XCiT, XCiTDense, img_size=_res, patch_size=_patch, embed_dim=_dim, depth=_depth,
                        num_heads=_heads, eta=1.0 if _depth == 12 else 1e-5, tokens_norm=_tokens_norm),
                family='xcit',
                cfgs=_xcit_cfgs(_size, _patch, _res),
            )
            register_alias(f'{_name}_dist', f'{_name}.fb_dist_in1k')  # timm's pre-tag names
