"""Time and memory versus input size: the measurement behind XCiT's linear-cost claim.

Each (model, resolution) point runs in a fresh process, so the memory peak of
one point cannot hide in memory the allocator kept from another. On CUDA the
peak is the caching allocator's `max_memory_allocated`; on a CPU it is the
growth of the process's peak resident set (Linux `VmHWM`, reset before the
first forward pass) over its size before that pass.
"""
from __future__ import annotations

import math
import multiprocessing
import os
import platform
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

MAC_COUNTER = 'torch.utils.flop_counter (matmul + conv MACs)'


@dataclass
class BenchPoint:
    model: str
    resolution: int
    batch_size: int
    tokens: int
    gmacs: float  # per image
    ms_per_batch: float
    ms_spread: float  # (max - min) / 2 over the timed iterations
    peak_mb: float
    device: str


def count_macs(model_name: str, resolution: int) -> float:
    """GMACs of one image at `resolution`, counted on the meta device (nothing is computed)."""
    from torch.utils.flop_counter import FlopCounterMode

    from .models import create_model
    with torch.device('meta'):
        model = create_model(model_name).eval()
        with FlopCounterMode(display=False) as counter:
            model(torch.empty(1, 3, resolution, resolution))
    return counter.get_total_flops() / 2e9


def _read_proc_status_kb(field: str) -> int | None:
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(field + ':'):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset Linux's peak-RSS mark (VmHWM) to the current RSS; False where that is not possible."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


def _peak_rss_kb() -> int:
    hwm = _read_proc_status_kb('VmHWM')
    if hwm is not None:
        return hwm
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if platform.system() == 'Darwin' else peak


def measure_point(model_name: str, resolution: int, batch_size: int = 1, warmup: int = 1, iters: int = 3,
                  device: str = 'cpu', num_threads: int | None = None) -> BenchPoint:
    """Inference time and peak memory of one forward pass, in this process."""
    from .models import create_model
    if num_threads:
        torch.set_num_threads(num_threads)
    torch.manual_seed(0)
    model = create_model(model_name).eval().to(device)
    x = torch.randn(batch_size, 3, resolution, resolution, device=device)
    patch = model.patch_size
    tokens = math.ceil(resolution / patch) ** 2

    def sync():
        if device.startswith('cuda'):
            torch.cuda.synchronize()

    with torch.inference_mode():
        # the first pass is the one whose memory is measured: nothing is cached yet
        if device.startswith('cuda'):
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            model(x)
            sync()
            peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            _reset_peak_rss()
            base_kb = _read_proc_status_kb('VmRSS') or _peak_rss_kb()
            model(x)
            peak_mb = max(_peak_rss_kb() - base_kb, 0) / 1024
        for _ in range(max(warmup - 1, 0)):
            model(x)
        sync()
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            model(x)
            sync()
            times.append((time.perf_counter() - start) * 1e3)
    return BenchPoint(
        model=model_name, resolution=resolution, batch_size=batch_size, tokens=tokens,
        gmacs=round(count_macs(model_name, resolution), 3), ms_per_batch=round(statistics.median(times), 2),
        ms_spread=round((max(times) - min(times)) / 2, 2), peak_mb=round(peak_mb, 1), device=device)


def run_sweep(models: Sequence[str], resolutions: Sequence[int], isolate: bool = True, **kwargs) -> list[BenchPoint]:
    """Measure every model at every resolution, each point in a fresh process unless `isolate=False`."""
    points = []
    for name in models:
        for res in resolutions:
            if isolate:
                ctx = multiprocessing.get_context('spawn')
                with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
                    points.append(pool.submit(measure_point, name, res, **kwargs).result())
            else:
                points.append(measure_point(name, res, **kwargs))
    return points


def environment() -> dict:
    """What produced a measurement: enough to tell whether two are comparable."""
    from . import __version__
    info = dict(xcit=__version__, torch=torch.__version__, python=platform.python_version(),
                machine=platform.machine(), processor=platform.processor() or platform.machine(),
                cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(), mac_counter=MAC_COUNTER)
    if torch.cuda.is_available():
        info['cuda_device'] = torch.cuda.get_device_name()
    return info


def format_table(points: Sequence[BenchPoint]) -> str:
    """A text table with growth relative to each model's smallest resolution."""
    header = (f"{'model':<26} {'res':>5} {'tokens':>7} {'GMACs':>8} {'ms/batch':>10} {'peak MB':>9} "
              f"{'tokens x':>9} {'time x':>8} {'mem x':>7}")
    lines = [header, '-' * len(header)]
    first: dict[str, BenchPoint] = {}
    for p in points:
        base = first.setdefault(p.model, p)
        mem_ratio = f'{p.peak_mb / base.peak_mb:7.2f}' if base.peak_mb > 0 else f"{'-':>7}"
        lines.append(
            f'{p.model:<26} {p.resolution:>5} {p.tokens:>7} {p.gmacs:>8.2f} {p.ms_per_batch:>10.1f} '
            f'{p.peak_mb:>9.1f} {p.tokens / base.tokens:>9.2f} {p.ms_per_batch / base.ms_per_batch:>8.2f} '
            f'{mem_ratio}')
    return '\n'.join(lines)


def as_json(points: Sequence[BenchPoint]) -> dict:
    return dict(environment=environment(), points=[asdict(p) for p in points])
