"""Where a step's time goes, and how far it is from the matmul-bound floor of this CPU.

    python benchmarks/profile_breakdown.py --json benchmarks/results/profile_after.json
    PYTHONPATH=<older checkout>/src python benchmarks/profile_breakdown.py --json .../profile_before.json
    python benchmarks/profile_breakdown.py --impl xcit,xcit-reference,timm   # timed in turns, one row each
    python benchmarks/profile_breakdown.py --impl xcit-compiled --modes infer   # or timm-compiled

Each op's self time (torch.profiler) falls into one of: matmul, convolution,
memory copy, elementwise + norms (everything else: GELU, LayerNorm, softmax,
BatchNorm, adds). The floor is the step's matmul + conv FLOPs at the fastest
float32 GEMM rate measured here (the best of oneDNN and torch.mm on a large
square product): no implementation of the same maths can beat it on this CPU.
Models and steps come from `xcit.bench` (`build_model`, `make_step`), so what is
profiled here is what `xcit bench` times; an older checkout with that module runs it too.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import xcit
from xcit import bench
from xcit.allocator import keep_freed_memory
from xcit.models.fastpath import cpu_name

CATEGORIES = {
    'matmul': {'addmm', 'mm', 'bmm', 'baddbmm', 'matmul', 'linear', '_linear_pointwise', 'onednn_linear',
               'onednn_mlp_gelu'},
    'convolution': {'convolution', 'mkldnn_convolution', 'conv2d', '_convolution', 'convolution_backward'},
    'memory copy': {'copy_', 'clone', 'contiguous', 'cat', '_to_copy', 'to', 'stack', 'empty_like', 'fill_',
                    'zero_', 'zeros_like'},
}
OTHER = 'elementwise + norms'
CASES = 'xcit_nano_12_p16_224:32,xcit_tiny_12_p8_224:8,xcit_small_12_p16_224:8'


def gemm_peak_gflops(size: int = 2048, repeats: int = 5) -> float:
    """The best float32 GEMM rate here, over torch.mm and oneDNN's linear."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    candidates = [lambda: torch.mm(a, b)]
    if hasattr(torch.ops.mkldnn, '_linear_pointwise'):
        candidates.append(lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, 'none', [], ''))
    best = float('inf')
    for run in candidates:
        try:
            run()
        except RuntimeError:
            continue
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best / 1e9


def make_step(name: str, impl: str, batch: int, img_size: int, mode: str, device: str = 'cpu'):
    """`xcit bench`'s step: its model for `impl` (any of `xcit bench`'s, bench.IMPLS) and its inference or training step."""
    torch.manual_seed(0)
    return bench.make_step(bench.build_model(name, impl, img_size, device), mode, batch, img_size, device)


def conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                       _output_padding, _groups, output_mask, out_shape=None, **_) -> int:
    """Each gradient of a convolution (input, weight) costs what its forward does. torch's own formula
    (2.14) counts a grouped conv's gradients as a dense conv's: LPI's depthwise 3x3 convs at C times
    their cost, which put XCiT-S's training floor at 1.4x its FLOPs."""
    # a conv's weight is (C_out, C_in / groups, k...): each output element takes prod(w[1:]) products;
    # a transposed conv's is (C_in, C_out / groups, k...): each input element gives that many
    forward = 2 * math.prod(x_shape if transposed else grad_out_shape) * math.prod(w_shape[1:])
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def count_flops(name: str, batch: int, img_size: int, mode: str) -> float:
    """Matmul and conv FLOPs of one step, counted on the meta device (every path takes plain PyTorch ops there)."""
    step = make_step(name, 'xcit', batch, img_size, mode, device='meta')
    formulas = {torch.ops.aten.convolution_backward: conv_backward_flop}
    with FlopCounterMode(display=False, custom_mapping=formulas) as counter:
        step()
    return counter.get_total_flops()


def shares_of_step(step) -> dict[str, float]:
    """Each category's share (%) of one profiled step's self time."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    seconds = dict.fromkeys([*CATEGORIES, OTHER], 0.0)
    for event in prof.key_averages():
        op = event.key.split('::')[-1]
        category = next((c for c, ops in CATEGORIES.items() if op in ops), OTHER)
        seconds[category] += event.self_cpu_time_total / 1e6
    profiled = sum(seconds.values())
    return {f'{c} %': round(100 * s / profiled, 1) for c, s in seconds.items()}


def profile(name: str, impls: list[str], batch: int, img_size: int, mode: str, peak_gflops: float,
            rounds: int = 5) -> list[dict]:
    """One row per implementation: its step time, timed in turns with the others (so that the machine's
    drift hits them alike), the floor, and the shares of one profiled step."""
    flops = count_flops(name, batch, img_size, mode)
    steps = {impl: make_step(name, impl, batch, img_size, mode) for impl in impls}
    shares = {}
    for impl, step in steps.items():
        step(), step()
        shares[impl] = shares_of_step(step)
    timings = {impl: [] for impl in impls}
    for _ in range(rounds):
        for impl, step in steps.items():
            start = time.perf_counter()
            step()
            timings[impl].append(time.perf_counter() - start)
    floor_ms = flops / peak_gflops / 1e6
    rows = []
    for impl in impls:
        step_ms = sorted(timings[impl])[rounds // 2] * 1e3
        rows.append(dict(model=name, impl=impl, batch=batch, mode=mode, step_ms=round(step_ms, 1),
                         floor_ms=round(floor_ms, 1), floor_fraction=round(floor_ms / step_ms, 3),
                         gflop=round(flops / 1e9, 3), **shares[impl]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--json', help='write the rows and the machine here')
    parser.add_argument('--modes', default='infer,train')
    parser.add_argument('--cases', default=CASES, help=f'MODEL:BATCH,... (default {CASES})')
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--impl', default='xcit',
                        help=f"comma-separated, timed in turns: from {', '.join(bench.IMPLS)} (default xcit)")
    parser.add_argument('--peak-gflops', type=float,
                        help='the GEMM rate to measure the floor by (default: measured now); pass one value to '
                             'every run that is to be compared, as the measured rate drifts with the machine')
    args = parser.parse_args()
    impls = args.impl.split(',')
    bad = [impl for impl in impls if impl not in bench.IMPLS]
    if bad:
        parser.error(f"unknown implementation(s) {', '.join(bad)}; choose from {', '.join(bench.IMPLS)}")
    keep_freed_memory()  # as `xcit bench` times its steps
    peak = args.peak_gflops or gemm_peak_gflops()
    cases = [(case.split(':')[0], int(case.split(':')[1])) for case in args.cases.split(',')]
    rows = [row for name, batch in cases for mode in args.modes.split(',')
            for row in profile(name, impls, batch, args.img_size, mode, peak)]
    columns = list(rows[0])
    print(f'{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__};'
          f' float32 GEMM peak {peak:.0f} GFLOP/s')
    print('  '.join(f'{c:>22}' if i == 0 else f'{c:>10}' for i, c in enumerate(columns)))
    for row in rows:
        print('  '.join(f'{row[c]!s:>22}' if i == 0 else f'{row[c]!s:>10}' for i, c in enumerate(columns)))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(date=time.strftime('%Y-%m-%d'), cpu=cpu_name(), torch=torch.__version__, threads=torch.get_num_threads(), gemm_peak_gflops=round(peak, 1),
                           xcit_source=xcit.__file__, rows=rows), f, indent=1)
        print(f'wrote {args.json}')


if __name__ == '__main__':
    main()
