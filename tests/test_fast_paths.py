"""Every fast path against the reference maths it replaces: equal within 1e-5 in float32, finite in bf16."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import xcit
from conftest import perturb_
from xcit.models import layers
from xcit.models.xcit import XCA, xca_reference


@pytest.mark.parametrize('gelu', [False, True])
@pytest.mark.parametrize('bias', [False, True])
def test_onednn_linear_matches_f_linear_forward_and_backward(gelu, bias):
    torch.manual_seed(0)
    x = torch.randn(3, 37, 64, requires_grad=True)
    w = (torch.randn(48, 64) * 0.1).requires_grad_()
    b = torch.randn(48).requires_grad_() if bias else None
    grad = torch.randn(3, 37, 48)

    def run(fn):
        for t in (x, w, b):
            if t is not None:
                t.grad = None
        out = fn(x, w, b)
        out.backward(grad)
        return out.detach(), [t.grad.clone() for t in (x, w, b) if t is not None]

    fast_out, fast_grads = run(lambda x, w, b: layers.linear(x, w, b, gelu=gelu))
    ref_out, ref_grads = run(lambda x, w, b: F.gelu(F.linear(x, w, b)) if gelu else F.linear(x, w, b))
    assert torch.allclose(fast_out, ref_out, atol=1e-5)
    for a, r in zip(fast_grads, ref_grads):
        assert torch.allclose(a, r, atol=1e-4, rtol=1e-5)
    with torch.no_grad():  # inference: bias and GELU fused into the GEMM
        assert torch.allclose(layers.linear(x, w, b, gelu=gelu), ref_out, atol=1e-5)


def test_onednn_linear_is_used_and_can_be_turned_off(monkeypatch):
    if not layers.ONEDNN_LINEAR:
        pytest.skip('this PyTorch build has no oneDNN linear')
    calls = []
    monkeypatch.setattr(layers, '_onednn', lambda *a, **k: calls.append(1) or F.linear(*a[:3]))
    layers.linear(torch.randn(2, 4), torch.randn(3, 4))
    assert calls
    calls.clear()
    with torch.autocast('cpu', dtype=torch.bfloat16):  # autocast keeps PyTorch's own matmul
        assert layers.linear(torch.randn(2, 4), torch.randn(3, 4)).dtype == torch.bfloat16
    assert not calls
    monkeypatch.setenv('XCIT_ONEDNN_LINEAR', '0')
    assert not layers._onednn_linear_works()


@pytest.mark.parametrize('impl', ['matmul', 'sdpa'])
@pytest.mark.parametrize('tokens', [7, 196, 785])
def test_xca_fast_path_matches_the_official_formulation(tokens, impl):
    torch.manual_seed(0)
    xca = perturb_(XCA(96, num_heads=4, impl=impl), scale=0.2).eval()
    x = torch.randn(2, tokens, 96)
    with torch.no_grad():
        assert (xca(x) - xca_reference(xca, x)).abs().max() < 1e-5
        with torch.autocast('cpu', dtype=torch.bfloat16):
            assert torch.isfinite(xca(x * 100)).all()


def test_xca_impl_is_checked_and_reaches_every_block():
    with pytest.raises(ValueError, match='xca_impl'):
        XCA(64, impl='flash')
    model = xcit.create_model('xcit_nano_12_p16_224', depth=3, xca_impl='sdpa')
    assert [block.attn.impl for block in model.blocks] == ['sdpa'] * 3


@pytest.mark.parametrize('impl', ['matmul', 'sdpa'])
def test_xca_trains_like_the_reference(impl):
    torch.manual_seed(0)
    xca = perturb_(XCA(64, num_heads=2, impl=impl), scale=0.2)
    x = torch.randn(2, 50, 64)
    grads = []
    for fn in (xca, lambda t: xca_reference(xca, t)):
        xca.zero_grad()
        fn(x).square().sum().backward()
        grads.append([p.grad.clone() for p in xca.parameters()])
    for fast, ref in zip(*grads):
        assert torch.allclose(fast, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('name', ['xcit_nano_12_p16_224', 'xcit_tiny_12_p8_224'])
def test_whole_model_fast_paths_match_plain_pytorch(name, monkeypatch):
    """The model with every fast path (oneDNN GEMMs, channel-major XCA) against the same weights computed plainly."""
    torch.manual_seed(0)
    model = perturb_(xcit.create_model(name)).eval()
    x = torch.randn(2, 3, 112, 96)
    with torch.no_grad():
        fast = model(x)
    monkeypatch.setattr(layers, 'ONEDNN_LINEAR', False)
    monkeypatch.setattr(XCA, 'forward', lambda self, t: xca_reference(self, t))
    with torch.no_grad():
        plain = model(x)
    assert (fast - plain).abs().max() < 1e-5 * max(1.0, plain.abs().max().item())


def test_fast_paths_stay_finite_in_bf16():
    torch.manual_seed(0)
    model = perturb_(xcit.create_model('xcit_nano_12_p8_224')).eval()
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        reference = model(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            low = model(x)
    assert torch.isfinite(low).all() and ((low.float() - reference).norm() / reference.norm()) < 2e-2


@pytest.mark.slow
def test_optimize_for_inference_compiles_without_graph_breaks_and_matches():
    torch.manual_seed(0)
    model = perturb_(xcit.create_model('xcit_nano_12_p16_224')).eval()
    x = torch.randn(2, 3, 96, 80)
    with torch.no_grad():
        reference = model(x)
    optimized = xcit.optimize_for_inference(model, compile=False)
    assert isinstance(optimized.patch_embed.proj[0][1], nn.Identity)  # BatchNorm folded into the stem conv
    with torch.no_grad():
        assert (optimized(x) - reference).abs().max() < 1e-5
    compiled = xcit.models.compile_static(optimized, fullgraph=True)  # a graph break would raise here
    with torch.no_grad():
        assert (compiled(x) - reference).abs().max() < 1e-5


@pytest.mark.slow
def test_compiled_training_survives_new_shapes():
    """A second resolution and batch size: where dynamic-shape inductor fails on XCiT's channels_last views."""
    torch.manual_seed(0)
    model = xcit.create_model('xcit_nano_12_p8_224', depth=2, num_classes=4)
    compiled = xcit.models.compile_static(model)
    for batch, height, width in ((2, 48, 48), (3, 64, 40), (2, 40, 56)):
        x = torch.randn(batch, 3, height, width)
        compiled(x).square().sum().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        model(x).square().sum().backward()
        for compiled_grad, p in zip(grads, model.parameters()):
            assert torch.allclose(compiled_grad, p.grad, rtol=1e-3, atol=1e-5)
        model.zero_grad()


def test_folding_covers_cvt_projections():
    model = xcit.create_model('cvt_13_224').eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        reference = model(x)
        assert xcit.models.fold_batchnorm(model) == 39  # one per q/k/v projection of 13 blocks
        assert (model(x) - reference).abs().max() < 1e-5


def test_stem_inference_path_matches_its_modules():
    """Eval without gradients folds BN into the convs and runs GELU in place; with them, the modules run."""
    torch.manual_seed(0)
    model = perturb_(xcit.create_model('xcit_tiny_12_p16_224')).eval()
    x = torch.randn(2, 3, 80, 72)
    with torch.no_grad():
        fast, grid = model.patch_embed(x)
    with torch.enable_grad():
        reference, _ = model.patch_embed(x)
    assert grid == (5, 5) and (fast - reference).abs().max() < 1e-5
    xcit.models.fold_batchnorm(model)  # already folded: the inference path runs the plain convs
    with torch.no_grad():
        assert (model.patch_embed(x)[0] - reference).abs().max() < 1e-5


def test_training_fast_paths_give_the_reference_gradients(monkeypatch):
    """oneDNN GEMMs, the MLP that recomputes GELU, channel-major XCA: the same gradients as plain PyTorch."""
    torch.manual_seed(0)
    model = perturb_(xcit.create_model('xcit_nano_12_p16_224', num_classes=10))
    model.eval()  # fixed BatchNorm statistics, so both passes compute the same function
    x, target = torch.randn(2, 3, 64, 48), torch.tensor([1, 7])

    def grads():
        model.zero_grad()
        F.cross_entropy(model(x), target).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    fast = grads()
    monkeypatch.setattr(layers, 'ONEDNN_LINEAR', False)
    monkeypatch.setattr(XCA, 'forward', lambda self, t: xca_reference(self, t))
    plain = grads()
    for name in plain:
        scale = max(plain[name].abs().max().item(), 1e-3)
        assert (fast[name] - plain[name]).abs().max() / scale < 1e-4, name
