"""One run on a CUDA GPU: ours against timm's XCiT, cost against resolution, the XCA core alone, and CUDA checks.

    PYTHONPATH=src python3 benchmarks/gpu.py --out benchmarks/results/h200
    bash benchmarks/gpu.sh benchmarks/results/h200   # a machine without network: installs the wheels in .whl first

Stages, in this order (`--stages` picks some; the environment always comes first): the main comparison,
then the short and certain checks, and the compiles last, whose time is the least certain:

- compare: ours against timm's XCiT, eager, in alternating rounds in one process: bf16 autocast with the
  images and weights in NCHW and in channels_last, and float32 with TF32 matmuls; inference and a full
  training step (forward, cross-entropy, backward, AdamW); peak memory of a step above what was live
  before it; the fast paths our models chose here.
- correctness: forward under float16 and bfloat16 autocast at 1024 and 1600 px stays finite, on every
  XCA path, against a float32 forward; a training step under autocast at the first size too.
- graphs: fixed-shape inference captured in a CUDA graph and replayed matches eager, and its time.
- explain: torch._dynamo.explain of an XCiT forward: graphs and graph breaks.
- sweep: inference time and memory of xcit_small_12_p16 against deit_small_patch16 (timm), 224-1024 px.
- xca: the XCA core alone (B=8, N=4096, C=384, 8 heads), bf16 autocast, forward and forward + backward:
  the reference maths eager and compiled, the channel-major path, scaled_dot_product_attention, and
  `xca_impl='triton'` where this tree has it.
- compiled: torch.compile (default mode, one static graph per shape) of ours and timm's, bf16; the
  compile time (first call less one step) apart from the step time.

Each stage is guarded: an error is recorded with its traceback and the next stage runs. The JSON in
--out is rewritten after every measured unit, so a run cut short still reports. Once --budget-s has
passed, the remaining stages (and compiles) are skipped. A compact table closes the run.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

# most wanted first: a run cut short by its budget keeps the side-by-side timings
STAGES = ('compare', 'xca', 'compiled', 'correctness', 'graphs', 'explain', 'sweep')
REPO = Path(__file__).resolve().parents[1]
STARTED = time.monotonic()


@dataclass
class Settings:
    """How much each stage measures; one set fits an H200 in a few minutes, the others are smaller."""
    cases: list[tuple[str, int]]  # (model, batch) of compare, in the order compiled takes them
    tf32_models: list[str]  # models also measured in float32 with TF32 matmuls (eager)
    compiled_cases: list[tuple[str, int]]
    compiled_modes: list[str]
    img_size: int = 224
    rounds: int = 5
    iters: int = 4
    warmup: int = 3
    sweep_model: str = 'xcit_small_12_p16_224'
    sweep_baseline: str = 'deit_small_patch16_224'
    sweep_sizes: list[int] = field(default_factory=lambda: [224, 384, 512, 768, 1024])
    sweep_batch: int = 8
    finite_model: str = 'xcit_small_12_p16_224'
    finite_sizes: list[int] = field(default_factory=lambda: [1024, 1600])
    graph_cases: list[tuple[str, int]] = field(default_factory=lambda: [('xcit_nano_12_p16_224', 1),
                                                                          ('xcit_small_12_p16_224', 32)])
    explain_model: str = 'xcit_nano_12_p16_224'
    xca_shape: tuple[int, int, int, int] = (8, 4096, 384, 8)  # B, N, C, heads
    compile_backend: str = 'inductor'
    compile_reserve_s: float = 60.0  # a compile (ours and timm's, one model and mode) starts only with this much left


MAIN_CASES = [('xcit_small_12_p16_224', 128), ('xcit_nano_12_p16_224', 256), ('xcit_small_12_p8_224', 64)]


def settings_for(device: str, quick: bool) -> Settings:
    if device == 'cpu':  # a dry run of every code path, small enough for a test
        return Settings(cases=[('xcit_nano_12_p16_224', 2)], tf32_models=['xcit_nano_12_p16_224'],
                        compiled_cases=[('xcit_nano_12_p16_224', 2)], compiled_modes=['infer'] if quick else
                        ['train', 'infer'], img_size=64, rounds=2, iters=1, warmup=1,
                        sweep_model='xcit_nano_12_p16_224', sweep_sizes=[64, 96], sweep_batch=1,
                        finite_model='xcit_nano_12_p16_224', finite_sizes=[96, 128], graph_cases=[],
                        xca_shape=(2, 256, 64, 4), compile_backend='eager', compile_reserve_s=0.0)
    if quick:
        return Settings(cases=MAIN_CASES, tf32_models=['xcit_nano_12_p16_224'], compiled_cases=MAIN_CASES[:1],
                        compiled_modes=['infer'], rounds=3, iters=3, warmup=2, sweep_sizes=[224, 512, 1024])
    # TF32 on the two p16 models only: float32 doubles the eager time of the largest case for little news
    return Settings(cases=MAIN_CASES, tf32_models=[name for name, _ in MAIN_CASES[:2]], compiled_cases=MAIN_CASES,
                    compiled_modes=['train', 'infer'])


class Stopped(BaseException):
    """SIGTERM (a time limit): stop measuring, write what there is, print the table."""


def _stop(signum, frame):
    raise Stopped(f'signal {signum}')


def elapsed() -> float:
    return time.monotonic() - STARTED


class Report:
    """Everything measured, rewritten to --out as JSON after each unit of work."""

    def __init__(self, out: Path, args: argparse.Namespace, settings: Settings):
        self.path = out / 'gpu.json'
        self.data: dict = dict(args={k: str(v) for k, v in vars(args).items()}, settings=asdict(settings),
                               environment={}, stages={})
        out.mkdir(parents=True, exist_ok=True)

    def stage(self, name: str) -> dict:
        return self.data['stages'].setdefault(name, dict(status='running', rows=[], notes=[]))

    def save(self) -> None:
        self.data['elapsed_s'] = round(elapsed(), 1)
        tmp = self.path.with_suffix('.json.tmp')
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)


# --- the environment -----------------------------------------------------------------------------------

def _driver_version() -> str | None:
    try:
        out = subprocess.run(['nvidia-smi', '--query-gpu=driver_version', '--format=csv,noheader'],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # absent, or broken on import: either way not what ran
        return None


def environment(device: str) -> dict:
    from xcit import bench
    from xcit.models.xcit import XCA_KERNELS
    info = bench.environment()
    info.update(device=device, timm=_version('timm'), triton=_version('triton'), numpy=_version('numpy'),
                xca_kernels=list(XCA_KERNELS), cuda_build=torch.version.cuda,
                cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                cudnn_benchmark=torch.backends.cudnn.benchmark)
    try:
        from timm.layers import use_fused_attn
        info['timm_fused_attn'] = use_fused_attn()  # deit's attention through scaled_dot_product_attention
    except ImportError:
        pass
    try:
        info['commit'] = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=REPO, capture_output=True, text=True,
                                        timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info['commit'] = None
    if device == 'cuda':
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, driver=_driver_version(), capability=f'{props.major}.{props.minor}',
                    gpu_memory_gib=round(props.total_memory / 2**30, 1), sm_count=props.multi_processor_count)
    return info


# --- measuring helpers ---------------------------------------------------------------------------------

PRECISIONS = {'bf16': 'bfloat16', 'fp16': 'float16', 'tf32': None}


def autocast_dtype(precision: str):
    name = PRECISIONS[precision]
    return None if name is None else getattr(torch, name)


@contextlib.contextmanager
def matmul_precision(precision: str):
    """float32 matmuls in TF32 for 'tf32'; otherwise as they were."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision('high' if precision == 'tf32' else before)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def first_call_s(step: Callable[[], None], device: str) -> float:
    """Seconds of one call, waited for: with a fresh torch.compile model, its compilation."""
    start = time.perf_counter()
    step()
    if device == 'cuda':
        torch.cuda.synchronize()
    return time.perf_counter() - start


@dataclass
class Variant:
    impl: str  # 'xcit' or 'timm'
    precision: str  # 'bf16' (autocast) or 'tf32' (float32, TF32 matmuls)
    channels_last: bool = False
    compiled: bool = False

    @property
    def label(self) -> str:
        return (f'{self.impl}{"-compiled" if self.compiled else ""} {self.precision}'
                f'{" channels_last" if self.channels_last else ""}')


def measure_in_turns(name: str, batch: int, mode: str, variants: list[Variant], settings: Settings, device: str,
                     macs: tuple[float, float]) -> list[dict]:
    """Build a step per variant, warm each up, time them in alternating rounds, then each one's peak memory."""
    from xcit import bench
    from xcit.models import compile_static
    steps, compile_s = {}, {}
    for v in variants:
        torch.manual_seed(0)
        model = bench.build_model(name, v.impl, settings.img_size, device)
        if v.compiled:
            model = compile_static(model, backend=settings.compile_backend)
        steps[v.label] = bench.make_step(model, mode, batch, settings.img_size, device, autocast=autocast_dtype(
            v.precision), channels_last=v.channels_last, optimizer='adamw')
        compile_s[v.label] = first_call_s(steps[v.label], device)
        bench._timed(steps[v.label], settings.warmup, device)
    times = bench.timed_in_turns(steps, settings.rounds, settings.iters, device)
    rows = []
    for v in variants:
        peak = bench.step_peak_mb(steps[v.label], device)
        result = bench.summarize(name, v.impl, mode, batch, settings.img_size, times[v.label], *macs, device, peak)
        row = dict(asdict(result), **asdict(v), tflops=achieved_tflops(result))
        row['compile_s'] = round(compile_s[v.label] - result.step_time_ms / 1e3, 1) if v.compiled else None
        rows.append(row)
    del steps
    free_memory()
    return rows


def achieved_tflops(result) -> float:
    """Matmul and conv TFLOP/s of the step (a training step counted as three forwards)."""
    flop = 2e9 * result.gmacs * result.batch_size * (3 if result.mode == 'train' else 1)
    return round(flop / (result.step_time_ms * 1e-3) / 1e12, 2)


def ratio_rows(rows: list[dict]) -> list[dict]:
    """timm's step time over ours, per model, mode and setting (the range over the rounds, taken in turns)."""
    from xcit import bench
    fields = set(bench.Result.__dataclass_fields__)
    settings = sorted({(r['precision'], r['channels_last'], r['compiled']) for r in rows})
    out = []
    for precision, channels_last, compiled in settings:
        group = [bench.Result(**{k: v for k, v in r.items() if k in fields}) for r in rows
                 if (r['precision'], r['channels_last'], r['compiled']) == (precision, channels_last, compiled)]
        for row in bench.ratios(group, reference='timm'):
            out.append(dict(row, precision=precision, channels_last=channels_last, compiled=compiled))
    return out


def deadline_left(budget_s: float) -> float:
    return budget_s - elapsed()


def measure_group(report: dict, label: str, precision: str, *args) -> list[dict]:
    """`measure_in_turns(*args)` under `precision`'s matmul setting, its failure (a compile error, running out
    of memory) recorded under `label` in the stage's errors, so that the stage's other groups still run; [] then."""
    try:
        with matmul_precision(precision):
            return measure_in_turns(*args)
    except Exception as e:
        report.setdefault('errors', []).append(f'{label}: {type(e).__name__}: {str(e)[:300]}')
        print(f"  {report['errors'][-1]}")
        free_memory()
        return []


# --- stages -----------------------------------------------------------------------------------------------

def stage_compare(report: dict, save: Callable[[], None], settings: Settings, device: str, budget_s: float) -> None:
    from xcit import bench
    from xcit.models import fast_path_decisions
    for name, batch in settings.cases:
        if deadline_left(budget_s) <= 0:
            report['notes'].append(f'{name}: skipped, past the budget')
            continue
        macs = bench.count_macs(name, settings.img_size)
        precisions = ['bf16'] + (['tf32'] if name in settings.tf32_models else [])
        for precision in precisions:
            layouts = [False, True] if precision == 'bf16' else [False]
            variants = [Variant(impl, precision, cl) for impl in ('xcit', 'timm') for cl in layouts]
            for mode in ('infer', 'train'):
                rows = measure_group(report, f'{name} {mode} {precision}', precision, name, batch, mode, variants,
                                     settings, device, macs)
                report['rows'] += rows
                for r in rows:
                    print(f"  {name} b{batch} {mode:<5} {Variant(r['impl'], precision, r['channels_last']).label:<26}"
                          f" {r['step_time_ms']:9.3f} ms  {r['peak_mb']:9.1f} MB  {r['tflops']:7.1f} TFLOP/s")
                report['ratios'] = ratio_rows(report['rows'])
                report['fast_paths'] = fast_path_decisions()
                save()


def stage_compiled(report: dict, save: Callable[[], None], settings: Settings, device: str, budget_s: float) -> None:
    """Compiled against eager, ours and timm's, bf16 NCHW (inductor picks conv layouts itself). Every model's
    training step before any inference, as training is where compiling pays most. The fused XCA kernels stay
    out of compiled graphs: inside one they were slower than inductor's own XCA on the H200 (small p16
    training 36.3 against 32.4 ms), and a third compile per case cost the run its last model."""
    from xcit import bench
    for mode in settings.compiled_modes:
        for name, batch in settings.compiled_cases:
            macs = bench.count_macs(name, settings.img_size)
            left = deadline_left(budget_s)
            if left < settings.compile_reserve_s:
                report['notes'].append(f'{name} {mode}: skipped, {left:.0f} s of the budget left '
                                       f'(a compile wants {settings.compile_reserve_s:.0f})')
                print(f'  {report["notes"][-1]}')
                continue
            variants = [Variant('xcit', 'bf16'), Variant('timm', 'bf16'), Variant('timm', 'bf16', compiled=True),
                        Variant('xcit', 'bf16', compiled=True)]
            rows = measure_group(report, f'{name} {mode}', 'bf16', name, batch, mode, variants, settings, device, macs)
            report['rows'] += rows
            for r in rows:
                compile_s = f"  compile {r['compile_s']:.1f} s" if r['compiled'] else ''
                print(f"  {name} b{batch} {mode:<5} {Variant(r['impl'], 'bf16', compiled=r['compiled']).label:<26}"
                      f" {r['step_time_ms']:9.3f} ms  {r['peak_mb']:9.1f} MB{compile_s}")
            report['ratios'] = ratio_rows(report['rows'])
            save()


def stage_correctness(report: dict, save: Callable[[], None], settings: Settings, device: str, budget_s: float) -> None:
    """Low-precision forwards at high resolution stay finite on every XCA path, and near float32."""
    from xcit import create_model
    from xcit.models import set_fast_path
    from xcit.models.xcit import XCA_KERNELS
    torch.manual_seed(0)
    reference = create_model(settings.finite_model).to(device).eval()
    models, broken = {'matmul': reference}, {}
    for kernel in XCA_KERNELS:
        if kernel != 'matmul':
            try:
                models[kernel] = create_model(settings.finite_model, xca_impl=kernel).to(device).eval()
                models[kernel].load_state_dict(reference.state_dict())
            except Exception as e:  # recorded on each of its rows below
                broken[kernel] = e
    # other kernels on 'fast': one that is a fast-path candidate rather than a branch of its own runs then too
    paths = [('matmul', 'reference'), ('matmul', 'fast')] + [(k, 'fast') for k in XCA_KERNELS if k != 'matmul']
    for size in settings.finite_sizes:
        x = torch.randn(1, 3, size, size, device=device)
        with torch.inference_mode():
            set_fast_path(reference, 'reference')
            exact = reference(x).float()
        for precision in ('fp16', 'bf16'):
            for kernel, path in paths:
                row = dict(check='forward', size=size, precision=precision, kernel=kernel, path=path)
                try:
                    if kernel in broken:
                        raise broken[kernel]
                    model = set_fast_path(models[kernel], path)
                    with torch.inference_mode(), torch.autocast(device, dtype=autocast_dtype(precision)):
                        out = model(x).float()
                    row.update(finite=bool(torch.isfinite(out).all()),
                               rel_err=float((out - exact).norm() / exact.norm()),
                               cosine=float(F.cosine_similarity(out.flatten(), exact.flatten(), dim=0)))
                    print(f"  {size} px {precision} {kernel}/{path}: finite {row['finite']}, "
                          f"relative error {row['rel_err']:.2e}")
                except Exception as e:  # one path failing must not hide the others
                    row.update(finite=False, error=f'{type(e).__name__}: {str(e)[:300]}')
                    print(f"  {size} px {precision} {kernel}/{path}: {row['error']}")
                report['rows'].append(row)
        save()
    size = settings.finite_sizes[0]
    x = torch.randn(1, 3, size, size, device=device)
    for precision in ('fp16', 'bf16'):
        model = set_fast_path(reference, 'auto').train()
        model.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=autocast_dtype(precision)):
            loss = F.cross_entropy(model(x), torch.zeros(1, dtype=torch.long, device=device))
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        row = dict(check='train step', size=size, precision=precision, kernel='matmul', path='auto',
                   finite=bool(torch.isfinite(loss)) and all(bool(torch.isfinite(g).all()) for g in grads))
        report['rows'].append(row)
        print(f"  {size} px {precision} training step: loss and gradients finite {row['finite']}")
    report['passed'] = all(r['finite'] for r in report['rows'])
    save()


def graph_case(name: str, batch: int, settings: Settings, device: str) -> dict:
    """Capture a bf16 inference of `name` in a CUDA graph, replay it on new input, compare with eager, time both."""
    from xcit import bench, create_model
    torch.manual_seed(0)
    model = create_model(name).to(device).eval()
    static_x = torch.randn(batch, 3, settings.img_size, settings.img_size, device=device)

    def forward():
        # no autocast cache: its casts of the weights would be freed under the graph
        with torch.inference_mode(), torch.autocast('cuda', dtype=torch.bfloat16, cache_enabled=False):
            return model(static_x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (and let the fast paths choose) off the capture
        for _ in range(3):
            forward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = forward()
    static_x.copy_(torch.randn_like(static_x))
    graph.replay()
    replayed = static_out.float().clone()
    eager = forward().float()
    max_diff = float((replayed - eager).abs().max())
    times = bench.timed_in_turns({'eager': forward, 'graph': graph.replay}, settings.rounds, settings.iters * 5, device)
    return dict(model=name, batch=batch, img_size=settings.img_size, max_abs_diff=max_diff,
                matches=max_diff <= 1e-2 * max(1.0, float(eager.abs().max())),
                eager_ms=round(statistics.median([t for r in times['eager'] for t in r]), 3),
                graph_ms=round(statistics.median([t for r in times['graph'] for t in r]), 3))


def stage_graphs(report: dict, save: Callable[[], None], settings: Settings, device: str, budget_s: float) -> None:
    """A CUDA graph of a fixed-shape bf16 inference replays what eager computes; and how long each takes."""
    if device != 'cuda':
        report['reason'] = 'CUDA graphs need a CUDA device'
        return
    for name, batch in settings.graph_cases:
        try:
            row = graph_case(name, batch, settings, device)
            print(f"  {name} b{batch}: replay matches eager {row['matches']} (max diff {row['max_abs_diff']:.2e}); "
                  f"eager {row['eager_ms']:.3f} ms, graph {row['graph_ms']:.3f} ms")
        except Exception as e:  # a capture that fails is a finding: record it, try the next model
            row = dict(model=name, batch=batch, img_size=settings.img_size, matches=False,
                       error=f'{type(e).__name__}: {str(e)[:300]}')
            print(f"  {name} b{batch}: {row['error']}")
        report['rows'].append(row)
        free_memory()
        save()
    report['passed'] = all(r['matches'] for r in report['rows'])


def stage_explain(report: dict, save: Callable[[], None], settings: Settings, device: str, budget_s: float) -> None:
    """Graph breaks torch.compile would meet in an XCiT forward, inference and training, under bf16 autocast."""
    from xcit import create_model
    model = create_model(settings.explain_model).to(device)
    x = torch.randn(2, 3, settings.img_size, settings.img_size, device=device)
    for mode in ('infer', 'train'):
        model.train(mode == 'train')
        torch._dynamo.reset()
        with torch.autocast(device, dtype=torch.bfloat16), (torch.inference_mode() if mode == 'infer'
                                                             else contextlib.nullcontext()):
            explained = torch._dynamo.explain(model)(x)
        row = dict(model=settings.explain_model, mode=mode, graphs=explained.graph_count,
                   graph_breaks=explained.graph_break_count, ops=explained.op_count,
                   break_reasons=[str(r)[:300] for r in explained.break_reasons][:5])
        report['rows'].append(row)
        print(f"  {settings.explain_model} {mode}: {row['graphs']} graph(s), {row['graph_breaks']} break(s)")
    torch._dynamo.reset()
    report['passed'] = all(r['graph_breaks'] == 0 for r in report['rows'])
    save()


def stage_sweep(report: dict, save: Callable[[], None], settings: Settings, device: str, budget_s: float) -> None:
    """bf16 inference of ours and a token-attention ViT of the same width, side by side at each size."""
    from xcit import bench
    models = [(settings.sweep_model, 'xcit'), (settings.sweep_baseline, 'timm')]
    for size in settings.sweep_sizes:
        if deadline_left(budget_s) <= 0:
            report['notes'].append(f'{size} px: skipped, past the budget')
            continue
        steps = {}
        for name, impl in models:
            torch.manual_seed(0)
            steps[name] = bench.make_step(bench.build_model(name, impl, size, device), 'infer', settings.sweep_batch,
                                          size, device, autocast=torch.bfloat16)
            bench._timed(steps[name], settings.warmup, device)
        times = bench.timed_in_turns(steps, settings.rounds, settings.iters, device)
        for name, impl in models:
            peak = bench.step_peak_mb(steps[name], device)
            result = bench.summarize(name, impl, 'infer', settings.sweep_batch, size, times[name],
                                     *bench.count_macs(name, size), device, peak)
            report['rows'].append(dict(asdict(result), precision='bf16'))
            print(f'  {size:>5} px {name:<26} {result.step_time_ms:9.3f} ms  {result.peak_mb:9.1f} MB')
        del steps
        free_memory()
        save()


class GivenQKV(nn.Module):
    """Stands in for XCA's qkv projection and hands back a stored (B, N, 3C) tensor, so that only the
    core (normalise, cross-covariance, softmax, mix) is timed."""

    def __init__(self, qkv: torch.Tensor):
        super().__init__()
        self.register_buffer('value', qkv, persistent=False)

    @property
    def weight(self) -> torch.Tensor:  # what XCA asks whether autograd records
        return self.value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.value


XCA_VARIANTS = {  # label: (xca_impl, fast path, compiled)
    'reference': ('matmul', 'reference', False),
    'channel_major': ('matmul', 'fast', False),  # under autocast the first fast candidate
    'sdpa': ('sdpa', 'fast', False),
    'reference-compiled': ('matmul', 'reference', True),
    'triton': ('triton', 'fast', False),  # 'fast': whether the kernel is a branch of its own or a fast-path candidate
}


def xca_case(scope: str, kernel: str, path: str, base: nn.Module, x: torch.Tensor, qkv: torch.Tensor, train: bool):
    """(module, its input, the tensor whose gradient is compared): for scope 'core' an XCA reduced to its core
    (qkv given, proj the identity; the input only lends its shape), for 'module' the whole XCA on `x`, both
    with `base`'s weights."""
    from xcit.models.xcit import XCA
    C, h = x.shape[-1], base.num_heads
    xca = XCA(C, h, kernel=kernel, impl=path).to(x.device)
    xca.load_state_dict(base.state_dict())
    if scope == 'core':
        xca.qkv, xca.proj = GivenQKV(qkv.clone().requires_grad_(train)), nn.Identity()
        return xca, torch.empty_like(x), xca.qkv.value
    leaf = x.clone().requires_grad_(train)
    return xca, leaf, leaf


def xca_run(xca: nn.Module, inp: torch.Tensor, leaf: torch.Tensor, grad_out: torch.Tensor, train: bool,
            autocast: torch.dtype | None) -> Callable[[], torch.Tensor]:
    """A forward (with `train`, and backward) of `xca` on `inp` under `autocast`, gradients cleared first."""
    device = inp.device.type

    def run():
        if train:
            xca.zero_grad(set_to_none=True)
            leaf.grad = None
        precision = torch.autocast(device, dtype=autocast) if autocast else contextlib.nullcontext()
        with torch.set_grad_enabled(train), precision:
            out = xca(inp)
        if train:
            out.backward(grad_out)
        return out
    return run


def stage_xca(report: dict, save: Callable[[], None], settings: Settings, device: str, budget_s: float) -> None:
    """XCA at N tokens, bf16 autocast, every implementation side by side, forward and forward + backward:
    the core alone (from a given qkv, no projections), then the whole module (with them, the same in every
    implementation). Each one's distance from the float32 reference maths is recorded, output and gradient."""
    from xcit import bench
    from xcit.models import compile_static
    from xcit.models.xcit import XCA, XCA_KERNELS
    B, N, C, h = settings.xca_shape
    torch.manual_seed(0)
    base = XCA(C, h).to(device)
    with torch.no_grad():
        base.temperature.uniform_(0.5, 1.5)
    x = torch.randn(B, N, C, device=device)
    with torch.no_grad():
        qkv = base.qkv(x)
    grad_out = torch.randn(B, N, C, device=device)
    variants = {k: v for k, v in XCA_VARIANTS.items() if v[0] in XCA_KERNELS}
    if 'triton' not in XCA_KERNELS:
        report['notes'].append(f"xca_impl='triton' is not in this tree (XCA_KERNELS: {', '.join(XCA_KERNELS)}): "
                               'not measured')
        print(f"  {report['notes'][-1]}")
    for scope in ('core', 'module'):
        for mode in ('infer', 'train'):
            train = mode == 'train'
            exact_xca, inp, leaf = xca_case(scope, 'matmul', 'reference', base, x, qkv, train)
            out_exact = xca_run(exact_xca, inp, leaf, grad_out, train, None)().detach()
            grad_exact = leaf.grad.clone() if train else None
            runs, rows = {}, {}
            for label, (kernel, path, compiled) in variants.items():
                if compiled and scope == 'module':
                    continue  # one compile per mode is enough to see what inductor makes of the core
                try:
                    xca, inp, leaf = xca_case(scope, kernel, path, base, x, qkv, train)
                    if compiled:
                        xca = compile_static(xca, backend=settings.compile_backend)
                    run = xca_run(xca, inp, leaf, grad_out, train, torch.bfloat16)
                    compile_s = first_call_s(run, device)
                    out = run().detach().float()
                    row = dict(variant=label, scope=scope, mode=mode, B=B, N=N, C=C, heads=h, precision='bf16',
                               compile_s=round(compile_s, 1) if compiled else None,
                               rel_err=float((out - out_exact).norm() / out_exact.norm()),
                               max_abs_err=float((out - out_exact).abs().max()))
                    if train:
                        row['grad_rel_err'] = float((leaf.grad.float() - grad_exact).norm() / grad_exact.norm())
                    bench._timed(run, settings.warmup, device)
                except Exception as e:  # one implementation failing must not hide the others
                    report['notes'].append(f'{scope} {mode} {label}: {type(e).__name__}: {str(e)[:300]}')
                    print(f"  {report['notes'][-1]}")
                    continue
                runs[label], rows[label] = run, row
            times = bench.timed_in_turns(runs, settings.rounds, settings.iters * 5, device)
            for label, row in rows.items():
                row.update(step_time_ms=round(statistics.median([t for r in times[label] for t in r]), 4),
                           round_medians_ms=[round(statistics.median(r), 4) for r in times[label]])
                report['rows'].append(row)
                grad = f", gradient {row['grad_rel_err']:.1e}" if train else ''
                print(f"  {scope:<6} {mode:<5} {label:<20} {row['step_time_ms']:8.4f} ms  "
                      f"error vs float32 {row['rel_err']:.1e}{grad}")
            del runs
            free_memory()
            save()


STAGE_FUNCTIONS = dict(compare=stage_compare, correctness=stage_correctness, graphs=stage_graphs,
                       explain=stage_explain, sweep=stage_sweep, xca=stage_xca, compiled=stage_compiled)


# --- the closing table --------------------------------------------------------------------------------------

def print_summary(data: dict) -> None:
    env, stages = data['environment'], data['stages']
    print('\n==== summary ' + '=' * 80)
    print(f"{env.get('gpu', env.get('device'))} | driver {env.get('driver')} | CUDA {env.get('cuda_build')} | "
          f"torch {env.get('torch')} | timm {env.get('timm')} | triton {env.get('triton')} | "
          f"xca kernels {','.join(env.get('xca_kernels', []))}")
    for name in ('compare', 'compiled'):
        stage = stages.get(name, {})
        if not stage.get('rows'):
            continue
        print(f'\n{name}: step ms (ours | timm), our throughput over timm\'s (range over rounds), peak MB above live, '
              f'our TFLOP/s' + (', compile s (ours | timm)' if name == 'compiled' else ''))
        rows = {(r['model'], r['mode'], r['precision'], r['channels_last'], r['compiled'], r['impl']): r
                for r in stage['rows']}
        ratios = {(r['model'], r['mode'], r['precision'], r['channels_last'], r['compiled']): r
                  for r in stage.get('ratios', [])}
        models = list(dict.fromkeys(r['model'] for r in stage['rows']))
        for key, ratio in sorted(ratios.items(), key=lambda kv: (models.index(kv[0][0]), kv[0][2:], kv[0][1])):
            ours, timm = rows.get((*key, 'xcit')), rows.get((*key, 'timm'))
            if ours is None or timm is None:
                continue
            model, mode, precision, channels_last, compiled = key
            low, high = ratio['speedup_range']
            setting = f"{precision}{' CL' if channels_last else ''}{' compiled' if compiled else ''}"
            compile_s = (f"  {ours['compile_s']:5.1f} | {timm['compile_s']:5.1f}" if compiled else '')
            print(f"  {model.removeprefix('xcit_'):<16} b{ours['batch_size']:<4} {mode:<5} {setting:<16}"
                  f" {ours['step_time_ms']:8.2f} | {timm['step_time_ms']:8.2f}  x{ratio['speedup']:.2f}"
                  f" ({low:.2f}-{high:.2f})  {ours['peak_mb']:8.0f} | {timm['peak_mb']:8.0f}"
                  f"  {ours['tflops']:6.1f}{compile_s}")
    sweep = stages.get('sweep', {}).get('rows', [])
    if sweep:
        names = list(dict.fromkeys(r['model'] for r in sweep))
        print(f"\nsweep (bf16 inference, batch {sweep[0]['batch_size']}): ms and peak MB above live")
        print(f"  {'px':>5} {'tokens':>6}" + ''.join(f" | {n.removesuffix('_224')[:21]:>21}" for n in names))
        points = {(r['model'], r['img_size']): r for r in sweep}
        for size in dict.fromkeys(r['img_size'] for r in sweep):
            cells = ''.join(f" | {points[n, size]['step_time_ms']:10.3f} {points[n, size]['peak_mb']:10.1f}"
                            if (n, size) in points else f" | {'-':>21}" for n in names)
            tokens = next(r['tokens'] for r in sweep if r['img_size'] == size)
            print(f'  {size:>5} {tokens:>6}{cells}')
    xca = stages.get('xca', {})
    if xca.get('rows'):
        B, N, C, h = (xca['rows'][0][k] for k in ('B', 'N', 'C', 'heads'))
        print(f'\nxca (B={B} N={N} C={C} h={h}, bf16): ms, relative error vs float32 (output, gradient)')
        for r in xca['rows']:
            grad = f" / {r['grad_rel_err']:.1e}" if 'grad_rel_err' in r else ''
            compile_s = f"  compile {r['compile_s']} s" if r.get('compile_s') is not None else ''
            print(f"  {r['scope']:<6} {r['mode']:<5} {r['variant']:<20} {r['step_time_ms']:9.4f}  "
                  f"{r['rel_err']:.1e}{grad}{compile_s}")
    for note in xca.get('notes', []):
        print(f'  xca: {note}')
    correctness = stages.get('correctness', {}).get('rows', [])
    if correctness:
        bad = [r for r in correctness if not r['finite']]
        worst = max((r['rel_err'] for r in correctness if 'rel_err' in r), default=float('nan'))
        print(f"\ncorrectness: {len(correctness) - len(bad)}/{len(correctness)} finite "
              f"(sizes {sorted({r['size'] for r in correctness})}, fp16 and bf16); worst relative error vs "
              f"float32 {worst:.2e}")
        for r in bad:
            print(f"  NOT FINITE: {r['check']} {r['size']} px {r['precision']} {r['kernel']}/{r['path']}"
                  + (f" ({r['error']})" if 'error' in r else ''))
    for r in stages.get('graphs', {}).get('rows', []):
        if 'error' in r:
            print(f"graphs: {r['model']} b{r['batch']} FAILED: {r['error']}")
            continue
        print(f"graphs: {r['model']} b{r['batch']} replay matches {r['matches']} (max diff {r['max_abs_diff']:.1e}),"
              f" eager {r['eager_ms']:.3f} ms, replay {r['graph_ms']:.3f} ms")
    for r in stages.get('explain', {}).get('rows', []):
        print(f"explain: {r['model']} {r['mode']}: {r['graphs']} graph(s), {r['graph_breaks']} graph break(s)")
    print('\nstages: ' + ', '.join(f"{name} {s['status']} ({s.get('seconds', 0):.0f} s)" for name, s in stages.items()))
    for name, s in stages.items():
        for error in ([s['error'].strip().splitlines()[-1]] if s.get('error') else []) + s.get('errors', []):
            print(f'  {name}: {error[:200]}')
    print(f"total {data.get('elapsed_s', elapsed()):.0f} s")


# --- running it ------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', type=Path, default=REPO / 'benchmarks' / 'results' / 'h200',
                   help='folder for gpu.json (rewritten after each unit of work)')
    p.add_argument('--stages', default=','.join(STAGES), help=f"comma-separated, from {', '.join(STAGES)}")
    p.add_argument('--models', help='comma-separated: only these of the compare and compiled cases')
    p.add_argument('--quick', action='store_true', help='fewer rounds, sizes and compiles: a first look in ~3 min')
    p.add_argument('--budget-s', type=float, default=330.0,
                   help='skip the stages (and compiles) that would start after this many seconds')
    p.add_argument('--device', default='cuda', choices=['cuda', 'cpu'], help=argparse.SUPPRESS)  # cpu: a dry run
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> list[str]:
    """The stages asked for; ValueError with one line for bad input."""
    stages = [s.strip() for s in args.stages.split(',') if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise ValueError(f"--stages: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(STAGES)}")
    known = [name for name, _ in MAIN_CASES + settings_for(args.device, True).cases]
    args.models = [m.strip() for m in (args.models or '').split(',') if m.strip()]
    if [m for m in args.models if m not in known]:
        raise ValueError(f"--models: choose from {', '.join(dict.fromkeys(known))}")
    if not args.budget_s >= 0:
        raise ValueError(f'--budget-s must be a number of seconds >= 0, not {args.budget_s}')
    return [s for s in STAGES if s in stages]


def cuda_usable() -> bool:
    """Whether the CUDA context still runs work (a kernel fault leaves it broken for the whole process)."""
    try:
        return bool(torch.ones(1, device='cuda').add(1).sum().item() == 2)
    except Exception:
        return False


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        stages = check_args(args)
    except ValueError as e:
        print(f'gpu.py: {e}', file=sys.stderr)
        return 2
    if args.device == 'cuda' and not torch.cuda.is_available():
        print(f'gpu.py: no CUDA GPU is visible (torch {torch.__version__}, built for CUDA {torch.version.cuda}); '
              'nothing measured', file=sys.stderr)
        return 2
    try:
        import xcit  # noqa: F401
    except ImportError as e:
        print(f'gpu.py: cannot import xcit ({e}); run with PYTHONPATH=src, or through benchmarks/gpu.sh, which '
              'installs the wheels in .whl first', file=sys.stderr)
        return 2
    if args.device == 'cuda':
        torch.backends.cudnn.benchmark = True  # fixed shapes: every implementation gets its best conv algorithms
    # every model and mode compiled here is a new graph of the same forward code; the default limit of 8 would
    # fall back to eager without saying so in the timings
    torch._dynamo.config.recompile_limit = 64
    settings = settings_for(args.device, args.quick)
    if args.models:
        settings.cases = [c for c in settings.cases if c[0] in args.models]
        settings.compiled_cases = [c for c in settings.compiled_cases if c[0] in args.models]
    report = Report(args.out, args, settings)
    signal.signal(signal.SIGTERM, _stop)
    status = 0
    try:
        report.data['environment'] = env = environment(args.device)
        print(f"{env.get('gpu', 'no GPU (dry run)')} | driver {env.get('driver')} | CUDA {env['cuda_build']} | "
              f"torch {env['torch']} | timm {env['timm']} | triton {env['triton']} | python {platform.python_version()}"
              f" | xca kernels {','.join(env['xca_kernels'])}", flush=True)
        report.save()
        broken = None
        for name in stages:
            stage = report.stage(name)
            if broken:
                stage.update(status='skipped', reason=broken)
            elif deadline_left(args.budget_s) <= 0:
                stage.update(status='skipped', reason=f'past the budget of {args.budget_s:.0f} s')
            if stage['status'] == 'skipped':
                print(f"== {name}: skipped ({stage['reason']})")
                report.save()
                continue
            print(f'== {name} ({elapsed():.0f} s in)', flush=True)
            start = time.monotonic()
            try:
                STAGE_FUNCTIONS[name](stage, report.save, settings, args.device, args.budget_s)
                passed = stage.get('passed', True) and not stage.get('errors')
                stage['status'] = 'skipped' if 'reason' in stage else 'ok' if passed else 'failed'
            except Exception:
                stage.update(status='error', error=traceback.format_exc())
                print(stage['error'], file=sys.stderr, flush=True)
                free_memory()
                if args.device == 'cuda' and not cuda_usable():
                    broken = f'the CUDA context is unusable after {name}'
            stage['seconds'] = round(time.monotonic() - start, 1)
            status = status or int(stage['status'] in ('error', 'failed'))
            report.save()
    except Stopped as e:
        for stage in report.data['stages'].values():
            if stage['status'] == 'running':
                stage.update(status='stopped', reason=str(e))
        status = 1
    report.save()
    print_summary(report.data)
    print(f'wrote {report.path}')
    return status


if __name__ == '__main__':
    sys.exit(main())
