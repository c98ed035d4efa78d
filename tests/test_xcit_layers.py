"""Each XCiT layer against the paper's maths written out plainly."""
import math

import pytest
import torch
import torch.nn.functional as F

from xcit.models.xcit import (ClassAttention, ClassAttentionBlock, ConvPatchEmbed, PositionalEncodingFourier, XCA,
                              l2_normalize_tokens)
from conftest import perturb_


def test_fourier_encoding_matches_its_definition():
    torch.manual_seed(0)
    pe = PositionalEncodingFourier(dim=16)
    H, W = 3, 5
    expected = torch.empty(64, H, W)
    for i in range(H):
        for j in range(W):
            y = 2 * math.pi * (i + 1) / (H + 1e-6)
            x = 2 * math.pi * (j + 1) / (W + 1e-6)
            for k in range(32):
                freq = 10000 ** (2 * (k // 2) / 32)
                trig = math.sin if k % 2 == 0 else math.cos
                expected[k, i, j] = trig(y / freq)  # y-half first
                expected[32 + k, i, j] = trig(x / freq)
    projected = F.conv2d(expected[None], pe.token_projection.weight, pe.token_projection.bias)
    assert torch.allclose(pe(H, W), projected.flatten(2).transpose(1, 2), atol=1e-5)


def test_fourier_encoding_does_not_depend_on_parameter_dtype():
    pe = PositionalEncodingFourier(dim=8)
    ref = pe(40, 40)
    pe.to(torch.bfloat16)
    assert pe(40, 40).dtype == torch.bfloat16
    assert torch.allclose(pe(40, 40).float(), ref, atol=0.05)


def test_xca_matches_per_head_formula():
    torch.manual_seed(0)
    dim, heads, B, N = 24, 3, 2, 11
    xca = perturb_(XCA(dim, num_heads=heads), scale=0.3).eval()
    x = torch.randn(B, N, dim)
    q, k, v = xca.qkv(x).split(dim, dim=-1)
    d = dim // heads
    out = torch.empty(B, N, dim)
    for b in range(B):
        for h in range(heads):
            cols = slice(h * d, (h + 1) * d)
            qh, kh, vh = q[b, :, cols], k[b, :, cols], v[b, :, cols]  # (N, d)
            qh = qh / qh.norm(dim=0, keepdim=True)  # unit norm along tokens
            kh = kh / kh.norm(dim=0, keepdim=True)
            attn = torch.softmax(qh.T @ kh * xca.temperature[h], dim=-1)  # (d, d), no 1/sqrt(d)
            out[b, :, cols] = (attn @ vh.T).T
    assert torch.allclose(xca(x), xca.proj(out), atol=1e-5)


def test_xca_cost_has_no_token_by_token_map():
    xca = XCA(32, num_heads=4)
    attn, v = xca.attention_map(torch.randn(1, 4096, 32))
    assert attn.shape == (1, 4, 8, 8) and v.shape == (1, 4, 8, 4096)


def test_l2_norm_survives_float16_overflow():
    t = torch.full((1, 1, 2, 16384), 300.0, dtype=torch.float16)  # sum of squares ~1.5e9 > fp16 max
    out = l2_normalize_tokens(t)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert torch.allclose(out.float().norm(dim=-1), torch.ones(1, 1, 2), atol=1e-2)
    tiny = torch.zeros(1, 4, dtype=torch.float16)
    assert torch.equal(l2_normalize_tokens(tiny), tiny)  # eps clamps the norm: zeros stay zeros, not NaN


@pytest.mark.parametrize('qkv_bias', [True, False])
@pytest.mark.parametrize('impl', ['fast', 'reference'], ids=['folded', 'reference'])
def test_class_attention_equals_the_fused_qkv_formulation(impl, qkv_bias):
    """The class token's query against every token's keys and values from the fused weights, as released: the
    same output and gradients whether the keys and values are computed (reference) or folded into the query
    and the weighted mean of the tokens (the fast path)."""
    torch.manual_seed(0)
    dim, heads, B, N = 32, 4, 2, 9
    ca = perturb_(ClassAttention(dim, num_heads=heads, qkv_bias=qkv_bias, impl=impl), scale=0.3).train()
    x = torch.randn(B, N, dim, requires_grad=True)

    def official():
        qkv = F.linear(x, ca.qkv.weight, ca.qkv.bias).reshape(B, N, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q[:, :, :1] * k).sum(-1) * (dim // heads) ** -0.5).softmax(-1)  # (B, h, N)
        cls = (attn.unsqueeze(2) @ v).transpose(1, 2).reshape(B, 1, dim)
        return ca.proj(cls)

    outputs, grads = [], []
    for forward in (ca, lambda _: official()):
        ca.zero_grad()
        x.grad = None
        out = forward(x)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outputs.append(out.detach())
        grads.append([x.grad.clone()] + [p.grad.clone() for p in ca.parameters()])
    assert (outputs[0] - outputs[1]).abs().max() < 1e-5
    for got, expected in zip(*grads):
        assert (got - expected).abs().max() < 1e-5 * max(1.0, expected.abs().max().item())


@pytest.mark.parametrize('tokens_norm', [False, True])
def test_class_attention_block_matches_the_official_formulation(tokens_norm):
    """The released block as written there: residuals over the whole sequence, an attention branch that hands
    back norm1 of the patches, norm2 on every token (tokens_norm) or the class token only, and an MLP branch
    that returns the patches unchanged, so that its residual doubles them."""
    torch.manual_seed(0)
    block = perturb_(ClassAttentionBlock(16, num_heads=2, tokens_norm=tokens_norm), scale=0.3).eval()
    inputs = torch.randn(2, 7, 16)
    n1 = block.norm1(inputs)
    x = inputs + block.gamma1 * torch.cat([block.attn(n1), n1[:, 1:]], dim=1)
    x = block.norm2(x) if tokens_norm else torch.cat([block.norm2(x[:, :1]), x[:, 1:]], dim=1)
    expected = x + torch.cat([block.gamma2 * block.mlp(x[:, :1]), x[:, 1:]], dim=1)
    assert torch.allclose(block(inputs), expected, atol=1e-6)


@pytest.mark.parametrize('patch,widths', [(16, [16, 32, 64, 128]), (8, [32, 64, 128])])
def test_conv_stem_layout(patch, widths):
    stem = ConvPatchEmbed(patch, 3, 128)
    convs = [m for m in stem.proj if isinstance(m, torch.nn.Sequential)]
    assert [c[0].out_channels for c in convs] == widths
    assert all(c[0].bias is None and c[0].stride == (2, 2) for c in convs)
    assert [type(m).__name__ for m in stem.proj][-1] == 'Sequential'  # no activation after the last unit
    tokens, grid = stem(torch.randn(1, 3, 100, 37))
    assert grid == (math.ceil(100 / patch), math.ceil(37 / patch)) and tokens.shape == (1, grid[0] * grid[1], 128)


def test_layer_scale_residual_has_addcmuls_gradients():
    """The residual with LayerScale, through its own backward, against autograd through x + gamma * branch."""
    from xcit.models.layers import layer_scale_residual
    torch.manual_seed(0)
    x, gamma, branch = torch.randn(2, 5, 8), torch.randn(8), torch.randn(2, 5, 8)
    grad = torch.randn(2, 5, 8)
    results = []
    for fn in (layer_scale_residual, lambda a, g, b: a + g * b):
        leaves = [t.clone().requires_grad_() for t in (x, gamma, branch)]
        out = fn(*leaves)
        results.append([out.detach(), *torch.autograd.grad(out, leaves, grad)])
    for fast, ref in zip(*results):
        assert torch.allclose(fast, ref, atol=1e-6)
    frozen = gamma.clone()  # a gamma without a gradient gets none, and the branch's is still right
    b = branch.clone().requires_grad_()
    d_branch, = torch.autograd.grad(layer_scale_residual(x, frozen, b), b, grad)
    assert torch.allclose(d_branch, grad * gamma)


def test_activations_see_channels_last_maps_as_contiguous_tensors():
    """An elementwise op on a channels-last map gets its contiguous NHWC view (PyTorch gives contiguous
    tensors its faster GELU kernels) and hands back the op's values in the map's own layout."""
    from xcit.models.layers import on_contiguous_view
    torch.manual_seed(0)
    x = torch.randn(2, 6, 5, 4).contiguous(memory_format=torch.channels_last)
    seen = []

    def gelu(t):
        seen.append(t.is_contiguous())
        return F.gelu(t)
    y = on_contiguous_view(gelu, x)
    assert seen == [True] and y.shape == x.shape and y.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(y, F.gelu(x.contiguous()), atol=1e-6)
    plain = torch.randn(2, 6, 5, 4)  # a contiguous map is passed as it is
    assert torch.equal(on_contiguous_view(gelu, plain), F.gelu(plain)) and seen == [True, True]


def test_lpi_on_tokens_matches_its_convolutions_on_an_image():
    """LPI takes (B, N, C) tokens as a channels-last view: outputs and gradients equal the official
    conv -> GELU -> BatchNorm -> conv on the contiguous (B, C, H, W) image of the same tokens."""
    from xcit.models.xcit import LPI
    torch.manual_seed(0)
    lpi = perturb_(LPI(8)).train()
    B, H, W = 2, 3, 5
    tokens = torch.randn(B, H * W, 8, requires_grad=True)
    grad = torch.randn(B, H * W, 8)
    out = lpi(tokens, H, W)
    d_tokens, *d_params = torch.autograd.grad(out, [tokens, *lpi.parameters()], grad)
    image = tokens.detach().transpose(1, 2).reshape(B, 8, H, W).contiguous().requires_grad_()
    reference = lpi.conv2(lpi.bn(F.gelu(lpi.conv1(image))))  # (B, C, H, W)
    d_image, *d_params_ref = torch.autograd.grad(reference, [image, *lpi.parameters()],
                                                 grad.transpose(1, 2).reshape(B, 8, H, W))
    assert torch.allclose(out, reference.flatten(2).transpose(1, 2), atol=1e-5)
    assert torch.allclose(d_tokens, d_image.flatten(2).transpose(1, 2), atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(d_params, d_params_ref))
