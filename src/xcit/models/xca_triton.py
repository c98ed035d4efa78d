"""XCA's core as fused Triton kernels: from the fused qkv (B, N, 3C) to the mixed values (B, N, C), and back.

Per head, attn = softmax(t * q^T k / (|q| |k|^T)) with norms along the tokens and
out = v @ attn^T. The d x d map is a reduction over all N tokens, so no single pass
can both build and apply it. Forward, three launches:

1. `_gram_partials`, grid (B*h, S): each program walks its share of the token blocks
   and sums q^T k and the squares of q and k, in float32, into a slot of its own.
2. `_attention_map`, grid (B*h,): adds the S slots in a fixed order (deterministic, no
   atomics), divides by the norms (F.normalize's max(|x|, 1e-12)), scales by the
   temperature and takes the softmax.
3. `_apply_map`, grid (B*h, S): out = v @ attn^T, into the head's columns of (B, N, C).

Backward, three more of the same shapes: d_attn = d_out^T v summed like (1), with
d_v = d_out @ attn written on the way; the softmax's and the normalisation's backward
on the d x d maps; d_q and d_k from the normalised k and q. Every pass reads its head's
columns of qkv in place (rows 3C apart); between passes only float32 (B, h, D, D) maps
and (B, h, 2, D) norms are kept, D being d rounded up to a power of two (d = 48 runs
in 64 masked lanes).

Products of tokens with tokens (q^T k, d_out^T v) take half-precision operands as they
are, with float32 accumulation, so raw q^T k cannot overflow even from float16 at
10,000 tokens. Products of tokens with a float32 map (attn, the cosines' gradient) run
in TF32, which holds half-precision tokens exactly and keeps 10 bits of the map where
bfloat16 would keep 7; except d_q and d_k, whose two terms cancel where few tokens carry a
channel, and which run in IEEE float32. Float32 inputs multiply in IEEE float32 throughout
(no TF32), as PyTorch's matmul does by default.

Triton is imported when first asked about (by XCA(kernel='triton') when built, or by
'auto' on a CUDA tensor), never by the package's import or a CPU model's default path;
where it is missing the package works and XCA runs its other paths. With
TRITON_INTERPRET=1 in the environment when Triton is imported, the kernels run on CPU
tensors in Triton's interpreter.
"""
from __future__ import annotations

import contextlib
import functools
from types import SimpleNamespace

import torch
from torch import Tensor

tl = None  # triton.language once imported: the kernels read it as a global when compiled
_triton = None
_devices: tuple[str, ...] | None = None  # the device types the kernels take here; None until Triton is tried

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 64  # the shipped models' largest (medium: 512 / 8); each program holds (D x D) float32 maps
_MAX_SPLITS = 64


def _import_triton() -> tuple[str, ...]:
    """Import Triton, once; the device types the kernels take. XCA(kernel='triton') calls it when built, so
    that torch.compile later reads a constant instead of tracing the import."""
    global tl, _triton, _devices
    if _devices is None:
        try:
            import triton
            import triton.language
        except ImportError:
            _devices = ()
        else:
            _triton, tl = triton, triton.language
            # the mode is fixed now: Triton builds its own library functions for one or the other on import
            _devices = ('cuda', 'cpu') if triton.knobs.runtime.interpret else ('cuda',)
    return _devices


def triton_available() -> bool:
    """Whether Triton imports here."""
    return bool(_import_triton())


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (TRITON_INTERPRET=1 when it was imported), on CPU tensors too."""
    return 'cpu' in _import_triton()


def fused_xca_runs(x: Tensor, head_dim: int) -> bool:
    """Whether the fused kernels take `x`'s device and dtype: CUDA tensors, or CPU ones in the interpreter."""
    return x.dtype in DTYPES and head_dim <= MAX_HEAD_DIM and x.device.type in _import_triton()


# ---- kernels: plain functions, compiled by `_kernels()` once Triton has been imported ----
# Shared arguments: `row` = b * H + head (program axis 0), `split` (axis 1) owns token blocks
# [split * blocks_per_split, ...); HEAD_DIM = d; D = d padded to a power of two. DOT is the dtype of the
# operands of token-by-token products (q^T k, d_out^T v): the tokens' own, exact in float32 accumulation.
# Products of tokens and a float32 map take float32 operands; PRECISION ('tf32' for half-precision tokens,
# which TF32 holds exactly, 'ieee' for float32 ones) is how tl.dot multiplies float32.

def _gram_partials(qkv, gram_parts, sumsq_parts, N, H, stride_b, stride_n, blocks_per_split,
                   HEAD_DIM: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, DOT: tl.constexpr,
                   PRECISION: tl.constexpr):
    row, split, splits = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
    b, head = (row // H).to(tl.int64), row % H  # int64: b * stride_b passes 2**31 at large B and N
    chan = tl.arange(0, D)
    q_cols = head * HEAD_DIM + chan  # this head's q columns; k's are C further, v's 2C
    k_cols = H * HEAD_DIM + q_cols
    base = qkv + b * stride_b
    gram = tl.zeros((D, D), tl.float32)
    sumsq_q = tl.zeros((D,), tl.float32)
    sumsq_k = tl.zeros((D,), tl.float32)
    first = split * blocks_per_split
    for block in range(first, tl.minimum(first + blocks_per_split, tl.cdiv(N, BLOCK_N))):
        tok = block * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (tok < N)[:, None] & (chan < HEAD_DIM)[None, :]
        rows = base + tok.to(tl.int64)[:, None] * stride_n
        q = tl.load(rows + q_cols[None, :], mask=mask, other=0.0)  # (BLOCK_N, D)
        k = tl.load(rows + k_cols[None, :], mask=mask, other=0.0)
        gram = tl.dot(tl.trans(q.to(DOT)), k.to(DOT), gram, input_precision=PRECISION)  # (D, D) += q^T k
        q, k = q.to(tl.float32), k.to(tl.float32)
        sumsq_q += tl.sum(q * q, axis=0)
        sumsq_k += tl.sum(k * k, axis=0)
    part = row * splits + split
    tl.store(gram_parts + part * D * D + chan[:, None] * D + chan[None, :], gram)
    tl.store(sumsq_parts + part * 2 * D + chan, sumsq_q)
    tl.store(sumsq_parts + part * 2 * D + D + chan, sumsq_k)


def _attention_map(gram_parts, sumsq_parts, temperature, attn, cosine, norms, H, splits,
                   HEAD_DIM: tl.constexpr, D: tl.constexpr):
    row = tl.program_id(0)
    chan = tl.arange(0, D)
    square = chan[:, None] * D + chan[None, :]
    gram = tl.zeros((D, D), tl.float32)
    sumsq_q = tl.zeros((D,), tl.float32)
    sumsq_k = tl.zeros((D,), tl.float32)
    for split in range(0, splits):  # in order: the same sums on every run
        part = row * splits + split
        gram += tl.load(gram_parts + part * D * D + square)
        sumsq_q += tl.load(sumsq_parts + part * 2 * D + chan)
        sumsq_k += tl.load(sumsq_parts + part * 2 * D + D + chan)
    norm_q, norm_k = tl.sqrt(sumsq_q), tl.sqrt(sumsq_k)
    cos = gram / (tl.maximum(norm_q, 1e-12)[:, None] * tl.maximum(norm_k, 1e-12)[None, :])  # (D, D)
    logits = cos * tl.load(temperature + row % H).to(tl.float32)
    logits = tl.where((chan < HEAD_DIM)[None, :], logits, float('-inf'))  # padded key channels get no weight
    p = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    a = tl.where((chan < HEAD_DIM)[:, None], p / tl.sum(p, axis=1)[:, None], 0.0)  # padded query rows: 0
    tl.store(attn + row * D * D + square, a)
    tl.store(cosine + row * D * D + square, cos)
    tl.store(norms + row * 2 * D + chan, norm_q)
    tl.store(norms + row * 2 * D + D + chan, norm_k)


def _apply_map(qkv, attn, out, N, H, stride_b, stride_n, out_stride_b, out_stride_n, blocks_per_split,
               HEAD_DIM: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    row, split = tl.program_id(0), tl.program_id(1)
    b, head = (row // H).to(tl.int64), row % H
    chan = tl.arange(0, D)
    cols = head * HEAD_DIM + chan
    # attn^T, (D, D), read transposed
    attn_t = tl.load(attn + row * D * D + chan[None, :] * D + chan[:, None])
    first = split * blocks_per_split
    for block in range(first, tl.minimum(first + blocks_per_split, tl.cdiv(N, BLOCK_N))):
        tok = block * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (tok < N)[:, None] & (chan < HEAD_DIM)[None, :]
        v = tl.load(qkv + b * stride_b + tok.to(tl.int64)[:, None] * stride_n
                    + (2 * H * HEAD_DIM + cols)[None, :], mask=mask, other=0.0)  # (BLOCK_N, D)
        mixed = tl.dot(v.to(tl.float32), attn_t, input_precision=PRECISION)  # (BLOCK_N, D)
        tl.store(out + b * out_stride_b + tok.to(tl.int64)[:, None] * out_stride_n + cols[None, :],
                 mixed.to(out.dtype.element_ty), mask=mask)


def _grad_attn_partials(d_out, qkv, attn, d_qkv, d_attn_parts, N, H, stride_b, stride_n, g_stride_b, g_stride_n,
                        dq_stride_b, dq_stride_n, blocks_per_split, HEAD_DIM: tl.constexpr, D: tl.constexpr,
                        BLOCK_N: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr):
    row, split, splits = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
    b, head = (row // H).to(tl.int64), row % H
    chan = tl.arange(0, D)
    cols = head * HEAD_DIM + chan
    v_cols = 2 * H * HEAD_DIM + cols
    a = tl.load(attn + row * D * D + chan[:, None] * D + chan[None, :])  # (D, D)
    d_attn = tl.zeros((D, D), tl.float32)
    first = split * blocks_per_split
    for block in range(first, tl.minimum(first + blocks_per_split, tl.cdiv(N, BLOCK_N))):
        tok = (block * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        mask = (tok < N)[:, None] & (chan < HEAD_DIM)[None, :]
        g = tl.load(d_out + b * g_stride_b + tok[:, None] * g_stride_n + cols[None, :], mask=mask, other=0.0)
        v = tl.load(qkv + b * stride_b + tok[:, None] * stride_n + v_cols[None, :], mask=mask, other=0.0)
        d_attn = tl.dot(tl.trans(g.to(DOT)), v.to(DOT), d_attn, input_precision=PRECISION)  # (D, D) += d_out^T v
        d_v = tl.dot(g.to(tl.float32), a, input_precision=PRECISION)  # (BLOCK_N, D) = d_out @ attn
        tl.store(d_qkv + b * dq_stride_b + tok[:, None] * dq_stride_n + v_cols[None, :],
                 d_v.to(d_qkv.dtype.element_ty), mask=mask)
    tl.store(d_attn_parts + (row * splits + split) * D * D + chan[:, None] * D + chan[None, :], d_attn)


def _grad_cosine(d_attn_parts, attn, cosine, norms, temperature, d_cosine, coefs, d_temperature_rows, H, splits,
                 D: tl.constexpr):
    row = tl.program_id(0)
    chan = tl.arange(0, D)
    square = chan[:, None] * D + chan[None, :]
    d_attn = tl.zeros((D, D), tl.float32)
    for split in range(0, splits):
        d_attn += tl.load(d_attn_parts + (row * splits + split) * D * D + square)
    a = tl.load(attn + row * D * D + square)
    cos = tl.load(cosine + row * D * D + square)
    norm_q = tl.load(norms + row * 2 * D + chan)
    norm_k = tl.load(norms + row * 2 * D + D + chan)
    d_logits = a * (d_attn - tl.sum(d_attn * a, axis=1)[:, None])  # through the softmax, row by row
    tl.store(d_temperature_rows + row, tl.sum(tl.sum(d_logits * cos, axis=1), axis=0))
    d_cos = d_logits * tl.load(temperature + row % H).to(tl.float32)
    # cos = gram / (|q| |k|): besides gram's own term, |q_i| pulls with -sum_j d_cos_ij cos_ij / |q_i|^2 along q_i
    # (nothing where the norm is clamped, as in F.normalize), and |k_j| likewise along k_j
    pull = d_cos * cos
    clamped_q, clamped_k = tl.maximum(norm_q, 1e-12), tl.maximum(norm_k, 1e-12)
    coef_q = tl.where(norm_q > 1e-12, -tl.sum(pull, axis=1) / (clamped_q * clamped_q), 0.0)
    coef_k = tl.where(norm_k > 1e-12, -tl.sum(pull, axis=0) / (clamped_k * clamped_k), 0.0)
    tl.store(d_cosine + row * D * D + square, d_cos)
    tl.store(coefs + row * 2 * D + chan, coef_q)
    tl.store(coefs + row * 2 * D + D + chan, coef_k)


def _grad_qk(qkv, d_cosine, norms, coefs, d_qkv, N, H, stride_b, stride_n, dq_stride_b, dq_stride_n, blocks_per_split,
             HEAD_DIM: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    row, split = tl.program_id(0), tl.program_id(1)
    b, head = (row // H).to(tl.int64), row % H
    chan = tl.arange(0, D)
    q_cols = head * HEAD_DIM + chan
    k_cols = H * HEAD_DIM + q_cols
    d_cos = tl.load(d_cosine + row * D * D + chan[:, None] * D + chan[None, :])  # (D, D)
    d_cos_t = tl.load(d_cosine + row * D * D + chan[None, :] * D + chan[:, None])
    inv_q = 1.0 / tl.maximum(tl.load(norms + row * 2 * D + chan), 1e-12)  # (D,)
    inv_k = 1.0 / tl.maximum(tl.load(norms + row * 2 * D + D + chan), 1e-12)
    coef_q = tl.load(coefs + row * 2 * D + chan)
    coef_k = tl.load(coefs + row * 2 * D + D + chan)
    first = split * blocks_per_split
    for block in range(first, tl.minimum(first + blocks_per_split, tl.cdiv(N, BLOCK_N))):
        tok = (block * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        mask = (tok < N)[:, None] & (chan < HEAD_DIM)[None, :]
        rows = qkv + b * stride_b + tok[:, None] * stride_n
        q = tl.load(rows + q_cols[None, :], mask=mask, other=0.0).to(tl.float32)  # (BLOCK_N, D)
        k = tl.load(rows + k_cols[None, :], mask=mask, other=0.0).to(tl.float32)
        # IEEE whatever PRECISION says: the two terms cancel where few tokens carry a channel (exactly, for one
        # token), and TF32's 10 bits of the normalised tokens would leave the difference as error
        d_q = tl.dot(k * inv_k[None, :], d_cos_t, input_precision='ieee') * inv_q[None, :] + q * coef_q[None, :]
        d_k = tl.dot(q * inv_q[None, :], d_cos, input_precision='ieee') * inv_k[None, :] + k * coef_k[None, :]
        grad_rows = d_qkv + b * dq_stride_b + tok[:, None] * dq_stride_n
        tl.store(grad_rows + q_cols[None, :], d_q.to(d_qkv.dtype.element_ty), mask=mask)
        tl.store(grad_rows + k_cols[None, :], d_k.to(d_qkv.dtype.element_ty), mask=mask)


@functools.cache
def _kernels() -> SimpleNamespace:
    jit = _triton.jit
    return SimpleNamespace(**{f.__name__.lstrip('_'): jit(f) for f in (
        _gram_partials, _attention_map, _apply_map, _grad_attn_partials, _grad_cosine, _grad_qk)})


# ---- launch geometry ----

def _padded(head_dim: int) -> int:
    """d rounded up to a power of two, at least 16 (tl.dot's smallest operand side)."""
    return max(16, 1 << (head_dim - 1).bit_length())


def _geometry(qkv: Tensor, num_heads: int) -> SimpleNamespace:
    B, N, C3 = qkv.shape
    d = C3 // 3 // num_heads
    D = _padded(d)
    block_n, warps = (128, 4) if D <= 32 else (64, 8)
    blocks = max(1, -(-N // block_n))
    rows = B * num_heads
    # enough programs to fill the GPU (a few per multiprocessor) with no more partial sums than needed
    programs = 4 * torch.cuda.get_device_properties(qkv.device).multi_processor_count if qkv.is_cuda else 8
    splits = max(1, min(blocks, -(-programs // rows), _MAX_SPLITS))
    per_split = -(-blocks // splits)
    splits = -(-blocks // per_split)  # no split left without tokens
    # the interpreter multiplies bfloat16 bit patterns as integers: it takes the same values in float32
    dot = tl.float32 if interpreting() else getattr(tl, str(qkv.dtype).removeprefix('torch.'))
    return SimpleNamespace(B=B, N=N, h=num_heads, d=d, D=D, rows=rows, splits=splits, kernels=_kernels(),
                           dot=dot, warps=warps,
                           tiles=dict(HEAD_DIM=d, D=D, BLOCK_N=block_n, blocks_per_split=per_split, num_warps=warps,
                                      PRECISION='ieee' if qkv.dtype == torch.float32 else 'tf32'))


def _on_device(t: Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _rows_contiguous(t: Tensor) -> Tensor:
    """`t` with unit stride along its last axis (the kernels' assumption), copied only where it is not."""
    return t if t.stride(-1) == 1 else t.contiguous()


# ---- the operators ----

@torch.library.custom_op('xcit::xca_fused', mutates_args=())
def _xca_fused(qkv: Tensor, temperature: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out (B, N, C), attn (B, h, D, D), cosine (B, h, D, D), norms (B, h, 2, D)); the last three, float32,
    are what the backward pass reads."""
    torch._check(qkv.dtype in DTYPES, lambda: f'the fused XCA kernels take {DTYPES}, not {qkv.dtype}')
    qkv = _rows_contiguous(qkv)
    g = _geometry(qkv, num_heads)
    f32 = dict(device=qkv.device, dtype=torch.float32)
    gram_parts = torch.empty(g.rows, g.splits, g.D, g.D, **f32)
    sumsq_parts = torch.empty(g.rows, g.splits, 2, g.D, **f32)
    attn = torch.empty(g.B, g.h, g.D, g.D, **f32)
    cosine = torch.empty(g.B, g.h, g.D, g.D, **f32)
    norms = torch.empty(g.B, g.h, 2, g.D, **f32)
    out = qkv.new_empty(g.B, g.N, g.h * g.d)
    with _on_device(qkv):
        g.kernels.gram_partials[(g.rows, g.splits)](
            qkv, gram_parts, sumsq_parts, g.N, g.h, qkv.stride(0), qkv.stride(1), DOT=g.dot, **g.tiles)
        g.kernels.attention_map[(g.rows,)](
            gram_parts, sumsq_parts, temperature.reshape(-1).contiguous(), attn, cosine, norms, g.h, g.splits,
            HEAD_DIM=g.d, D=g.D, num_warps=g.warps)
        g.kernels.apply_map[(g.rows, g.splits)](
            qkv, attn, out, g.N, g.h, qkv.stride(0), qkv.stride(1), out.stride(0), out.stride(1), **g.tiles)
    return out, attn, cosine, norms


@_xca_fused.register_fake
def _(qkv, temperature, num_heads):
    B, N, C3 = qkv.shape
    C = C3 // 3
    D = _padded(C // num_heads)
    maps = qkv.new_empty(B, num_heads, D, D, dtype=torch.float32)
    return qkv.new_empty(B, N, C), maps, torch.empty_like(maps), qkv.new_empty(B, num_heads, 2, D, dtype=torch.float32)


@torch.library.custom_op('xcit::xca_fused_backward', mutates_args=())
def _xca_fused_backward(d_out: Tensor, qkv: Tensor, temperature: Tensor, attn: Tensor, cosine: Tensor, norms: Tensor,
                        num_heads: int) -> tuple[Tensor, Tensor]:
    """(d_qkv (B, N, 3C), d_temperature shaped like the temperature)."""
    qkv = _rows_contiguous(qkv)
    d_out = _rows_contiguous(d_out.to(qkv.dtype))
    g = _geometry(qkv, num_heads)
    f32 = dict(device=qkv.device, dtype=torch.float32)
    d_attn_parts = torch.empty(g.rows, g.splits, g.D, g.D, **f32)
    d_cosine = torch.empty(g.rows, g.D, g.D, **f32)
    coefs = torch.empty(g.rows, 2, g.D, **f32)
    d_temperature_rows = torch.empty(g.rows, **f32)
    d_qkv = torch.empty_like(qkv, memory_format=torch.contiguous_format)
    with _on_device(qkv):
        g.kernels.grad_attn_partials[(g.rows, g.splits)](
            d_out, qkv, attn, d_qkv, d_attn_parts, g.N, g.h, qkv.stride(0), qkv.stride(1), d_out.stride(0),
            d_out.stride(1), d_qkv.stride(0), d_qkv.stride(1), DOT=g.dot, **g.tiles)
        g.kernels.grad_cosine[(g.rows,)](
            d_attn_parts, attn, cosine, norms, temperature.reshape(-1).contiguous(), d_cosine, coefs,
            d_temperature_rows, g.h, g.splits, D=g.D, num_warps=g.warps)
        g.kernels.grad_qk[(g.rows, g.splits)](
            qkv, d_cosine, norms, coefs, d_qkv, g.N, g.h, qkv.stride(0), qkv.stride(1), d_qkv.stride(0),
            d_qkv.stride(1), **g.tiles)
    d_temperature = d_temperature_rows.view(g.B, g.h).sum(dim=0)  # over the batch, in a fixed order
    return d_qkv, d_temperature.view(temperature.shape).to(temperature.dtype)


@_xca_fused_backward.register_fake
def _(d_out, qkv, temperature, attn, cosine, norms, num_heads):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format), torch.empty_like(temperature)


def _setup_context(ctx, inputs, output):
    qkv, temperature, num_heads = inputs
    _, attn, cosine, norms = output
    ctx.mark_non_differentiable(attn, cosine, norms)
    ctx.save_for_backward(qkv, temperature, attn, cosine, norms)
    ctx.num_heads = num_heads


def _backward(ctx, d_out, *_):
    qkv, temperature, attn, cosine, norms = ctx.saved_tensors
    d_qkv, d_temperature = _xca_fused_backward(d_out, qkv, temperature, attn, cosine, norms, ctx.num_heads)
    return d_qkv, d_temperature, None


_xca_fused.register_autograd(_backward, setup_context=_setup_context)


def xca_fused(qkv: Tensor, temperature: Tensor, num_heads: int) -> Tensor:
    """XCA's core (`torch.ops.xcit.xca_fused`) on the fused qkv (B, N, 3C) with the (h, 1, 1) temperature:
    the mixed values (B, N, C), differentiable in both."""
    return _xca_fused(qkv, temperature, num_heads)[0]
