"""`xcit bench`: throughput and peak memory, side by side with timm, or against input resolution;
with `--task dense`, the forward of detection backbones and their FPN against image size.

  xcit bench -m xcit_nano_12_p16_224 -b 32 --compare timm            ours vs timm, inference and training
  xcit bench -m xcit_small_12_p16_224 -b 8 --impls xcit,xcit-optimized,timm,timm-compiled --bench infer
  xcit bench -m xcit_nano_12_p16_224 --resolutions 224,384,512,768,1024 --plot sweep.png
  xcit bench --task dense --json dense.json --plot dense.png      XCiT-S12/16, ResNet-50 and Swin-T FPNs, 512-1600 px
"""
from __future__ import annotations

import argparse
import csv
import json
from dataclasses import asdict
from pathlib import Path

from .. import bench, bench_dense


def _int_list(text: str) -> list[int]:
    """Parsed in `run`, so that a bad list is one error line like every other bad input."""
    try:
        return [int(v) for v in text.split(',') if v.strip()]
    except ValueError:
        raise ValueError(f'--resolutions: expected comma-separated integers, got {text!r}') from None


def add_parser(sub) -> None:
    p = sub.add_parser('bench', help='throughput and memory, against timm or resolution', description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--task', choices=['classification', 'dense'], default='classification',
                   help='dense: backbone + FPN forward of detection models against image size (batch 1, inference)')
    p.add_argument('--model', '-m', help='comma-separated model names (default xcit_nano_12_p16_224; with --task '
                   f"dense, from {', '.join(bench_dense.BASELINES)} and XCiT backbones such as xcit_small_12_p16, "
                   f"default {','.join(bench_dense.DEFAULT_MODELS)})")
    p.add_argument('--impls', default='xcit', help=f"comma-separated, from {', '.join(bench.IMPLS)}")
    p.add_argument('--compare', choices=['timm'], help="add timm's implementation of the same models")
    p.add_argument('--bench', choices=['infer', 'train', 'both'], default='both')
    p.add_argument('--batch-size', '-b', type=int, default=32)
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--rounds', type=int, default=5, help='alternating timing rounds')
    p.add_argument('--iters', type=int, default=3, help='timed steps per implementation and round')
    p.add_argument('--warmup', type=int, help='untimed steps first (default 2; 1 for --task dense)')
    p.add_argument('--resolutions', help='sweep these square sizes instead (inference, batch 1; for --task dense '
                   f"default {','.join(map(str, bench_dense.DEFAULT_SIZES))})")
    p.add_argument('--baseline', default='deit_small_patch16_224',
                   help="token-attention model (timm) swept beside ours; 'none' to skip")
    p.add_argument('--plot', type=Path, help='with --resolutions or --task dense: write the log-log PNG here')
    p.add_argument('--no-memory', action='store_true', help='skip the (slower) peak-memory measurements')
    p.add_argument('--device', default='cpu')
    p.add_argument('--json', type=Path, help='write results and their environment as JSON')
    p.add_argument('--csv', type=Path, help='write timm-style result rows as CSV')
    p.set_defaults(run=run)


def _print_results(results) -> None:
    print(f"{'model':<24} {'impl':<15} {'mode':<5} {'batch':>5} {'img':>5} {'samples/s':>10} "
          f"{'step ms':>14} {'peak MB':>8} {'GMACs':>7}")
    for r in results:
        peak = f'{r.peak_mb:8.1f}' if r.peak_mb is not None else f"{'-':>8}"
        print(f'{r.model:<24} {r.impl:<15} {r.mode:<5} {r.batch_size:>5} {r.img_size:>5} {r.samples_per_sec:>10.1f} '
              f'{r.step_time_ms:>8.1f} ±{r.step_time_spread_ms:<5.1f} {peak} {r.gmacs:>7.2f}')


def _print_sweep(results) -> None:
    print(f"{'model':<26} {'impl':<8} {'res':>5} {'tokens':>7} {'GMACs':>8} {'ms':>9} {'peak MB':>8} "
          f"{'tokens x':>9} {'time x':>7} {'mem x':>6}")
    first = {}
    for r in results:
        base = first.setdefault((r.model, r.impl), r)
        mem = f'{r.peak_mb / base.peak_mb:6.2f}' if r.peak_mb and base.peak_mb else f"{'-':>6}"
        peak = f'{r.peak_mb:8.1f}' if r.peak_mb is not None else f"{'-':>8}"
        print(f'{r.model:<26} {r.impl:<8} {r.img_size:>5} {r.tokens:>7} {r.gmacs:>8.2f} {r.step_time_ms:>9.1f} '
              f'{peak} {r.tokens / base.tokens:>9.2f} {r.step_time_ms / base.step_time_ms:>7.2f} {mem}')


def _print_dense(results) -> None:
    """One row per size, time and memory side by side per model: growth against the pixels' growth at a glance."""
    models = list(dict.fromkeys(r.model for r in results))
    by_point = {(r.model, r.img_size): r for r in results}
    sizes = list(dict.fromkeys(r.img_size for r in results))
    print('backbone + FPN parameters (M): ' + ', '.join(
        f'{m} {next(r for r in results if r.model == m).param_count_m:.1f}' for m in models))
    print(f"{'':>5} {'':>6} {'':>8} {'':>7}" + ''.join(f' | {m[:19]:^19}' for m in models))
    print(f"{'side':>5} {'input':>6} {'tokens':>8} {'pixel x':>7}" + f" | {'ms':>9} {'MB':>9}" * len(models))
    first = by_point[models[0], sizes[0]]
    tokenized = next((m for m in models if by_point[m, sizes[0]].tokens is not None), models[0])  # XCiT's
    for size in sizes:
        row, tokens = by_point[models[0], size], by_point[tokenized, size].tokens
        tokens = f'{tokens:>8}' if tokens is not None else f"{'-':>8}"
        cells = ''
        for m in models:
            r = by_point[m, size]
            peak = f'{r.peak_mb:9.1f}' if r.peak_mb is not None else f"{'-':>9}"
            cells += f' | {r.step_time_ms:9.1f} {peak}'
        print(f'{size:>5} {row.input_size:>6} {tokens} {row.pixels / first.pixels:>7.2f}{cells}')


def _run_dense(args: argparse.Namespace) -> int:
    from ..models import fast_path_decisions
    models = [m for m in (args.model or ','.join(bench_dense.DEFAULT_MODELS)).split(',') if m]
    sizes = _int_list(args.resolutions) if args.resolutions else list(bench_dense.DEFAULT_SIZES)
    bench_dense.check_models(models)
    bench_dense.check_sizes(sizes)
    warmup = 1 if args.warmup is None else args.warmup
    if args.iters < 1 or warmup < 1:
        raise ValueError('--iters and --warmup must be at least 1 for --task dense')
    env = bench.environment()
    print(f"{env['processor']}, {env['torch_threads']} threads, torch {env['torch']}, device {args.device}; "
          f'backbone + FPN forward, batch 1, float32, inference, images padded to a multiple of '
          f'{bench_dense.SIZE_DIVISOR}')
    results = bench_dense.dense_sweep(models, sizes, iters=args.iters, warmup=warmup, device=args.device,
                                      memory=not args.no_memory)
    _print_dense(results)
    if args.plot:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        bench_dense.plot_dense(results, args.plot)
        print(f'wrote {args.plot}')
    extra = dict(task='dense', iters=args.iters, warmup=warmup, size_divisor=bench_dense.SIZE_DIVISOR,
                 fast_paths=fast_path_decisions())
    _write(args, results, extra, [asdict(r) for r in results])
    return 0


def _print_decisions() -> dict:
    """Which path each 'auto' layer took here, and the timings it was chosen by."""
    from ..models import fast_path_decisions
    decisions = fast_path_decisions()
    if decisions:
        print('fast paths chosen here (per operation, shape and mode; XCIT_FAST_PATH=reference|fast forces one):')
        width = max(map(len, decisions))
        for key, d in decisions.items():
            print(f"  {key:<{width}}  {d['path']:<20} {d['why']}")
    return decisions


def run(args: argparse.Namespace) -> int:
    from ..registry import is_model
    if args.task == 'dense':
        return _run_dense(args)
    models = [m for m in (args.model or 'xcit_nano_12_p16_224').split(',') if m]
    resolutions = _int_list(args.resolutions) if args.resolutions else None
    if resolutions is not None and (not resolutions or min(resolutions) < 16):
        raise ValueError(f'--resolutions: sizes must be integers >= 16, got {args.resolutions!r}')
    warmup = 2 if args.warmup is None else args.warmup
    impls = [i for i in args.impls.split(',') if i]
    if args.compare == 'timm':
        impls += [i.replace('xcit', 'timm') for i in impls if i in ('xcit', 'xcit-compiled')]
        impls = list(dict.fromkeys(impls))
    bad = [i for i in impls if i not in bench.IMPLS]
    if bad:
        raise ValueError(f"unknown implementation(s) {', '.join(bad)}; choose from {', '.join(bench.IMPLS)}")
    unknown = [m for m in models if not is_model(m)]
    if unknown:
        raise ValueError(f"unknown model(s): {', '.join(unknown)} (see `xcit models`)")
    if min(args.batch_size, args.rounds, args.iters) < 1 or warmup < 0:
        raise ValueError('--batch-size, --rounds and --iters must be at least 1, --warmup at least 0')
    env = bench.environment()
    print(f"{env['processor']}, {env['torch_threads']} threads, torch {env['torch']}, device {args.device}; "
          f"GMACs by {bench.MAC_COUNTER}")

    extra = {}
    if resolutions:
        swept = [(m, i) for m in models for i in impls]
        if args.baseline != 'none':
            swept.append((args.baseline, 'timm'))
        results = bench.resolution_sweep(swept, resolutions, device=args.device, memory=not args.no_memory,
                                         iters=args.iters, warmup=max(warmup, 1))
        _print_sweep(results)
        if args.plot:
            args.plot.parent.mkdir(parents=True, exist_ok=True)
            bench.plot_sweep(results, args.plot)
            print(f'wrote {args.plot}')
    else:
        modes = ['infer', 'train'] if args.bench == 'both' else [args.bench]
        results = []
        for name in models:
            results += bench.compare(name, impls, modes, args.batch_size, args.img_size, rounds=args.rounds,
                                     iters=args.iters, warmup=warmup, device=args.device,
                                     memory=not args.no_memory)
        _print_results(results)
        extra['fast_paths'] = _print_decisions()
        extra['ratios'] = bench.ratios(results) if any(i.startswith('timm') for i in impls) else []
        for row in extra['ratios']:
            memory = f", memory x{row['memory_ratio']:.2f}" if row['memory_ratio'] is not None else ''
            low, high = row['speedup_range']
            print(f"{row['model']} {row['mode']}: {row['impl']} is {row['speedup']:.2f}x timm's throughput "
                  f"(rounds: {low:.2f}-{high:.2f}){memory}")
    _write(args, results, extra, bench.timm_rows(results) if not resolutions else [asdict(r) for r in results])
    return 0


def _write(args: argparse.Namespace, results, extra: dict, rows: list[dict]) -> None:
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(bench.as_json(results, **extra), indent=2))
        print(f'wrote {args.json}')
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, 'w', newline='') as f:
            writer = csv.DictWriter(f, sorted({k for row in rows for k in row}))
            writer.writeheader()
            writer.writerows(rows)
        print(f'wrote {args.csv}')
