"""Every fast path against the reference maths it replaces (equal within 1e-5 in float32, finite in bf16),
and how a layer picks its path: timed on first use under 'auto' (the faster candidate by the costs it is
given), forced by impl= or XCIT_FAST_PATH, shown by print(model), switched by set_fast_path."""
import copy
import json
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import xcit
from conftest import perturb_, run_cli
from xcit.models import fastpath, get_fast_path, layers, set_fast_path
from xcit.models.xcit import XCA, ConvPatchEmbed, token_major_xca, xca_reference, xca_through_projection

needs_onednn = pytest.mark.skipif(not layers.onednn_linear_works(), reason='this PyTorch build has no oneDNN linear')


def compile_candidate_cheaply(fn, backend=None):
    """What compile_static times candidates by, traced by dynamo without inductor's code generation: the tests
    that are not about the timing need the decisions, not inductor's minutes of compiling every candidate."""
    return torch.compile(fn, backend='eager', dynamic=False)


@pytest.fixture
def chooser(monkeypatch):
    """A fresh process-wide chooser whose 'timing' makes the candidate named by `chooser.prefer` win."""
    fresh = fastpath.PathChooser()
    fresh.prefer = None
    fresh.timed = []

    def synthetic(self, key, runs, margin=0.0):
        if fresh.known(key):
            return fresh._decisions[key].path
        for run in runs.values():
            run()  # every candidate still runs: a broken one fails the test
        fresh.timed.append(key)
        names = list(runs)
        winner = fresh.prefer if fresh.prefer in names else names[0]
        fresh._decisions[key] = fastpath.Decision(winner, {n: (1.0 if n == winner else 2.0) for n in names})
        return winner

    monkeypatch.setattr(fastpath, 'CHOOSER', fresh)
    monkeypatch.setattr(fresh, 'choose', synthetic.__get__(fresh))
    return fresh


def test_the_chooser_keeps_the_faster_candidate_by_the_costs_it_is_given():
    costs = {'reference': 3.0, 'fast_a': 1.0, 'fast_b': 2.0}
    asked = []

    def timer(runs):
        asked.append(len(runs))
        return [run() for run in runs]

    chooser = fastpath.PathChooser(timer=timer)
    runs = {name: (lambda c=c: c) for name, c in costs.items()}
    assert chooser.choose('op 1', runs) == 'fast_a'
    assert chooser.choose('op 1', {}) == 'fast_a' and asked == [3]  # timed once per key
    assert chooser.choose('op 2', {'reference': lambda: 1.0, 'fast_a': lambda: 5.0}) == 'reference'
    decided = chooser.decisions()
    assert decided['op 1']['path'] == 'fast_a' and 'fast_a 1 ms' in decided['op 1']['why']
    again = fastpath.PathChooser(timer=lambda runs: pytest.fail('a loaded decision is not timed again'))
    again.load_state_dict(chooser.state_dict())
    assert again.choose('op 2', {}) == 'reference'
    with pytest.raises(ValueError, match='not among'):
        again.load_state_dict({'op 3': {'path': 'fast_c', 'times_ms': {'reference': 1.0}}})


def test_with_a_margin_the_reference_keeps_its_place_unless_clearly_beaten():
    chooser = fastpath.PathChooser(timer=lambda runs: [run() for run in runs])
    assert chooser.choose('close', {'fast': lambda: 0.97, 'reference': lambda: 1.0}, margin=0.05) == 'reference'
    assert chooser.choose('clear', {'fast': lambda: 0.9, 'reference': lambda: 1.0}, margin=0.05) == 'fast'
    assert chooser.choose('no margin', {'fast': lambda: 0.97, 'reference': lambda: 1.0}) == 'fast'
    assert chooser.decisions()['close']['times_ms'] == {'fast': 0.97, 'reference': 1.0}


def test_timing_moves_no_generator_and_the_real_timer_measures(monkeypatch):
    chooser = fastpath.PathChooser()
    slow = lambda: sum(i * i for i in range(20000))  # noqa: E731
    torch.manual_seed(0)
    path = chooser.choose('op', {'reference': slow, 'fast': lambda: torch.rand(3)})
    assert path == 'fast' and torch.equal(torch.rand(2), torch.rand(2, generator=torch.Generator().manual_seed(0)))
    times = chooser.decisions()['op']['times_ms']
    assert times['reference'] > times['fast'] > 0


def test_decisions_persist_on_disk_keyed_by_machine(tmp_path, monkeypatch):
    cache = tmp_path / 'paths.json'
    monkeypatch.setenv('XCIT_FAST_PATH_CACHE', str(cache))
    fastpath.PathChooser(timer=lambda runs: [2.0, 1.0]).choose('op', {'reference': id, 'fast': id})
    stored = json.loads(cache.read_text())
    assert list(stored) == [fastpath._machine()] and stored[fastpath._machine()]['op']['path'] == 'fast'
    later = fastpath.PathChooser(timer=lambda runs: pytest.fail('the cached decision is timed again'))
    assert later.choose('op', {'reference': id, 'fast': id}) == 'fast'
    cache.write_text('{not json')  # an unreadable cache only means timing again
    assert fastpath.PathChooser(timer=lambda runs: [1.0, 2.0]).choose('op', {'reference': id, 'fast': id}) == 'reference'


def test_forced_paths_and_the_environment_override(chooser, monkeypatch):
    """impl='reference' (or XCIT_FAST_PATH=reference at build time) never consults the chooser; 'fast' takes the
    first fast candidate; 'auto' takes what the chooser decides."""
    torch.manual_seed(0)
    x = torch.randn(2, 30, 64)
    xca = perturb_(XCA(64, num_heads=2), scale=0.2).eval()
    assert xca.impl == 'auto' and 'impl=auto' in repr(xca)
    calls = []
    for name in ('_token_major', '_channel_major', '_reference'):
        original = getattr(XCA, name)
        monkeypatch.setattr(XCA, name, lambda self, t, _n=name, _o=original: calls.append(_n) or _o(self, t))
    chooser.prefer = 'channel_major'
    with torch.no_grad():
        xca(x)
        calls.clear()
        xca(x)
        assert calls == ['_channel_major']
        calls.clear()
        set_fast_path(xca, 'fast')
        xca(x)
        assert calls == ['_token_major']
        calls.clear()
        set_fast_path(xca, 'reference')
        xca(x)
        assert calls == ['_reference'] and get_fast_path(xca) == 'reference'
    monkeypatch.setenv('XCIT_FAST_PATH', 'reference')
    assert get_fast_path(xcit.create_model('xcit_nano_12_p16_224', depth=1)) == 'reference'
    monkeypatch.setenv('XCIT_FAST_PATH', 'onednn')
    with pytest.raises(ValueError, match='XCIT_FAST_PATH'):
        XCA(64)
    with pytest.raises(ValueError, match='fast path'):
        set_fast_path(xca, 'mkl')


@pytest.mark.parametrize('winner', ['token_major', 'through_projection', 'values_folded', 'channel_major', 'onednn',
                                    'onednn_fused', 'channels_last_folded', 'folded', 'reference'])
def test_whichever_path_wins_the_model_computes_the_reference(winner, chooser):
    """Outputs and every gradient of the model with `winner` chosen wherever it is a candidate, against the
    same weights on impl='reference', within 1e-5 in float32."""
    chooser.prefer = winner
    torch.manual_seed(0)
    model = perturb_(xcit.create_model('xcit_nano_12_p16_224', num_classes=10, depth=2))
    plain = set_fast_path(copy.deepcopy(model), 'reference')
    x, target = torch.randn(2, 3, 64, 48), torch.tensor([1, 7])
    for train in (False, True):
        for m in (model, plain):
            m.train(train)  # training: the stem's BatchNorm on batch statistics, in both
            m.zero_grad()
        with torch.set_grad_enabled(train):
            out, expected = model(x), plain(x)
        assert (out - expected).abs().max() < 1e-5
        if train:
            F.cross_entropy(out, target).backward()
            F.cross_entropy(expected, target).backward()
            for (name, p), q in zip(model.named_parameters(), plain.parameters()):
                scale = max(q.grad.abs().max().item(), 1e-3)
                assert (p.grad - q.grad).abs().max() / scale < 1e-5, name
            # timing left BatchNorm's statistics as they were: one update each, as in the plain model
            assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(model.buffers(), plain.buffers()))
    assert any(d['path'] == winner for d in chooser.decisions().values()) or not layers.onednn_linear_works()


def test_the_bench_reference_model_times_nothing_and_computes_what_the_timed_one_does(chooser):
    """`xcit bench --impls xcit,xcit-reference`: the same model with every hardware-dependent path forced off
    asks the chooser nothing, and its training step gives the timed model's loss and gradients."""
    from xcit import bench
    chooser.prefer = 'token_major'
    x, target = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)), torch.tensor([1, 7])
    losses, grads = {}, {}
    for impl in ('xcit-reference', 'xcit'):
        torch.manual_seed(0)
        model = bench.build_model('xcit_nano_12_p16_224', impl, 64)
        asked_before = len(chooser.timed)
        loss = F.cross_entropy(model(x), target)
        loss.backward()
        losses[impl], grads[impl] = loss.item(), [p.grad for p in model.parameters()]
        assert (len(chooser.timed) > asked_before) == (impl == 'xcit'), impl
    assert abs(losses['xcit'] - losses['xcit-reference']) < 1e-5
    # twelve blocks of float32 sums in another order: 1e-4 of each gradient's scale (the 1e-5 of each path
    # is held on two blocks above)
    for ours, plain in zip(grads['xcit'], grads['xcit-reference']):
        assert (ours - plain).abs().max() <= 1e-4 * max(plain.abs().max().item(), 1e-3)


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

    fast_out, fast_grads = run(lambda x, w, b: layers.linear(x, w, b, gelu=gelu, impl='fast'))
    ref_out, ref_grads = run(lambda x, w, b: F.gelu(F.linear(x, w, b)) if gelu else F.linear(x, w, b))
    assert torch.allclose(fast_out, ref_out, atol=1e-5)
    for a, r in zip(fast_grads, ref_grads):
        assert torch.allclose(a, r, atol=1e-4, rtol=1e-5)
    with torch.no_grad():  # inference: bias and GELU fused into the GEMM
        assert torch.allclose(layers.linear(x, w, b, gelu=gelu, impl='fast'), ref_out, atol=1e-5)


@needs_onednn
@pytest.mark.parametrize('train', [False, True])
def test_fused_mlp_matches_its_modules(train):
    """The MLP as one oneDNN op (training: GELU recomputed in the backward pass) or with GELU in fc1's GEMM."""
    torch.manual_seed(0)
    mlp = set_fast_path(perturb_(layers.Mlp(32, 96), scale=0.2), 'fast')
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
def test_only_cpu_float32_outside_autocast_takes_the_onednn_op(monkeypatch):
    calls = _count_onednn_calls(monkeypatch)
    x, w = torch.randn(2, 4), torch.randn(3, 4)
    layers.linear(x, w, impl='fast')
    assert len(calls) == 1
    with torch.autocast('cpu', dtype=torch.bfloat16):  # autocast keeps PyTorch's own lower-precision matmul
        assert layers.linear(x, w, impl='fast').dtype == torch.bfloat16
    assert layers.linear(x.double(), w.double(), impl='fast').dtype == torch.float64
    with torch.device('meta'):  # what the FLOP counters run on
        assert layers.linear(torch.empty(2, 4), torch.empty(3, 4), impl='auto').shape == (2, 3)
    assert len(calls) == 1
    monkeypatch.setattr(layers, 'onednn_linear_works', lambda: False)  # a build without the op
    assert torch.allclose(layers.linear(x, w, impl='fast'), F.linear(x, w)) and len(calls) == 1


def test_a_bad_path_in_the_environment_is_one_line_and_exit_2(monkeypatch):
    monkeypatch.setenv('XCIT_FAST_PATH', 'onednn')
    proc = run_cli('bench', '-m', 'xcit_nano_12_p16_224', '-b', '1', '--bench', 'infer', '--no-memory',
                   '--rounds', '1', '--iters', '1')
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith("XCIT_FAST_PATH must be one of auto, fast, reference, not 'onednn'")


def test_the_meta_device_times_nothing_and_takes_the_reference(chooser):
    """FLOP counters run a training step on the meta device, where nothing can be timed."""
    with torch.device('meta'):
        model = xcit.create_model('xcit_nano_12_p16_224', depth=1, num_classes=3).train()
        model(torch.empty(2, 3, 32, 32)).sum().backward()
    assert chooser.timed == []


def test_a_new_head_joins_the_models_path():
    model = set_fast_path(xcit.create_model('xcit_nano_12_p16_224', depth=1), 'reference')
    model.reset_classifier(3)
    assert get_fast_path(model) == 'reference'


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
    layers.onednn_linear_works()  # probed here already: this build draws only the initialisation
    torch.manual_seed(0)
    xcit.create_model('xcit_nano_12_p16_224', depth=1)
    assert built == str(torch.rand(3).tolist())


def test_the_probe_runs_once_on_real_tensors_whatever_context_the_first_forward_is_in():
    """A first forward on the meta device under autocast (as FLOP counters run) does not decide for later ones."""
    probes, = _fresh_python(
        'import torch, xcit\n'
        'from xcit.models import layers\n'
        "with torch.device('meta'), torch.autocast('cpu', dtype=torch.bfloat16):\n"
        "    xcit.create_model('xcit_nano_12_p16_224', depth=1)(torch.empty(1, 3, 32, 32))\n"
        'with torch.no_grad():\n'
        "    xcit.create_model('cvt_13_224', depths=[1, 1, 1]).eval()(torch.randn(1, 3, 64, 64))\n"
        'print(layers.onednn_linear_works.cache_info().misses)\n')
    assert probes == '1'


XCA_PATHS = [dict(kernel='matmul', impl='fast'), dict(kernel='sdpa'), dict(kernel='matmul', impl='channel_major')]


def _xca(dim: int, heads: int, path: dict) -> XCA:
    xca = perturb_(XCA(dim, num_heads=heads, kernel=path['kernel'], impl='fast'), scale=0.2)
    if path.get('impl') == 'channel_major':
        xca._token_major = xca._channel_major  # 'fast' takes the first candidate: make it this one
    return xca


@pytest.mark.parametrize('path', XCA_PATHS, ids=['token_major', 'sdpa', 'channel_major'])
@pytest.mark.parametrize('tokens', [7, 196, 785])
def test_xca_fast_path_matches_the_official_formulation(tokens, path):
    torch.manual_seed(0)
    xca = _xca(96, 4, path).eval()
    x = torch.randn(2, tokens, 96)
    with torch.no_grad():
        assert (xca(x) - xca_reference(xca, x)).abs().max() < 1e-5
        with torch.autocast('cpu', dtype=torch.bfloat16):
            assert torch.isfinite(xca(x * 100)).all()


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('bias', [True, False])
@pytest.mark.parametrize('tokens', [7, 196])
def test_xca_through_the_projection_is_the_projected_official_formulation(tokens, bias, dtype):
    """Each head's value mixing folded into the projection: the official XCA and its projection."""
    torch.manual_seed(0)
    xca = perturb_(XCA(96, num_heads=4), scale=0.2).to(dtype).eval()
    if not bias:
        xca.proj.bias = None
    x = torch.randn(2, tokens, 96, dtype=dtype)
    with torch.no_grad():
        out = xca_through_projection(xca.qkv(x), xca.temperature, 4, xca.proj.weight, xca.proj.bias)
        # (the official formulation normalises in float32 whatever the dtype: l2_normalize_tokens)
        assert (out - xca_reference(xca, x)).abs().max() < (1e-5 if dtype == torch.float32 else 1e-6)


@pytest.mark.parametrize('bias', ['both', 'qkv', 'proj', 'none'])
@pytest.mark.parametrize('tokens', [7, 196])
def test_xca_with_the_values_folded_is_the_projected_official_formulation(tokens, bias):
    """The value projection folded into each image's (C x C) weight and bias as well (the values are never
    computed): the official XCA and its projection, with or without either bias."""
    torch.manual_seed(0)
    xca = perturb_(XCA(96, num_heads=4, qkv_bias=bias in ('both', 'qkv')), scale=0.2).eval()
    if bias in ('qkv', 'none'):
        xca.proj.bias = None
    x = torch.randn(3, tokens, 96)
    with torch.no_grad():
        assert (xca._values_folded(x) - xca_reference(xca, x)).abs().max() < 1e-5


def test_the_values_are_folded_only_where_nothing_is_recorded_for_a_backward_pass(chooser):
    torch.manual_seed(0)
    xca = perturb_(XCA(32, num_heads=2), scale=0.2)
    x = torch.randn(2, 9, 32, requires_grad=True)
    xca(x).sum().backward()
    with torch.no_grad():
        xca.eval()(x)
    paths = {key.split()[1]: decision['times_ms'] for key, decision in chooser.decisions().items()
             if key.startswith('xca')}
    assert 'values_folded' not in paths['train'] and 'values_folded' in paths['infer']


@pytest.mark.parametrize('B', [1, 2], ids=['strided-bmm', 'scratch-bmm'])
def test_token_major_backward_is_the_gradient_of_its_forward(B):
    """The hand-written backwards (token-major, and through the projection) against finite differences in
    float64, and against autograd through the official formulation with one query channel all zero (where
    all clamp its norm, as F.normalize does)."""
    torch.manual_seed(0)
    N, C, h = 9, 12, 3
    qkv = torch.randn(B, N, 3 * C, dtype=torch.float64, requires_grad=True)
    temperature = (torch.rand(h, 1, 1, dtype=torch.float64) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, t: token_major_xca(a, t, h), (qkv, temperature))
    weight, bias = torch.randn(C, C, dtype=torch.float64, requires_grad=True), torch.randn(C, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, t, w, b: xca_through_projection(a, t, h, w, b),
                                    (qkv, temperature, weight, bias.requires_grad_()))
    assert torch.autograd.gradcheck(lambda a, t, w: xca_through_projection(a, t, h, w, None), (qkv, temperature, weight))
    xca = XCA(C, num_heads=h).double()
    with torch.no_grad():
        xca.temperature.copy_(temperature)
        xca.qkv.weight[4], xca.qkv.bias[4] = 0, 0  # query channel 4 is zero for every token
    x = torch.randn(B, N, C, dtype=torch.float64, requires_grad=True)
    grads = []
    for path in (xca._token_major, xca._through_projection, xca._reference):
        out = path(x)
        grads.append(torch.autograd.grad(out, (x, *xca.parameters()), torch.cos(out)))
    for fast, projected, ref in zip(*grads):  # the reference normalises in float32 (l2_normalize_tokens)
        assert (fast - ref).abs().max() <= 1e-6 * ref.abs().max()
        assert (projected - ref).abs().max() <= 1e-6 * ref.abs().max()


def test_xca_impl_is_checked_and_reaches_every_block():
    with pytest.raises(ValueError, match='xca_impl'):
        XCA(64, kernel='flash')
    model = xcit.create_model('xcit_nano_12_p16_224', depth=3, xca_impl='sdpa')
    assert [block.attn.kernel for block in model.blocks] == ['sdpa'] * 3


@pytest.mark.parametrize('path', XCA_PATHS, ids=['token_major', 'sdpa', 'channel_major'])
def test_xca_trains_like_the_reference(path):
    torch.manual_seed(0)
    xca = _xca(64, 2, path)
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
    return set_fast_path(copy.deepcopy(model), 'reference')


@pytest.mark.parametrize('name', ['xcit_nano_12_p16_224', 'xcit_tiny_12_p8_224', 'cvt_13_224', 'fcvit_tiny'])
def test_whole_model_fast_paths_match_plain_pytorch(name, monkeypatch):
    """The model on 'auto' (whatever this machine's timings pick) against the same weights computed plainly."""
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
    model = set_fast_path(perturb_(xcit.create_model('xcit_nano_12_p16_224', num_classes=10)), 'fast')
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
def test_optimize_for_inference_compiles_without_graph_breaks_and_matches(monkeypatch):
    monkeypatch.setattr(fastpath, 'compile_candidate', compile_candidate_cheaply)
    torch.manual_seed(0)
    # every kind of block, one of each
    model = perturb_(xcit.create_model('xcit_nano_12_p16_224', depth=1, cls_attn_layers=1)).eval()
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
def test_compiled_training_survives_new_shapes(monkeypatch):
    """A second resolution and batch size: where dynamic-shape inductor fails on XCiT's channels_last views
    (the LPI and the positional encoding; no class attention, whose inductor compiles cost a third of the
    test and which the inference test above compiles)."""
    monkeypatch.setattr(fastpath, 'compile_candidate', compile_candidate_cheaply)
    torch.manual_seed(0)
    model = xcit.create_model('xcit_nano_12_p8_224', depth=1, cls_attn_layers=0, num_classes=4)
    compiled = xcit.models.compile_static(model)
    for batch, height, width in ((2, 48, 48), (3, 64, 40)):
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
    """On 'fast', in eval mode with nothing for autograd to record, no BatchNorm module runs (each is folded into
    its conv) and the tokens are those of the modules; in training, under autograd or on 'reference' they run."""
    torch.manual_seed(0)
    model = set_fast_path(perturb_(xcit.create_model('xcit_tiny_12_p16_224')).eval(), 'fast')
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
    assert not bn_calls and grid == (5, 5)
    with torch.enable_grad():
        modules, _ = stem(x)  # autograd records: the modules run
    assert len(bn_calls) == 4 and (folded - modules).abs().max() < 1e-5
    bn_calls.clear()
    set_fast_path(model, 'reference')
    with torch.no_grad():
        assert torch.allclose(stem(x)[0], modules, atol=1e-6)
    assert len(bn_calls) == 2 * 4  # the modules, once for each half of the batch
    set_fast_path(model, 'fast')
    xcit.models.fold_batchnorm(model)  # folded for good: the fast path runs the plain convs
    with torch.no_grad():
        assert (stem(x)[0] - modules).abs().max() < 1e-5


def allocations_of(fn) -> list[int]:
    """The sizes in bytes of the CPU allocations made while `fn()` runs (one may be listed by each of the nested
    ops that made it)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return [e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0]


def test_under_autocast_the_stem_copies_the_image_once_in_the_lower_precision():
    """The channels-last copy of the image is made in autocast's dtype, not as a float32 copy then cast: the
    image is the largest input of the step, and a float32 copy of it raised the peak (matches the modules)."""
    torch.manual_seed(0)
    stem = set_fast_path(perturb_(xcit.create_model('xcit_nano_12_p16_224')).eval(), 'fast').patch_embed
    x = torch.randn(2, 3, 64, 64)
    half_bytes = x.numel() * x.element_size() // 2  # inference takes the batch in halves
    with torch.inference_mode(), torch.autocast('cpu', dtype=torch.bfloat16):
        allocations = allocations_of(lambda: stem(x))
        fast, _ = stem(x)
        set_fast_path(stem, 'reference')
        reference, _ = stem(x)
    assert half_bytes // 2 in allocations  # each half's one bfloat16 copy
    assert half_bytes not in allocations  # no float32 copy
    assert fast.dtype == torch.bfloat16 and (fast.float() - reference.float()).norm() / reference.float().norm() < 1e-2


def test_in_inference_the_stem_never_holds_a_whole_batch_map():
    """The first maps of the stem are the largest tensors of a p16 model: in inference, on either path, it makes
    each from half the batch, and gives the tokens of the modules run on the whole batch."""
    torch.manual_seed(0)
    stem = perturb_(xcit.create_model('xcit_nano_12_p16_224')).eval().patch_embed
    x = torch.randn(4, 3, 128, 128)  # large enough that the maps outweigh the folded weights
    first_map_bytes = 4 * stem.proj[0][0].out_channels * 64 * 64 * x.element_size()  # (4, 16, 64, 64)
    with torch.no_grad():
        assert max(allocations_of(lambda: stem.proj(x))) >= first_map_bytes  # the measure sees a whole-batch map
        modules = stem.proj(x).flatten(2).transpose(1, 2)
        for path in ('reference', 'fast'):
            set_fast_path(stem, path)
            assert max(allocations_of(lambda: stem(x))) <= first_map_bytes // 2, path
            tokens, grid = stem(x)
            assert grid == (8, 8) and (tokens - modules).abs().max() < 1e-5, path


def test_in_inference_the_mlp_holds_one_hidden_map():
    """Exact GELU runs in place on fc1's output where nothing is kept for a backward pass: one (M, hidden)
    buffer, where the layers as written make a second for GELU's result."""
    torch.manual_seed(0)
    mlp = layers.Mlp(16, 64, impl='reference')
    x = torch.randn(2, 50, 16)
    hidden_bytes = 2 * 50 * 64 * x.element_size()

    def hidden_buffers(fn) -> int:
        return sum(size == hidden_bytes for size in allocations_of(fn))
    with torch.no_grad():
        assert 0 < hidden_buffers(lambda: mlp(x)) < hidden_buffers(lambda: mlp.fc2(F.gelu(mlp.fc1(x))))
        assert torch.allclose(mlp(x), mlp.fc2(F.gelu(mlp.fc1(x))), atol=1e-6)


def test_timing_a_new_shape_between_a_forward_and_its_backward_leaves_that_backward_intact():
    """DINO's multi-crop: a second crop size goes forward (and its paths are timed, BatchNorm statistics put back)
    before the first size's backward."""
    torch.manual_seed(0)
    model = set_fast_path(xcit.create_model('xcit_nano_12_p8_224', depth=1, num_classes=0), 'auto').train()
    first = model(torch.randn(3, 3, 40, 40))
    second = model(torch.randn(3, 3, 24, 24))  # a key no other test times: its probe runs here
    (first.sum() + second.sum()).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_cpu_name_tells_generations_of_one_brand_apart(monkeypatch):
    # Virtual machines report a bare 'AMD EPYC' for Zen 3 and Zen 5 alike; their timings must not share a cache key.
    monkeypatch.setattr(fastpath, '_cpuinfo', lambda: {'model name': 'AMD EPYC', 'cpu family': '25', 'model': '1'})
    zen3 = fastpath._machine()
    monkeypatch.setattr(fastpath, '_cpuinfo', lambda: {'model name': 'AMD EPYC', 'cpu family': '26', 'model': '2'})
    assert fastpath._machine() != zen3 and fastpath.cpu_name() == 'AMD EPYC (family 26, model 2)'


def recording_backend(ops: set):
    """A torch.compile backend that runs the graph as traced and adds the ops it calls to `ops`."""
    def record(graph_module, example_inputs):
        ops.update(str(node.target) for node in graph_module.graph.nodes if node.op == 'call_function')
        return graph_module.forward
    return record


def assert_matches_the_reference(out, model, reference, x):
    """`out`, model's output for `x`, and the gradients behind it equal the reference model's within 1e-5."""
    expected = reference(x)
    assert (out - expected).abs().max() <= 1e-5 * expected.abs().max()
    out.square().sum().backward()
    expected.square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert (p.grad - q.grad).abs().max() <= 1e-5 * max(q.grad.abs().max(), 1e-3), name


def test_fast_paths_reach_compiled_graphs_as_whole_ops(monkeypatch):
    """Under torch.compile a layer on 'fast' keeps its path as one opaque op (the oneDNN linear, the token-major
    XCA core), with no graph break, even in a process whose first model is compiled before any eager forward
    (so the oneDNN probe must have run at the build), and computes the reference's outputs and gradients."""
    monkeypatch.setattr(layers, '_ONEDNN_OK', False)
    layers.onednn_linear_works.cache_clear()
    torch.manual_seed(0)
    model = perturb_(xcit.create_model('xcit_nano_12_p16_224', depth=1, num_classes=5))
    reference = copy.deepcopy(model)
    set_fast_path(reference, 'reference')
    set_fast_path(model, 'fast')
    ops = set()

    compiled = torch.compile(model, backend=recording_backend(ops), fullgraph=True)
    x = torch.randn(2, 3, 48, 64)
    out = compiled(x)
    assert {'xcit.onednn_linear.default', 'xcit.xca_token_major.default'} <= ops, sorted(ops)
    assert_matches_the_reference(out, model, reference, x)


def test_the_token_major_ops_pass_torch_library_checks():
    """Fake (meta) shapes, autograd registration and schema of the custom ops, as torch.compile relies on them."""
    torch.manual_seed(0)
    qkv = torch.randn(2, 7, 3 * 8, dtype=torch.float64, requires_grad=True)
    temperature = torch.rand(2, 1, 1, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.xcit.xca_token_major.default, (qkv, temperature, 2))
    weight, bias = torch.randn(8, 8, dtype=torch.float64, requires_grad=True), torch.randn(8, dtype=torch.float64)
    for b in (bias.requires_grad_(), None):
        torch.library.opcheck(torch.ops.xcit.xca_projected.default, (qkv, temperature, 2, weight, b))
    # the backward ops too: compiled training steps trace them with their fake kernels, whose strides must be
    # those the ops return
    d_out = torch.randn(2, 7, 8, dtype=torch.float64)
    with torch.no_grad():
        kept = torch.ops.xcit.xca_token_major(qkv, temperature, 2)[1:]
        torch.library.opcheck(torch.ops.xcit.xca_token_major_backward.default, (d_out, qkv, temperature, *kept, 2))
        kept = torch.ops.xcit.xca_projected(qkv, temperature, 2, weight, bias)[1:]
        torch.library.opcheck(torch.ops.xcit.xca_projected_backward.default,
                              (d_out, qkv, temperature, weight, *kept, 2))
        x = torch.randn(2, 7, 8, dtype=torch.float64)
        for b in (bias, None):  # inference only: no gradient to check
            torch.library.opcheck(torch.ops.xcit.xca_values_folded.default,
                                  (x, qkv[..., :16], temperature, 2, weight, b, weight.t(), b))


@pytest.mark.parametrize('graph_winner', ['fast', 'reference'])
def test_compiled_graphs_take_the_path_that_was_fastest_compiled(graph_winner, chooser, monkeypatch):
    """compile_static times every candidate compiled, each on its own, before its first graph for a new kind of
    input, and the graph holds what won there, whatever won in eager; the timing pass moves no BatchNorm
    statistics and no generator, and the graph computes the reference's outputs and gradients."""
    eager_choose = chooser.choose

    def choose(key, runs, margin=0.0):  # in eager the reference wins, compiled the fast path or the reference
        chooser.prefer = ('reference' if graph_winner == 'reference' else None) if key.endswith(
            fastpath.IN_GRAPH) else 'reference'
        return eager_choose(key, runs)
    monkeypatch.setattr(chooser, 'choose', choose)
    compiled_runs = []
    monkeypatch.setattr(fastpath, 'compile_candidate', lambda fn, backend: compiled_runs.append(fn) or compile_candidate_cheaply(fn, backend))
    torch.manual_seed(0)
    model = perturb_(xcit.create_model('xcit_nano_12_p16_224', depth=1, num_classes=5))
    reference = copy.deepcopy(model)
    set_fast_path(reference, 'reference')
    ops = set()

    compiled = xcit.models.compile_static(model, backend=recording_backend(ops), fullgraph=True)
    x = torch.randn(2, 3, 48, 64)
    state = torch.get_rng_state()
    out = compiled(x)
    assert torch.equal(torch.get_rng_state(), state)
    graph_keys = [key for key in chooser.timed if key.endswith(fastpath.IN_GRAPH)]
    assert any(key.startswith('xca train') for key in graph_keys) and len(compiled_runs) >= 2 * len(graph_keys)
    if layers.onednn_linear_works():  # a lone GEMM compiles to itself: only a linear with GELU is timed compiled
        linear_keys = [key for key in graph_keys if key.startswith('linear train')]
        assert linear_keys and all('+gelu' in key for key in linear_keys), graph_keys
    assert ('xcit.xca_token_major.default' in ops) == (graph_winner == 'fast'), sorted(ops)
    assert_matches_the_reference(out, model, reference, x)
    # the compiled forward updated BatchNorm's statistics once, as the eager one did; the timing pass not at all
    for (name, b), r in zip(model.named_buffers(), reference.buffers()):
        assert torch.allclose(b, r, atol=1e-6), name
    timed = len(chooser.timed)
    compiled(x)  # the same kind of input: nothing is timed again
    assert len(chooser.timed) == timed
    with torch.no_grad():
        compiled(x)  # inference is a new kind: its paths are timed compiled too
    assert any(key.startswith('xca infer') and key.endswith(fastpath.IN_GRAPH) for key in chooser.timed)


@pytest.mark.parametrize('winner', ['graph', 'eager'])
def test_a_compiled_model_runs_its_graph_only_where_the_graph_beat_the_eager_model(winner, chooser, monkeypatch):
    """compile_static times the whole graph against the model run eagerly, forward and backward, for each new kind
    of input, and from then on runs the winner; the decision is listed with the layers' and kept across calls,
    and the timing moves no BatchNorm statistic and leaves no gradient."""
    monkeypatch.setattr(fastpath, 'compile_candidate', compile_candidate_cheaply)
    torch._dynamo.reset()  # earlier tests' graphs of the same forward count towards dynamo's recompilation limit
    chooser.prefer = winner
    graph_calls = []

    def counting_backend(graph_module, example_inputs):
        return lambda *a: graph_calls.append(1) or graph_module.forward(*a)
    torch.manual_seed(0)
    model = perturb_(xcit.create_model('xcit_nano_12_p16_224', depth=1, cls_attn_layers=1, num_classes=3))
    reference = copy.deepcopy(model)
    set_fast_path(reference, 'reference')
    compiled = xcit.models.compile_static(model, backend=counting_backend)
    assert list(compiled.state_dict()) == ['_orig_mod.' + k for k in model.state_dict()]
    x = torch.randn(2, 3, 32, 48)
    out = compiled(x)  # decides, then runs the winner
    keys = [key for key in chooser.timed if key.endswith(fastpath.GRAPH)]
    assert keys == ['XCiT train (2, 3, 32, 48) | graph'] and chooser.decisions()[keys[0]]['path'] == winner
    assert all(p.grad is None for p in model.parameters())
    assert_matches_the_reference(out, model, reference, x)
    for (name, b), r in zip(model.named_buffers(), reference.buffers()):
        assert torch.allclose(b, r, atol=1e-6), name  # one forward each: the timing runs were put back
    calls = len(graph_calls)
    compiled(x).sum().backward()
    assert len(graph_calls) > calls if winner == 'graph' else len(graph_calls) == calls
    assert len(chooser.timed) == len(set(chooser.timed))  # nothing timed twice
