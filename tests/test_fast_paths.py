"""Every fast path against the reference maths it replaces (equal within 1e-5 in float32, finite in bf16),
and which path a model takes: chosen when it is built, shown by print(model), switched by set_fast_path."""
import copy
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import xcit
from conftest import perturb_
from xcit.models import get_fast_path, layers, set_fast_path
from xcit.models.xcit import XCA, xca_reference

needs_onednn = pytest.mark.skipif(not layers._onednn_linear_works(), reason='this PyTorch build has no oneDNN linear')


@needs_onednn
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

    fast_out, fast_grads = run(lambda x, w, b: layers.linear(x, w, b, gelu=gelu, impl='onednn'))
    ref_out, ref_grads = run(lambda x, w, b: F.gelu(F.linear(x, w, b)) if gelu else F.linear(x, w, b))
    assert torch.allclose(fast_out, ref_out, atol=1e-5)
    for a, r in zip(fast_grads, ref_grads):
        assert torch.allclose(a, r, atol=1e-4, rtol=1e-5)
    with torch.no_grad():  # inference: bias and GELU fused into the GEMM
        assert torch.allclose(layers.linear(x, w, b, gelu=gelu, impl='onednn'), ref_out, atol=1e-5)


@needs_onednn
@pytest.mark.parametrize('train', [False, True])
def test_fused_mlp_matches_its_modules(train):
    """The MLP as one oneDNN op (training: GELU recomputed in the backward pass) or with GELU in fc1's GEMM."""
    torch.manual_seed(0)
    mlp = perturb_(layers.Mlp(32, 96), scale=0.2)
    x = torch.randn(2, 11, 32, requires_grad=train)
    reference = mlp.fc2(F.gelu(F.linear(x, mlp.fc1.weight, mlp.fc1.bias)))
    with torch.set_grad_enabled(train):
        out = mlp(x)
    assert torch.allclose(out, reference, atol=1e-5)
    if train:
        grads = torch.autograd.grad(out.square().sum(), [x, *mlp.parameters()])
        expected = torch.autograd.grad(reference.square().sum(), [x, *mlp.parameters()])
        assert all(torch.allclose(a, b, atol=1e-4, rtol=1e-4) for a, b in zip(grads, expected))


def _count_onednn_calls(monkeypatch) -> list:
    calls = []
    original = layers._onednn
    monkeypatch.setattr(layers, '_onednn', lambda *a: calls.append(1) or original(*a))
    return calls


@needs_onednn
def test_the_path_is_chosen_at_build_time_shown_and_switched_for_the_whole_model(monkeypatch):
    model = xcit.create_model('xcit_nano_12_p16_224', depth=2).eval()
    assert get_fast_path(model) == 'onednn' and 'impl=onednn' in repr(model)
    assert all(m.impl == 'onednn' for m in model.modules() if isinstance(m, layers.Linear))
    calls = _count_onednn_calls(monkeypatch)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        fast = model(x)
        assert calls
        calls.clear()
        set_fast_path(model, 'reference')
        assert get_fast_path(model) == 'reference' and 'impl=onednn' not in repr(model)
        assert 'impl=reference' in repr(model)
        plain = model(x)
    assert not calls and torch.allclose(fast, plain, atol=1e-5)
    model.reset_classifier(3)  # a new head joins the model's path
    assert get_fast_path(model) == 'reference'
    with pytest.raises(ValueError, match='fast path'):
        set_fast_path(model, 'mkl')
    monkeypatch.setattr(layers, '_onednn_linear_works', lambda: False)  # a build without the op
    with pytest.raises(ValueError, match='no working oneDNN linear'):
        set_fast_path(model, 'onednn')
    monkeypatch.undo()
    monkeypatch.setenv('XCIT_ONEDNN_LINEAR', '0')  # read when a model is built
    assert get_fast_path(xcit.create_model('cvt_13_224')) == 'reference'


@needs_onednn
def test_only_cpu_float32_outside_autocast_takes_the_onednn_op(monkeypatch):
    calls = _count_onednn_calls(monkeypatch)
    x, w = torch.randn(2, 4), torch.randn(3, 4)
    layers.linear(x, w, impl='onednn')
    assert len(calls) == 1
    with torch.autocast('cpu', dtype=torch.bfloat16):  # autocast keeps PyTorch's own lower-precision matmul
        assert layers.linear(x, w, impl='onednn').dtype == torch.bfloat16
    assert layers.linear(x.double(), w.double(), impl='onednn').dtype == torch.float64
    with torch.device('meta'):  # what the FLOP counters run on
        assert layers.linear(torch.empty(2, 4), torch.empty(3, 4), impl='onednn').shape == (2, 3)
    assert len(calls) == 1


def _fresh_python(code: str) -> list[str]:
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def test_importing_and_building_draw_nothing_extra_from_the_global_generator():
    """Importing xcit draws nothing from torch's global generator, and the oneDNN probe (at the first build) neither."""
    imported, built = _fresh_python(
        'import torch\n'
        'torch.manual_seed(0)\n'
        'import xcit\n'
        'print(torch.rand(3).tolist())\n'
        'torch.manual_seed(0)\n'
        "xcit.create_model('xcit_nano_12_p16_224', depth=1)  # the first build: the probe runs\n"
        'print(torch.rand(3).tolist())\n')
    assert imported == str(torch.rand(3, generator=torch.Generator().manual_seed(0)).tolist())
    layers._onednn_linear_works()  # probed here already: this build draws only the initialisation
    torch.manual_seed(0)
    xcit.create_model('xcit_nano_12_p16_224', depth=1)
    assert built == str(torch.rand(3).tolist())


def test_the_probe_runs_once_on_real_tensors_whatever_context_the_first_build_is_in():
    """A first build on the meta device under autocast (as FLOP counters build) still finds oneDNN if it works."""
    path, probes = _fresh_python(
        'import torch, xcit\n'
        'from xcit.models import layers\n'
        "with torch.device('meta'), torch.autocast('cpu', dtype=torch.bfloat16):\n"
        "    xcit.create_model('xcit_nano_12_p16_224', depth=1)\n"
        "xcit.create_model('cvt_13_224')\n"
        'print(layers.default_fast_path())\n'
        'print(layers._onednn_linear_works.cache_info().misses)\n')
    assert path == ('onednn' if layers._onednn_linear_works() else 'reference') and probes == '1'


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


def _plain_copy(model: nn.Module, monkeypatch) -> nn.Module:
    """The same weights computed plainly: F.linear everywhere, XCA in the official token-major formulation."""
    plain = set_fast_path(copy.deepcopy(model), 'reference')
    monkeypatch.setattr(XCA, 'forward', lambda self, t: xca_reference(self, t))
    return plain


@pytest.mark.parametrize('name', ['xcit_nano_12_p16_224', 'xcit_tiny_12_p8_224', 'cvt_13_224', 'fcvit_tiny'])
def test_whole_model_fast_paths_match_plain_pytorch(name, monkeypatch):
    """The model on its default path (oneDNN GEMMs, channel-major XCA) against the same weights computed plainly."""
    torch.manual_seed(0)
    model = perturb_(xcit.create_model(name)).eval()
    x = torch.randn(2, 3, 112, 96)
    with torch.no_grad():
        fast = model(x)
        plain = _plain_copy(model, monkeypatch)(x)
    assert (fast - plain).abs().max() < 1e-5 * max(1.0, plain.abs().max().item())


def test_training_fast_paths_give_the_reference_gradients(monkeypatch):
    """oneDNN GEMMs, the MLP that recomputes GELU, channel-major XCA: the same gradients as plain PyTorch."""
    torch.manual_seed(0)
    model = perturb_(xcit.create_model('xcit_nano_12_p16_224', num_classes=10))
    model.eval()  # fixed BatchNorm statistics, so both passes compute the same function
    x, target = torch.randn(2, 3, 64, 48), torch.tensor([1, 7])

    def grads(m):
        m.zero_grad()
        F.cross_entropy(m(x), target).backward()
        return {n: p.grad.clone() for n, p in m.named_parameters()}

    fast = grads(model)
    plain = grads(_plain_copy(model, monkeypatch))
    for name in plain:
        scale = max(plain[name].abs().max().item(), 1e-3)
        assert (fast[name] - plain[name]).abs().max() / scale < 1e-4, name


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


def test_folding_covers_the_xcit_stem_and_cvt_projections():
    for name, x, folds in (('cvt_13_224', torch.randn(1, 3, 64, 64), 39),  # one per q/k/v projection of 13 blocks
                           ('xcit_tiny_12_p16_224', torch.randn(2, 3, 80, 72), 4)):  # the 4 stem units
        torch.manual_seed(0)
        model = perturb_(xcit.create_model(name)).eval()
        with torch.no_grad():
            reference = model(x)
            assert xcit.models.fold_batchnorm(model) == folds
            assert (model(x) - reference).abs().max() < 1e-5 * max(1.0, reference.abs().max().item())


def test_folding_is_batchnorm_of_the_conv():
    """fold_conv_bn against PyTorch's own conv-BN fusion, with and without a conv bias."""
    torch.manual_seed(0)
    for conv in (nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.Conv2d(4, 6, 3, stride=2, padding=1)):
        bn = perturb_(nn.BatchNorm2d(6), scale=0.3).eval()
        conv.eval()
        weight, bias = layers.fold_conv_bn(conv, bn)
        expected = torch.nn.utils.fusion.fuse_conv_bn_eval(conv, bn)
        assert torch.allclose(weight, expected.weight, atol=1e-6) and torch.allclose(bias, expected.bias, atol=1e-6)


def test_stem_folds_batchnorm_only_in_inference_on_its_fast_path():
    """On 'onednn', in eval mode with nothing for autograd to record, no BatchNorm module runs (each is folded into
    its conv) and the tokens are those of the modules; in training, under autograd or on 'reference' they run."""
    torch.manual_seed(0)
    model = perturb_(xcit.create_model('xcit_tiny_12_p16_224')).eval()
    stem = model.patch_embed
    bn_calls = []
    for module in stem.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.register_forward_hook(lambda *_: bn_calls.append(1))
    x = torch.randn(2, 3, 80, 72)
    with torch.no_grad():
        stem.train()(x)  # training: BatchNorm uses (and updates) batch statistics
        assert len(bn_calls) == 4
        bn_calls.clear()
        folded, grid = stem.eval()(x)
    assert stem.impl == 'onednn' and not bn_calls and grid == (5, 5)
    with torch.enable_grad():
        modules, _ = stem(x)  # autograd records: the modules run
    assert len(bn_calls) == 4 and (folded - modules).abs().max() < 1e-5
    bn_calls.clear()
    set_fast_path(model, 'reference')
    with torch.no_grad():
        assert torch.allclose(stem(x)[0], modules, atol=1e-6)
    assert len(bn_calls) == 4
    set_fast_path(model, 'onednn')
    xcit.models.fold_batchnorm(model)  # folded for good: the fast path runs the plain convs
    with torch.no_grad():
        assert (stem(x)[0] - modules).abs().max() < 1e-5
