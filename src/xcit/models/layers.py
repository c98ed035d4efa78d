"""Small layers shared by the model families."""
from __future__ import annotations

import functools
import os
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


# --- linear layers through oneDNN ------------------------------------------------------------------
#
# PyTorch runs float32 matmuls on the CPU through BLAS (MKL). oneDNN, which PyTorch
# ships for its convolutions, multiplies the same matrices about twice as fast on
# some CPUs (measured on AMD EPYC with AVX-512: 2.2x for every GEMM shape of these
# models) and can apply the bias and an exact GELU in the same pass. The maths is
# unchanged: x @ W^T + b, then erf-GELU. `F.linear` remains the reference and the
# path for other devices, dtypes and autocast. XCIT_ONEDNN_LINEAR=0 turns it off.

@functools.lru_cache(maxsize=None)
def onednn_linear_available() -> bool:
    if os.environ.get('XCIT_ONEDNN_LINEAR', '1') == '0' or not torch.backends.mkldnn.is_available():
        return False
    try:  # a private op (inductor's CPU fusion uses it): check it exists and computes what it should
        x, w, b = torch.randn(3, 4), torch.randn(5, 4), torch.randn(5)
        y = torch.ops.mkldnn._linear_pointwise(x, w, b, 'gelu', [], 'none')
        return bool(torch.allclose(y, F.gelu(F.linear(x, w, b)), atol=1e-5))
    except (AttributeError, RuntimeError):
        return False


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool = False) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, 'gelu' if gelu else 'none', [], 'none' if gelu else '')


class _OneDNNLinear(torch.autograd.Function):
    """x @ W^T + b on 2-D x, its gradients also through oneDNN (strided operands need no copies)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = _onednn(grad, weight.t().contiguous(), None) if ctx.needs_input_grad[0] else None
        grad_w = _onednn(grad.t(), x.t(), None) if ctx.needs_input_grad[1] else None
        grad_b = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, gelu: bool = False
           ) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, followed by exact GELU when `gelu`, through oneDNN where that applies."""
    fast = (x.device.type == 'cpu' and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not torch.is_autocast_enabled('cpu') and onednn_linear_available())
    if not fast:
        y = F.linear(x, weight, bias)
        return F.gelu(y) if gelu else y
    x2 = x.reshape(-1, x.shape[-1])  # (M, K)
    if not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        y = _onednn(x2, weight, bias, gelu)  # bias and GELU fused into the GEMM
    else:
        y = _OneDNNLinear.apply(x2, weight, bias)
        if gelu:
            y = F.gelu(y)
    return y.view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """nn.Linear (same parameters and state-dict keys) computed by `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


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
        self.fc1 = Linear(in_features, hidden_features)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = Linear(hidden_features, in_features)
        self.drop2 = nn.Dropout(drop)
        # exact GELU can run inside fc1's GEMM
        self.fuse_gelu = type(self.act) is nn.GELU and self.act.approximate == 'none'

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fuse_gelu:
            x = linear(x, self.fc1.weight, self.fc1.bias, gelu=True)
        else:
            x = self.act(self.fc1(x))
        return self.drop2(self.fc2(self.drop1(x)))


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
