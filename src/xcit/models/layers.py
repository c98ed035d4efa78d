"""Small layers shared by the model families."""
from __future__ import annotations

import functools
from functools import partial
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fastpath import FastPathModule, candidate_step, pick


# --- linear layers through oneDNN ------------------------------------------------------------------
#
# PyTorch runs float32 matmuls on the CPU through BLAS (MKL). oneDNN, which PyTorch
# ships for its convolutions, multiplies the same matrices at a different rate (2.2x
# MKL's on an AMD EPYC; 0.8-1.0x forward and about half in the backward pass on an
# Intel Xeon) and can apply the bias and an exact GELU in the same pass. The maths
# is unchanged: x @ W^T + b, then erf-GELU. Which of the two a layer runs is decided
# by `fastpath` ('auto' times both for each shape on first use).


_ONEDNN_OK = False  # what the probe found, for compiled graphs (which must not trace the probe itself)


@functools.cache
def onednn_linear_works() -> bool:
    """Whether this PyTorch build has oneDNN's fused linear and it computes F.linear + GELU (probed once)."""
    global _ONEDNN_OK
    if not torch.backends.mkldnn.is_available():
        return False
    # fixed CPU float32 values, whatever device, dtype or autocast context the first model is built under,
    # and no draw from the global random generator
    x = torch.linspace(-2.0, 2.0, 12, device='cpu').reshape(3, 4)
    w = torch.linspace(-1.0, 1.5, 20, device='cpu').reshape(5, 4)
    b = torch.linspace(0.5, -0.5, 5, device='cpu')
    try:  # a private op (inductor's CPU fusion uses it): check it exists and computes what it should
        with torch.no_grad(), torch.autocast('cpu', enabled=False):
            y = torch.ops.mkldnn._linear_pointwise(x, w, b, 'gelu', [], 'none')
            _ONEDNN_OK = bool(torch.allclose(y, F.gelu(F.linear(x, w, b)), atol=1e-5))
    except (AttributeError, RuntimeError):
        _ONEDNN_OK = False
    return _ONEDNN_OK


@torch.library.custom_op('xcit::onednn_linear', mutates_args=())
def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool) -> torch.Tensor:
    """x @ W^T + b (then exact GELU) on 2-D x. An opaque op to torch.compile, which fuses around it."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, 'gelu' if gelu else 'none', [], 'none' if gelu else '')


@_onednn.register_fake
def _(x, weight, bias, gelu):
    return x.new_empty(x.shape[0], weight.shape[0])


def _onednn_setup_context(ctx, inputs, output):
    x, weight, bias, gelu = inputs
    if gelu:  # only used without autograd: GELU's gradient would need the pre-activation
        raise RuntimeError('the fused GELU has no backward; call it with gelu=False under autograd')
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _onednn_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    grad_x = _onednn(grad, weight.t().contiguous(), None, False) if ctx.needs_input_grad[0] else None
    # the weight gradient through BLAS, which takes the transposed (M x N)^T operand as it is: oneDNN would
    # copy it (as large as the activations) to a contiguous layout first
    grad_w = torch.mm(grad.t(), x) if ctx.needs_input_grad[1] else None
    grad_b = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return grad_x, grad_w, grad_b, None


_onednn.register_autograd(_onednn_backward, setup_context=_onednn_setup_context)


@torch.library.custom_op('xcit::onednn_mlp_gelu', mutates_args=())
def _onednn_mlp(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(fc2(GELU(h)), h = fc1(x)) on 2-D x, for training: the backward pass keeps x and h only and
    recomputes GELU(h), as large as h, in one cheap elementwise pass instead of storing it."""
    hidden = _onednn(x, w1, b1, False)
    return _onednn(F.gelu(hidden), w2, b2, False), hidden


@_onednn_mlp.register_fake
def _(x, w1, b1, w2, b2):
    return x.new_empty(x.shape[0], w2.shape[0]), x.new_empty(x.shape[0], w1.shape[0])


def _onednn_mlp_setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2 = inputs
    ctx.save_for_backward(x, w1, w2, output[1])


def _onednn_mlp_backward(ctx, grad, _grad_hidden):
    x, w1, w2, hidden = ctx.saved_tensors
    grad_w2 = torch.mm(grad.t(), F.gelu(hidden))  # weight gradients through BLAS, as in _onednn_backward
    grad_hidden = torch.ops.aten.gelu_backward(_onednn(grad, w2.t().contiguous(), None, False), hidden)
    grad_x = _onednn(grad_hidden, w1.t().contiguous(), None, False)
    grad_w1 = torch.mm(grad_hidden.t(), x)
    return grad_x, grad_w1, grad_hidden.sum(0), grad_w2, grad.sum(0)


_onednn_mlp.register_autograd(_onednn_mlp_backward, setup_context=_onednn_mlp_setup_context)


def autocast_active(t: torch.Tensor) -> bool:
    """Whether autocast will lower the precision of ops on `t` (never on the meta device FLOP counters use)."""
    return t.device.type != 'meta' and torch.is_autocast_enabled(t.device.type)


def autograd_records(*tensors: torch.Tensor) -> bool:
    """Whether an op on these tensors will be recorded for a backward pass (which in-place and
    inference-only kernels would break)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _onednn_mode(x: torch.Tensor, *weights: torch.Tensor) -> str | None:
    """How the oneDNN op can take these operands: None where it cannot compute what F.linear would
    (it is a CPU float32 kernel: another device, dtype or autocast's lower precision, or a build
    without it), 'train' where autograd will need its backward, else 'infer' (where bias and GELU
    fuse into the GEMM)."""
    if x.device.type != 'cpu' or x.dtype != torch.float32 or torch.is_autocast_enabled('cpu') or any(
            w.dtype != torch.float32 for w in weights):
        return None
    if not (_ONEDNN_OK if torch.compiler.is_compiling() else onednn_linear_works()):
        return None
    return 'train' if autograd_records(x, *weights) else 'infer'


def _linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool) -> torch.Tensor:
    y = F.linear(x, weight, bias)
    if gelu and not autograd_records(y):
        return torch.ops.aten.gelu_(y)  # in place: with nothing to keep for a backward pass, one hidden map, not two
    return F.gelu(y) if gelu else y


def _linear_onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])  # (M, K)
    if autograd_records(x, weight, *([] if bias is None else [bias])):
        y = F.gelu(_onednn(x2, weight, bias, False)) if gelu else _onednn(x2, weight, bias, False)
    else:
        y = _onednn(x2, weight, bias, gelu)  # bias and GELU fused into the GEMM
    return y.view(*x.shape[:-1], weight.shape[0])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, gelu: bool = False,
           impl: str = 'reference') -> torch.Tensor:
    """`F.linear(x, weight, bias)`, followed by exact GELU when `gelu`; through oneDNN where `impl` takes the fast path."""
    mode = _onednn_mode(x, weight, *([] if bias is None else [bias])) if impl != 'reference' else None
    if mode is None:
        return _linear_reference(x, weight, bias, gelu)
    key = f'linear {mode} {x.numel() // x.shape[-1]}x{weight.shape[1]}->{weight.shape[0]}' \
          f'{" +bias" if bias is not None else ""}{" +gelu" if gelu else ""}'
    operands = (x, weight, bias)
    train = mode == 'train'
    # without GELU both candidates are one GEMM, compiled or not; with it, a graph fuses GELU into F.linear's output
    path = pick(impl, key, dict(onednn=lambda: candidate_step(partial(_linear_onednn, gelu=gelu), operands, train),
                                reference=lambda: candidate_step(partial(_linear_reference, gelu=gelu), operands, train)),
                compiled_alike=not gelu)
    return (_linear_onednn if path == 'onednn' else _linear_reference)(x, weight, bias, gelu)


class Linear(FastPathModule, nn.Linear):
    """nn.Linear (same parameters and state-dict keys) computed by `linear` on the path `impl` names."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 impl: str | None = None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_fast_path(impl)
        onednn_linear_works()  # probed now: a graph traced later reads the answer and cannot run the probe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, impl=self.impl)


def on_contiguous_view(fn, x: torch.Tensor) -> torch.Tensor:
    """`fn(x)` for an elementwise `fn`, applied to a channels-last map through its contiguous (B, H, W, C) view.

    PyTorch runs GELU (and its gradient) on a contiguous float tensor through oneDNN and on a
    channels-last one through its own kernel: the same values within 5e-7, and on a Zen 3 EPYC
    1.6x slower forward and 1.4-1.5x slower backward (BENCHMARKS.md). The NHWC view holds the
    same bytes in contiguous order, so every layout gets the kernel contiguous tensors get.
    Graphs (compiled, exported, traced) choose their own kernels and get `fn(x)` as written.
    """
    graph = torch.compiler.is_compiling() or torch.jit.is_tracing()
    if not graph and x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return fn(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (B, C, H, W), channels-last strides again
    return fn(x)


class LayerScaleResidual(torch.autograd.Function):
    """x + gamma * branch, for a (C,) gamma over (..., C) tensors: torch.addcmul's forward pass, with a
    backward that does not multiply the gradient by addcmul's `value` (1 here), a whole pass saved."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, gamma: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gamma, branch)
        return torch.addcmul(x, gamma, branch)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        gamma, branch = ctx.saved_tensors
        d_gamma = (grad * branch).flatten(0, -2).sum(0) if ctx.needs_input_grad[1] else None
        d_branch = grad * gamma if ctx.needs_input_grad[2] else None
        return grad, d_gamma, d_branch


def layer_scale_residual(x: torch.Tensor, gamma: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """x + gamma * branch in one pass (LayerScale on a residual branch). Compiled graphs take addcmul,
    whose backward the compiler fuses itself."""
    if (autograd_records(x, gamma, branch) and gamma.dim() == 1 and x.shape == branch.shape
            and not torch.compiler.is_compiling()):
        return LayerScaleResidual.apply(x, gamma, branch)
    return torch.addcmul(x, gamma, branch)


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias of one convolution computing bn(conv(x)) with BatchNorm's running statistics."""
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)  # (C_out,)
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    return conv.weight * scale.view(-1, 1, 1, 1), bias


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


class Mlp(FastPathModule, nn.Module):
    """Two-layer feed-forward network; `fc1`/`fc2` are the names every released checkpoint uses.

    With exact GELU and no dropout, inference runs GELU inside fc1's GEMM where that
    linear takes oneDNN, and training can run both layers as one oneDNN op that keeps
    fc1's output and recomputes GELU in the backward pass instead of storing both
    (the fast path of this module, timed against the two linears as written).
    """

    def __init__(self, in_features: int, hidden_features: int, act_layer=nn.GELU, drop: float = 0.0,
                 impl: str | None = None):
        super().__init__()
        self.fc1 = Linear(in_features, hidden_features)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = Linear(hidden_features, in_features)
        self.drop2 = nn.Dropout(drop)
        self.fuse_gelu = type(self.act) is nn.GELU and self.act.approximate == 'none' and drop == 0
        self._init_fast_path(impl)

    def _fused_train(self, x: torch.Tensor, w1, b1, w2, b2) -> torch.Tensor:
        y, _ = _onednn_mlp(x.reshape(-1, x.shape[-1]), w1, b1, w2, b2)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def _reference(x: torch.Tensor, w1, b1, w2, b2) -> torch.Tensor:
        return _linear_reference(_linear_reference(x, w1, b1, True), w2, b2, False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fuse_gelu:
            return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))
        operands = (x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)
        mode = _onednn_mode(x, self.fc1.weight, self.fc2.weight) if self.impl != 'reference' else None
        if mode == 'train':
            key = f'mlp train {x.numel() // x.shape[-1]}x{x.shape[-1]}->{self.fc1.out_features}'
            if self.pick(key, dict(onednn_fused=lambda: candidate_step(self._fused_train, operands, True),
                                   reference=lambda: candidate_step(self._reference, operands, True)), x) != 'reference':
                return self._fused_train(*operands)
        return self.fc2(linear(x, self.fc1.weight, self.fc1.bias, gelu=True, impl=self.fc1.impl))


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
