"""The scripts under benchmarks/ that produce BENCHMARKS.md's tables."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_profile_breakdown_accounts_for_the_whole_step(tmp_path):
    out = tmp_path / 'profile.json'
    proc = subprocess.run([sys.executable, REPO / 'benchmarks' / 'profile_breakdown.py', '--cases',
                           'xcit_nano_12_p16_224:2', '--img-size', '64', '--impl', 'xcit,xcit-reference',
                           '--json', out],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert data['gemm_peak_gflops'] > 1 and data['cpu']
    # per mode, one row per implementation, timed in turns: the same maths, so the same floor
    assert [(row['mode'], row['impl']) for row in data['rows']] == [
        ('infer', 'xcit'), ('infer', 'xcit-reference'), ('train', 'xcit'), ('train', 'xcit-reference')]
    infer, infer_reference, train, _ = data['rows']
    assert infer['floor_ms'] == infer_reference['floor_ms']
    for row in data['rows']:
        shares = [v for k, v in row.items() if k.endswith('%')]
        assert len(shares) == 4 and abs(sum(shares) - 100) < 0.5 and row['matmul %'] > 0
        assert 0 < row['floor_fraction'] <= 1 and row['floor_ms'] < row['step_ms']
    # the backward costs twice the forward (a little less: nothing needs the image's gradient); LPI's
    # depthwise convs counted as dense ones in the backward, as torch's formula does, would make it 4x
    assert 2.8 < train['gflop'] / infer['gflop'] < 3.05


def test_the_ratio_range_is_that_of_the_rounds_taken_in_turns():
    """A slow moment hits both implementations in the same round: it must not show as a ratio of thousands."""
    from xcit.bench import Result, ratios
    def result(impl, rounds):
        median = sorted(rounds)[len(rounds) // 2]
        return Result('m', impl, 'infer', 1, 224, 196, 1e3 / median, median, (max(rounds) - min(rounds)) / 2,
                      None, 1.0, 1.0, 'cpu', rounds)
    timm, ours = result('timm', [400.0, 410.0, 1200.0]), result('xcit', [300.0, 320.0, 900.0])
    (row,) = ratios([timm, ours])
    assert row['speedup_range'] == (round(410 / 320, 3), round(1200 / 900, 3))


# --- benchmarks/gpu.py: what can be checked without a GPU ------------------------------------------------

GPU_SCRIPT = REPO / 'benchmarks' / 'gpu.py'


def _gpu_script():
    import importlib.util
    spec = importlib.util.spec_from_file_location('gpu_bench', GPU_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _run_gpu_script(*args, env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, GPU_SCRIPT, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_the_gpu_script_without_a_gpu_says_so_in_one_line_and_exits_2(tmp_path):
    proc = _run_gpu_script('--out', tmp_path, env={'CUDA_VISIBLE_DEVICES': ''})
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == '' and len(proc.stderr.strip().splitlines()) == 1
    assert 'no CUDA GPU' in proc.stderr and not any(tmp_path.iterdir())


def test_the_gpu_script_names_a_bad_stage_in_one_line(tmp_path):
    proc = _run_gpu_script('--out', tmp_path, '--stages', 'compare,speed')
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        'gpu.py: --stages: unknown speed; choose from ' + ', '.join(_gpu_script().STAGES)]


def test_the_gpu_script_names_a_bad_model_in_one_line(tmp_path):
    proc = _run_gpu_script('--out', tmp_path, '--models', 'xcit_small_12_p8_224,resnet50')
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        'gpu.py: --models: choose from ' + ', '.join(name for name, _ in _gpu_script().MAIN_CASES)]


def test_a_failing_stage_is_recorded_and_the_next_one_runs(tmp_path, capsys):
    """And a stop (SIGTERM, a time limit) ends the run with what was measured written and tabled."""
    gpu = _gpu_script()

    def fails(report, save, *_):
        report['notes'].append('measured one thing')
        save()
        raise RuntimeError('out of memory, say')

    def works(report, save, *_):
        report['notes'].append('measured another')

    def stopped(report, save, *_):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler interrupts this
    gpu.STAGE_FUNCTIONS.update(compare=fails, correctness=works, graphs=stopped)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        code = gpu.main(['--device', 'cpu', '--out', str(tmp_path), '--stages', 'compare,correctness,graphs,explain'])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 1
    stages = json.loads((tmp_path / 'gpu.json').read_text())['stages']
    assert stages['compare']['status'] == 'error' and 'out of memory, say' in stages['compare']['error']
    assert stages['compare']['notes'] == ['measured one thing']  # what it measured before failing is kept
    assert stages['correctness']['status'] == 'ok' and stages['correctness']['notes'] == ['measured another']
    assert stages['graphs']['status'] == 'stopped' and 'explain' not in stages
    out = capsys.readouterr().out
    assert 'stages: compare error' in out and 'RuntimeError: out of memory, say' in out


def test_past_the_budget_the_gpu_script_skips_the_stages_and_still_reports(tmp_path):
    proc = _run_gpu_script('--device', 'cpu', '--budget-s', '0', '--out', tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / 'gpu.json').read_text())
    assert data['environment']['torch'] == torch.__version__
    assert {s['status'] for s in data['stages'].values()} == {'skipped'}
    assert list(data['stages']) == list(_gpu_script().STAGES)
    assert 'stages: compare skipped' in proc.stdout


@pytest.mark.slow
def test_the_gpu_script_dry_run_on_the_cpu_goes_through_every_stage(tmp_path):
    """Tiny sizes on the CPU, compiles by dynamo alone: every stage's code runs and reports."""
    proc = _run_gpu_script('--device', 'cpu', '--quick', '--out', tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / 'gpu.json').read_text())
    stages = data['stages']
    assert {name: s['status'] for name, s in stages.items()} == dict(
        compare='ok', correctness='ok', graphs='skipped', explain='ok', sweep='ok', xca='ok', compiled='ok')
    compare = stages['compare']
    # bf16 in NCHW and channels_last, and TF32; ours and timm's; inference and training
    assert len(compare['rows']) == 12 and all(r['step_time_ms'] > 0 and r['peak_mb'] is not None
                                              for r in compare['rows'])
    assert {(r['precision'], r['channels_last']) for r in compare['ratios']} == {
        ('bf16', False), ('bf16', True), ('tf32', False)}
    assert any(key.startswith('xca ') for key in compare['fast_paths'])
    assert all(r['finite'] for r in stages['correctness']['rows'])
    assert {r['precision'] for r in stages['correctness']['rows']} == {'fp16', 'bf16'}
    assert [r['graph_breaks'] for r in stages['explain']['rows']] == [0, 0]
    assert {r['model'] for r in stages['sweep']['rows']} == {'xcit_nano_12_p16_224', 'deit_small_patch16_224'}
    xca = {(r['scope'], r['mode'], r['variant']): r for r in stages['xca']['rows']}
    assert xca['core', 'train', 'reference-compiled']['grad_rel_err'] < 0.05  # bf16 against float32
    compiled = [r for r in stages['compiled']['rows'] if r['compiled']]
    # the quick run compiles inference only, where ours is compiled plainly (the fused XCA kernels join
    # training graphs only)
    assert {(r['impl'], r['mode']) for r in compiled} == {('xcit', 'infer'), ('timm', 'infer')}
    assert all(r['compile_s'] is not None for r in compiled)
    tail = proc.stdout.splitlines()
    assert tail[-1] == f"wrote {tmp_path / 'gpu.json'}" and any(line.startswith('compare:') for line in tail)


def test_a_failing_group_fails_its_stage_without_ending_it(tmp_path, monkeypatch):
    """Running out of memory in one (model, mode, precision) still lets the stage's other groups run."""
    gpu = _gpu_script()
    tried = []

    def measure(name, batch, mode, *_):
        tried.append(mode)
        raise RuntimeError('CUDA out of memory, say')
    monkeypatch.setattr(gpu, 'measure_in_turns', measure)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        code = gpu.main(['--device', 'cpu', '--quick', '--out', str(tmp_path), '--stages', 'compare'])
    finally:
        signal.signal(signal.SIGTERM, previous)
    compare = json.loads((tmp_path / 'gpu.json').read_text())['stages']['compare']
    assert code == 1 and compare['status'] == 'failed' and tried == ['infer', 'train'] * 2  # bf16, then tf32
    assert compare['errors'][0] == 'xcit_nano_12_p16_224 infer bf16: RuntimeError: CUDA out of memory, say'


def test_the_gpu_script_measures_a_triton_xca_kernel_where_the_tree_has_one(tmp_path, monkeypatch):
    """Found through XCA_KERNELS: a stand-in named 'triton' (computed by the matmul maths) joins every XCA row."""
    import xcit.models.xcit as xcit_models
    gpu = _gpu_script()
    previous = signal.getsignal(signal.SIGTERM)
    for kernels, measured in ((('matmul', 'sdpa'), False), (('matmul', 'sdpa', 'triton'), True)):
        monkeypatch.setattr(xcit_models, 'XCA_KERNELS', kernels)
        try:
            assert gpu.main(['--device', 'cpu', '--quick', '--out', str(tmp_path), '--stages', 'xca']) == 0
        finally:
            signal.signal(signal.SIGTERM, previous)
        xca = json.loads((tmp_path / 'gpu.json').read_text())['stages']['xca']
        triton = [(r['scope'], r['mode']) for r in xca['rows'] if r['variant'] == 'triton']
        assert triton == ([('core', 'infer'), ('core', 'train'), ('module', 'infer'), ('module', 'train')]
                          if measured else [])
        assert any('triton' in note for note in xca['notes']) != measured


def test_compiled_paths_puts_only_the_named_kinds_on_the_fast_path():
    import importlib.util
    spec = importlib.util.spec_from_file_location('compiled_paths', REPO / 'benchmarks' / 'compiled_paths.py')
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    model = script.build('xcit_nano_12_p16_224', 'xca+mlp')._orig_mod  # compiled lazily: nothing traced yet
    impls = {}
    for module in model.modules():
        if hasattr(module, 'impl'):
            impls.setdefault(type(module).__name__, set()).add(module.impl)
    assert impls == dict(ConvPatchEmbed={'reference'}, XCA={'fast'}, Linear={'reference'}, Mlp={'fast'},
                         ClassAttention={'reference'})
    proc = subprocess.run([sys.executable, REPO / 'benchmarks' / 'compiled_paths.py', '--variants', 'reference,xca+lpi'],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and 'lpi is not one of' in proc.stderr.strip().splitlines()[-1]
