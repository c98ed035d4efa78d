"""The fused Triton XCA kernels against the official maths in float64: forward, the gradients of qkv and
temperature, and XCiT with xca_impl='triton' against the official maths.

On CPU the kernels run in Triton's interpreter, which TRITON_INTERPRET=1 switches on only if it is set
before Triton is imported (Triton builds its own library functions for one mode then): so
`test_cpu_cases_in_the_triton_interpreter` runs this file's CPU cases in a fresh process with it set, and
no other test file sees it. Where CUDA is present the same cases also run the compiled kernels here.
"""
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import xcit
from conftest import perturb_
from xcit.models import fastpath, set_fast_path, xca_triton
from xcit.models.xca_triton import xca_fused
from xcit.models.xcit import XCA

pytestmark = pytest.mark.skipif(not xca_triton.triton_available(), reason='Triton does not import here')

INTERPRETER = xca_triton.interpreting()  # this process is the one test_cpu_cases_in_the_triton_interpreter starts
BF16_ULP = 2.0 ** -7  # bfloat16's spacing at 1: its relative resolution


@pytest.fixture(params=['cpu', 'cuda'])
def device(request):
    """'cpu' runs in Triton's interpreter (in its own process), 'cuda' the compiled kernels."""
    if request.param == 'cpu' and not INTERPRETER:
        pytest.skip('runs in the interpreter process of test_cpu_cases_in_the_triton_interpreter')
    if request.param == 'cuda' and (INTERPRETER or not torch.cuda.is_available()):
        pytest.skip('needs CUDA, outside the interpreter')
    return torch.device(request.param)


def test_cpu_cases_in_the_triton_interpreter():
    if os.environ.get('TRITON_INTERPRET'):
        pytest.skip('TRITON_INTERPRET is set here: the CPU cases run in this process')
    env = dict(os.environ, TRITON_INTERPRET='1')
    result = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', __file__], env=env,
                            cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
    assert ' passed' in result.stdout and ' failed' not in result.stdout


def official_xca_core(qkv: torch.Tensor, temperature: torch.Tensor, num_heads: int):
    """XCA._reference between the qkv and proj linears, (B, N, 3C) -> (B, N, C); with the (B, h, d, d) cosines
    and logits."""
    B, N, C3 = qkv.shape
    C = C3 // 3
    q, k, v = qkv.reshape(B, N, 3, num_heads, C // num_heads).permute(2, 0, 3, 4, 1).unbind(0)  # (B, h, d, N)
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    cosine = q @ k.transpose(-2, -1)
    logits = cosine * temperature
    out = (logits.softmax(dim=-1) @ v).permute(0, 3, 1, 2).reshape(B, N, C)
    return out, cosine, logits


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def fused_and_float64(qkv: torch.Tensor, temperature: torch.Tensor, num_heads: int, seed: int = 0):
    """(out, d_qkv, d_temperature) of the fused op and of the official maths in float64 on the same values, for
    a random d_out; and the magnitude of what d_temperature sums, per head: sum |d_logits * cosine|."""
    qkv, temperature = qkv.detach().requires_grad_(), temperature.detach().requires_grad_()
    out = xca_fused(qkv, temperature, num_heads)
    d_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out)
    fused = (out, *torch.autograd.grad(out, (qkv, temperature), d_out))
    qkv64, temperature64 = qkv.detach().double().requires_grad_(), temperature.detach().double().requires_grad_()
    out64, cosine, logits = official_xca_core(qkv64, temperature64, num_heads)
    *grads, d_logits = torch.autograd.grad(out64, (qkv64, temperature64, logits), d_out.double())
    return fused, (out64, *grads), (d_logits * cosine).abs().sum(dim=(0, 2, 3)).view_as(temperature)


def random_qkv(B, N, h, d, dtype, device, scale=1.0, seed=0):
    """Channels that share a common part across the tokens, so that cosines are large and the softmax is peaked
    (independent channels would be nearly orthogonal and give a near-uniform map, hiding mistakes)."""
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(B, N, 3 * h * d, generator=g) + 2 * torch.randn(B, N, 1, generator=g)) * scale
    temperature = 4 * torch.rand(h, 1, 1, generator=g) + 0.5
    return qkv.to(device, dtype), temperature.to(device)


# (B, N, h, d): token counts off the block sizes (64, 128), one token; 16384 tokens once per dtype
FP32, BF16 = torch.float32, torch.bfloat16
CASES = [(dtype, shape) for dtype in (FP32, BF16) for shape in [(2, 300, 2, 48), (2, 197, 3, 32), (1, 1, 2, 32)]]
CASES += [(FP32, (1, 16384, 1, 48)), (BF16, (1, 16384, 1, 32)), (BF16, (1, 1, 1, 48))]


@pytest.mark.parametrize('dtype, shape', CASES,
                         ids=['{}-B{}-N{}-h{}-d{}'.format(str(t)[6:], *s) for t, s in CASES])
def test_fused_xca_matches_the_official_maths_in_float64(shape, dtype, device):
    """Float32 within 1e-5. A bfloat16 result is rounded once more than the float64 one it is held against,
    so its error is bounded by bfloat16's resolution. The temperature's gradient is a float32 sum of terms of
    both signs that cancel (for one token every cosine is +-1), so its error is held against their magnitude:
    within 1e-5 of it from float32 and 1e-3 from bfloat16."""
    qkv, temperature = random_qkv(*shape, dtype, device)
    (out, d_qkv, d_temperature), (out64, d_qkv64, d_temperature64), summed = fused_and_float64(
        qkv, temperature, shape[2])
    assert out.dtype == d_qkv.dtype == dtype and d_temperature.dtype == torch.float32
    tolerance = 1e-5 if dtype == torch.float32 else BF16_ULP
    assert relative_error(out, out64) <= tolerance
    assert relative_error(d_qkv, d_qkv64) <= tolerance
    assert ((d_temperature - d_temperature64).abs() <= (1e-5 if dtype == torch.float32 else 1e-3) * summed).all()


def test_float16_at_10000_tokens_stays_finite_and_accurate(device):
    """Sums of squares over 10,000 tokens (a 1600-pixel image at patch 16) of values ~300 exceed float16's
    range 10,000 times over: the kernels keep them in float32."""
    qkv, temperature = random_qkv(1, 10000, 1, 32, torch.float16, device, scale=300.0)
    assert torch.isinf((qkv[..., :32].float().square().sum(dim=1)).half()).all()
    fused, exact, summed = fused_and_float64(qkv, temperature, 1)
    assert all(torch.isfinite(got).all() for got in fused)
    assert relative_error(fused[0], exact[0]) <= 2e-3 and relative_error(fused[1], exact[1]) <= 2e-3
    assert ((fused[2] - exact[2]).abs() <= 1e-3 * summed).all()


def test_strided_qkv_zero_channel_and_determinism(device):
    """qkv read in place from a wider buffer (rows 3C + 8 apart), a query channel all zero (whose norm is
    clamped, as F.normalize does) and two runs that agree bit for bit."""
    B, N, h, d = 2, 130, 2, 32
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, N, 3 * h * d + 8, generator=g).to(device)[..., 4:4 + 3 * h * d]
    qkv[..., 5] = 0
    assert qkv.stride(1) == 3 * h * d + 8
    temperature = (torch.rand(h, 1, 1, generator=g) + 0.5).to(device)
    fused, exact, summed = fused_and_float64(qkv, temperature, h)
    assert relative_error(fused[0], exact[0]) <= 1e-5 and relative_error(fused[1], exact[1]) <= 1e-5
    assert ((fused[2] - exact[2]).abs() <= 1e-5 * summed).all()
    again, _, _ = fused_and_float64(qkv, temperature, h)
    assert all(torch.equal(a, b) for a, b in zip(fused, again))


def test_xcit_with_the_fused_kernels_trains_like_the_official_maths(device):
    """A 2-block XCiT-nano (d = 32), its output and every parameter's gradient, against the same weights with
    every layer on its reference maths (XCA's official formulation). On CUDA the convolutions around XCA run
    in TF32 (cuDNN's default) on slightly different inputs, hence the wider bound there."""
    torch.manual_seed(0)
    plain = set_fast_path(perturb_(xcit.create_model('xcit_nano_12_p16_224', depth=2, num_classes=10)), 'reference')
    plain = plain.to(device)
    fused = copy.deepcopy(plain)
    for block in fused.blocks:
        block.attn.kernel = 'triton'
    x = torch.randn(2, 3, 80, 64, device=device)
    results = []
    for model in (fused, plain):
        out = model(x)
        out.square().sum().backward()
        results.append((out, [p.grad for p in model.parameters()]))
    (out, grads), (out_ref, grads_ref) = results
    tolerance = 1e-5 if device.type == 'cpu' else 1e-4
    assert relative_error(out, out_ref) <= tolerance
    for (name, _), g, g_ref in zip(plain.named_parameters(), grads, grads_ref):
        assert relative_error(g, g_ref) <= 10 * tolerance, name


def test_xca_impl_triton_reaches_the_fused_op_and_compiles_without_graph_breaks(device, monkeypatch):
    """create_model(xca_impl='triton') gives every block the fused kernel, whose XCA calls
    torch.ops.xcit.xca_fused; torch.compile(fullgraph=True) traces it (aot_eager: no C++ or GPU compiler
    needed) and gives the same gradients."""
    model = xcit.create_model('xcit_nano_12_p16_224', depth=2, xca_impl='triton').to(device)
    assert [block.attn.kernel for block in model.blocks] == ['triton', 'triton']
    xca = model.blocks[0].attn
    x = torch.randn(2, 37, 128, device=device, requires_grad=True)
    calls, fused_op = [], xca_triton._xca_fused
    with monkeypatch.context() as patch:
        patch.setattr(xca_triton, '_xca_fused', lambda *args: calls.append(args) or fused_op(*args))
        xca(x)
    assert len(calls) == 1
    compiled = torch.compile(xca, backend='aot_eager', fullgraph=True)
    grads = [torch.autograd.grad(f(x).square().sum(), (x, xca.temperature)) for f in (compiled, xca)]
    for got, want in zip(*grads):
        assert relative_error(got, want) <= 1e-6


def test_without_the_interpreter_a_cpu_tensor_takes_the_default_path():
    if INTERPRETER:
        pytest.skip('the interpreter runs the kernels on CPU tensors')
    torch.manual_seed(0)
    xca = perturb_(XCA(64, num_heads=2, kernel='triton'), scale=0.2)
    x = torch.randn(2, 50, 64)
    assert not xca_triton.fused_xca_runs(x, 32)
    with torch.no_grad():
        assert (xca(x) - xca._reference(x)).abs().max() < 1e-5


def test_auto_never_offers_the_fused_kernels_a_cpu_tensor(monkeypatch):
    """Even where they run on it (in the interpreter): the CPU default path is the one it was."""
    if not INTERPRETER:
        pytest.skip('runs in the interpreter process of test_cpu_cases_in_the_triton_interpreter')
    xca = XCA(64, num_heads=2, impl='auto')
    x = torch.randn(2, 50, 64)
    assert xca_triton.fused_xca_runs(x, 32) and not xca_triton.fused_xca_runs(x.double(), 32)
    timed = []
    monkeypatch.setattr(fastpath.CHOOSER, 'choose', lambda key, runs: timed.append(runs) or 'reference')
    monkeypatch.setattr(fastpath.CHOOSER, 'known', lambda key: False)
    xca(x)
    assert 'triton' not in timed[0] and 'reference' in timed[0]


@pytest.mark.skipif(INTERPRETER or not torch.cuda.is_available(), reason='needs CUDA, outside the interpreter')
def test_auto_times_the_fused_kernels_on_cuda(monkeypatch):
    xca = XCA(128, num_heads=4, impl='auto').cuda()
    timed = []
    monkeypatch.setattr(fastpath.CHOOSER, 'choose', lambda key, runs: timed.append((key, runs)) or 'triton')
    monkeypatch.setattr(fastpath.CHOOSER, 'known', lambda key: False)
    x = torch.randn(2, 196, 128, device='cuda')
    with torch.no_grad():
        out = xca(x)
        assert relative_error(out, xca._reference(x)) <= 1e-5
    key, runs = timed[0]
    assert key.endswith(' triton') and 'triton' in runs and 'reference' in runs
