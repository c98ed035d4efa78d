"""Benchmarks: throughput and peak memory, side by side with timm, and against input resolution.

Columns follow timm's benchmark.py (`infer_samples_per_sec`, `infer_step_time`,
`param_count`, `infer_gmacs`, the same with `train_`), plus peak memory.

- Implementations compared in one process are timed in alternating rounds, so
  a slow spell of the machine hits both; ratios are reported per round.
- Peak memory is measured in a fresh process per (model, implementation, mode),
  over the second step: the CUDA allocator's peak on a GPU; on a CPU the growth
  of the process's peak resident set (Linux VmHWM, reset first) over its size
  before the step, with glibc told to return large blocks on free so that the
  resident set follows live memory.
- A training step is timm's: forward, cross-entropy on random labels, backward, SGD step.
"""
from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import platform
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .allocator import freed_memory_kept, keep_freed_memory
from .models import compile_static

MAC_COUNTER = 'torch.utils.flop_counter (matmul + conv MACs)'
IMPLS = ('xcit', 'xcit-reference', 'xcit-sdpa', 'xcit-triton', 'xcit-compiled', 'xcit-optimized', 'timm',
         'timm-compiled')


@dataclass
class Result:
    model: str
    impl: str
    mode: str  # 'infer' or 'train'
    batch_size: int
    img_size: int
    tokens: int
    samples_per_sec: float
    step_time_ms: float  # median over all timed steps
    step_time_spread_ms: float  # half the range of the per-round medians
    peak_mb: float | None
    param_count_m: float
    gmacs: float  # per image, forward
    device: str
    round_medians_ms: list[float] | None = None  # one per alternating round, in order


def _compile(model: nn.Module) -> nn.Module:
    # inductor's pool of compile workers outlives compilation and slows every later eager run on a small
    # machine (timm's eager xcit_tiny_12_p8_224 by ~30 % on 2 cores): compile in this process instead
    import torch._inductor.config
    torch._inductor.config.compile_threads = 1
    return compile_static(model)


def build_model(name: str, impl: str, img_size: int, device: str = 'cpu') -> nn.Module:
    """`impl`: xcit (eager), xcit-reference (eager, every layer on its reference maths: what the fast paths
    are timed against), xcit-sdpa and xcit-triton (eager, that xca_impl), xcit-compiled, xcit-optimized
    (optimize_for_inference), timm, timm-compiled.

    Non-xcit model names (a token-attention baseline such as deit_small_patch16_224)
    are built by timm for its impls, at `img_size` so that their position embedding fits.
    """
    from .factory import create_model
    from .models import optimize_for_inference, set_fast_path
    from .registry import is_model
    if impl not in IMPLS:
        raise ValueError(f"unknown implementation {impl!r}; choose from {', '.join(IMPLS)}")
    if impl.startswith('xcit'):
        if not is_model(name):
            raise ValueError(f'{name} is not an xcit model; compare it with --impls timm')
        kwargs = dict(xca_impl=impl.removeprefix('xcit-')) if impl in ('xcit-sdpa', 'xcit-triton') else {}
        model = create_model(name, **kwargs).to(device)
        if impl == 'xcit-reference':
            return set_fast_path(model, 'reference')
        if impl == 'xcit-optimized':
            return _compile(optimize_for_inference(model, compile=False))
        return _compile(model) if impl == 'xcit-compiled' else model
    import timm
    kwargs = {} if name.startswith('xcit') else dict(img_size=img_size)
    model = timm.create_model(name, **kwargs).to(device)
    return _compile(model) if impl == 'timm-compiled' else model


def make_step(model: nn.Module, mode: str, batch_size: int, img_size: int, device: str,
              autocast: torch.dtype | None = None, channels_last: bool = False,
              optimizer: str = 'sgd') -> Callable[[], None]:
    """One inference or training step of `model` on a fixed random batch.

    `autocast`: run the forward (and the loss) under torch.autocast in that dtype, the weights staying float32.
    `channels_last`: the model's 4-D weights and the images in that memory format.
    `optimizer`: 'sgd' (timm benchmark.py's step) or 'adamw'.
    """
    if optimizer not in ('sgd', 'adamw'):
        raise ValueError(f"optimizer must be 'sgd' or 'adamw', not {optimizer!r}")
    x = torch.randn(batch_size, 3, img_size, img_size, device=device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    def precision():
        if autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(device).type, dtype=autocast)
    if mode == 'infer':
        model.eval()

        def step():
            with torch.inference_mode(), precision():
                model(x)
        return step
    model.train()
    num_classes = 1000
    targets = torch.randint(0, num_classes, (batch_size,), device=device)
    if optimizer == 'adamw':
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=1e-6)

    def step():
        opt.zero_grad(set_to_none=True)
        with precision():
            loss = F.cross_entropy(model(x), targets)
        loss.backward()
        opt.step()
    return step


def _timed(step: Callable[[], None], iters: int, device: str) -> list[float]:
    """Milliseconds of each of `iters` calls of `step`. On CUDA, between events recorded on the stream around
    each call, waited for once at the end: the host queues steps ahead as it would in training, and a step
    bound by its kernel launches still shows the device idling between them."""
    if device.startswith('cuda'):
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            start.record()
            step()
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) for start, end in events]
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def timed_in_turns(steps: dict[str, Callable[[], None]], rounds: int, iters: int,
                   device: str) -> dict[str, list[list[float]]]:
    """Each step's times (ms), round by round: in every round each step runs `iters` times, one after the
    other, so that a slow spell of the machine hits them all alike."""
    times: dict[str, list[list[float]]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            times[name].append(_timed(step, iters, device))
    return times


def count_macs(name: str, img_size: int) -> tuple[float, float]:
    """(GMACs of one image, parameters in millions), counted on the meta device (nothing is computed)."""
    from torch.utils.flop_counter import FlopCounterMode

    from .factory import create_model
    from .registry import is_model
    with torch.device('meta'):
        if is_model(name):
            model = create_model(name).eval()
        else:
            import timm
            model = timm.create_model(name, img_size=img_size).eval()
        params = sum(p.numel() for p in model.parameters()) / 1e6
        with FlopCounterMode(display=False) as counter:
            model(torch.empty(1, 3, img_size, img_size))
    return counter.get_total_flops() / 2e9, params


def _tokens(name: str, img_size: int) -> int:
    patch = 8 if '_p8_' in name else 16
    return math.ceil(img_size / patch) ** 2


# --- memory, in a fresh process ------------------------------------------------------------------------

def _read_status_kb(field: str) -> int | None:
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(field + ':'):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _peak_rss_kb() -> int:
    hwm = _read_status_kb('VmHWM')
    if hwm is not None:
        return hwm
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if platform.system() == 'Darwin' else peak


def step_peak_mb(step: Callable[[], None], device: str) -> float:
    """Peak memory of one call of a warmed-up `step` above what was live before it (weights, inputs)."""
    if device.startswith('cuda'):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')  # resets VmHWM to the current resident set
    except OSError:
        pass
    base = _read_status_kb('VmRSS') or _peak_rss_kb()
    step()
    return max(_peak_rss_kb() - base, 0) / 1024


def _measure_peak_mb(name: str, impl: str, mode: str, batch_size: int, img_size: int, device: str,
                     fast_paths: dict) -> float:
    from .models.fastpath import CHOOSER
    CHOOSER.load_state_dict(fast_paths)  # the paths the timed run took, not a fresh draw of them
    torch.manual_seed(0)
    model = build_model(name, impl, img_size, device)
    step = make_step(model, mode, batch_size, img_size, device)
    step()  # one-time costs (lazy imports, kernel caches, compilation, gradient buffers) are not the step's
    return step_peak_mb(step, device)


# glibc hands every block of 64 KiB or more back to the system when it is freed, so the resident set
# follows live memory and a second step's peak is not hidden by blocks the first one left cached
_MALLOC_ENV = {'MALLOC_MMAP_THRESHOLD_': '65536', 'MALLOC_TRIM_THRESHOLD_': '65536'}


def in_fresh_process(fn: Callable[..., float], *args) -> float:
    """`fn(*args)` in a spawned process whose resident set follows live memory, so that its peak is the step's."""
    saved = {k: os.environ.get(k) for k in _MALLOC_ENV}
    os.environ.update(_MALLOC_ENV)
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context('spawn')) as pool:
            return pool.submit(fn, *args).result()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def peak_memory_mb(name: str, impl: str, mode: str, batch_size: int, img_size: int, device: str = 'cpu') -> float:
    """Peak memory of one (warmed-up) step, measured in a fresh process on the fast paths chosen in this one."""
    from .models.fastpath import CHOOSER
    return in_fresh_process(_measure_peak_mb, name, impl, mode, batch_size, img_size, device, CHOOSER.state_dict())


# --- side by side ------------------------------------------------------------------------------------

def compare(name: str, impls: Sequence[str] = ('xcit', 'timm'), modes: Sequence[str] = ('infer', 'train'),
            batch_size: int = 32, img_size: int = 224, rounds: int = 5, iters: int = 3, warmup: int = 2,
            device: str = 'cpu', memory: bool = True) -> list[Result]:
    """Time every implementation in alternating rounds in this process (whose freed memory is kept, as a
    training run's is: see `xcit.allocator`); measure memory in fresh ones."""
    keep_freed_memory()
    gmacs, params = count_macs(name, img_size)
    results = []
    for mode in modes:
        steps = {}
        for impl in impls:
            if mode == 'train' and impl == 'xcit-optimized':
                continue  # inference only
            torch.manual_seed(0)
            steps[impl] = make_step(build_model(name, impl, img_size, device), mode, batch_size, img_size, device)
            _timed(steps[impl], warmup, device)
        times = timed_in_turns(steps, rounds, iters, device)
        for impl in steps:
            peak = peak_memory_mb(name, impl, mode, batch_size, img_size, device) if memory else None
            results.append(summarize(name, impl, mode, batch_size, img_size, times[impl], gmacs, params, device, peak))
        del steps
    return results


def summarize(name: str, impl: str, mode: str, batch_size: int, img_size: int, rounds: Sequence[Sequence[float]],
              gmacs: float, params: float, device: str, peak_mb: float | None = None) -> Result:
    """A Result from the step times (ms) of each alternating round: the median over all of them, and the
    spread and ratios over the rounds' medians."""
    per_round = [statistics.median(r) for r in rounds]
    median = statistics.median([t for r in rounds for t in r])
    return Result(name, impl, mode, batch_size, img_size, _tokens(name, img_size),
                  samples_per_sec=round(batch_size / median * 1e3, 2), step_time_ms=round(median, 3),
                  step_time_spread_ms=round((max(per_round) - min(per_round)) / 2, 3),
                  peak_mb=None if peak_mb is None else round(peak_mb, 1), param_count_m=round(params, 3),
                  gmacs=round(gmacs, 3), device=device, round_medians_ms=[round(t, 3) for t in per_round])


def ratios(results: Sequence[Result], reference: str = 'timm') -> list[dict]:
    """Throughput and memory of each implementation relative to `reference` (same model and mode)."""
    rows = []
    for r in results:
        base = next((b for b in results if b.impl == reference and (b.model, b.mode) == (r.model, r.mode)), None)
        if base is None or r.impl == reference:
            continue
        rows.append(dict(model=r.model, mode=r.mode, impl=r.impl,
                         speedup=round(r.samples_per_sec / base.samples_per_sec, 3),
                         speedup_range=_round_ratio_range(base, r),
                         memory_ratio=(round(r.peak_mb / base.peak_mb, 3)
                                       if r.peak_mb is not None and base.peak_mb else None)))
    return rows


def _round_ratio_range(base: Result, r: Result) -> tuple[float, float]:
    """The lowest and highest of the per-round throughput ratios of one `compare` run: the rounds ran in
    turns, so round i of both shares the machine's state of that moment."""
    per_round = [b / t for b, t in zip(base.round_medians_ms, r.round_medians_ms, strict=True)]
    return round(min(per_round), 3), round(max(per_round), 3)


def timm_rows(results: Sequence[Result]) -> list[dict]:
    """One row per (model, impl) with timm benchmark.py's column names."""
    rows: dict[tuple[str, str], dict] = {}
    for r in results:
        row = rows.setdefault((r.model, r.impl), dict(model=r.model, impl=r.impl, param_count=r.param_count_m,
                                                       device=r.device))
        row.update({f'{r.mode}_samples_per_sec': r.samples_per_sec, f'{r.mode}_step_time': r.step_time_ms,
                    f'{r.mode}_step_time_spread': r.step_time_spread_ms, f'{r.mode}_batch_size': r.batch_size,
                    f'{r.mode}_img_size': r.img_size, f'{r.mode}_gmacs': r.gmacs, f'{r.mode}_peak_mb': r.peak_mb})
    return list(rows.values())


# --- resolution sweep ---------------------------------------------------------------------------------

def _sweep_point(name: str, impl: str, img_size: int, batch_size: int, iters: int, warmup: int, device: str) -> Result:
    torch.manual_seed(0)
    step = make_step(build_model(name, impl, img_size, device), 'infer', batch_size, img_size, device)
    _timed(step, warmup, device)
    times = _timed(step, iters, device)
    gmacs, params = count_macs(name, img_size)
    median = statistics.median(times)
    return Result(name, impl, 'infer', batch_size, img_size, _tokens(name, img_size),
                  samples_per_sec=round(batch_size / median * 1e3, 2), step_time_ms=round(median, 2),
                  step_time_spread_ms=round((max(times) - min(times)) / 2, 2), peak_mb=None,
                  param_count_m=round(params, 3), gmacs=round(gmacs, 3), device=device)


def resolution_sweep(models: Sequence[tuple[str, str]], resolutions: Sequence[int], batch_size: int = 1,
                     iters: int = 3, warmup: int = 1, device: str = 'cpu', memory: bool = True) -> list[Result]:
    """Inference time and peak memory of each (model, impl) at each square size, each point in a fresh process."""
    ctx = multiprocessing.get_context('spawn')
    results = []
    for name, impl in models:
        for res in resolutions:
            with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
                result = pool.submit(_sweep_point, name, impl, res, batch_size, iters, warmup, device).result()
            if memory:
                result.peak_mb = round(peak_memory_mb(name, impl, 'infer', batch_size, res, device), 1)
            results.append(result)
    return results


def plot_growth(ax, series: dict[str, list], x_key: str, key: str, quadratic: bool = False) -> None:
    """One line per series of `key` against `x_key`, with linear growth (and quadratic, dashed) drawn from its
    first point: what the sweeps' log-log panels share."""
    for i, (name, points) in enumerate(series.items()):
        points = [p for p in points if getattr(p, key)]
        if not points:
            continue
        xs, values, color = [getattr(p, x_key) for p in points], [getattr(p, key) for p in points], f'C{i}'
        ax.plot(xs, values, marker='o', color=color, label=name)
        ends = [xs[0], xs[-1]]
        ax.plot(ends, [values[0], values[0] * ends[1] / ends[0]], ':', color=color, alpha=0.6)
        if quadratic:
            ax.plot(ends, [values[0], values[0] * (ends[1] / ends[0]) ** 2], '--', color=color, alpha=0.35)


def plot_sweep(results: Sequence[Result], path) -> None:
    """Time and memory against tokens, log-log, with linear and quadratic slopes drawn through each first point."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    series: dict[str, list[Result]] = {}
    for r in results:
        series.setdefault(f'{r.model} ({r.impl})', []).append(r)
    for ax, key, label in ((axes[0], 'step_time_ms', 'time per batch (ms)'), (axes[1], 'peak_mb', 'peak memory (MB)')):
        plot_growth(ax, series, 'tokens', key, quadratic=True)
        ax.set(xscale='log', yscale='log', xlabel='tokens (image side in pixels)', ylabel=label)
        sizes = sorted({(r.tokens, r.img_size) for r in results})
        ax.set_xticks([n for n, _ in sizes], [f'{n}\n({side})' for n, side in sizes])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(alpha=0.3, which='both')
    axes[0].plot([], [], 'k:', label='linear in tokens')
    axes[0].plot([], [], 'k--', alpha=0.4, label='quadratic in tokens')
    axes[0].legend(fontsize=8)
    axes[0].set_title('inference time')
    axes[1].set_title('inference peak memory')
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def environment() -> dict:
    """What produced a measurement: enough to tell whether two are comparable."""
    from importlib.metadata import PackageNotFoundError, version
    from .models import default_fast_path
    from .models.fastpath import cpu_name
    from .models.layers import onednn_linear_works
    try:
        ours = version('xcit')
    except PackageNotFoundError:  # run from a source tree (PYTHONPATH=src) without installing it
        ours = 'not installed'
    info = dict(xcit=ours, torch=torch.__version__, python=platform.python_version(),
                machine=platform.machine(), processor=cpu_name(), cpu_count=os.cpu_count(),
                torch_threads=torch.get_num_threads(), fast_path=default_fast_path(),
                onednn_linear=onednn_linear_works(), freed_memory_kept=freed_memory_kept(),
                mac_counter=MAC_COUNTER, date=time.strftime('%Y-%m-%d'))
    try:
        import timm
        info['timm'] = timm.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info['cuda_device'] = torch.cuda.get_device_name()
    return info


def as_json(results: Sequence[Result], **extra) -> dict:
    return dict(environment=environment(), results=[asdict(r) for r in results], **extra)
