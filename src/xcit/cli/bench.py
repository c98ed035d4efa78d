"""`xcit bench`: inference time and peak memory against input resolution."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .. import bench
from ..models import is_model


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(',') if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected comma-separated integers, got {text!r}') from None
    if not values or min(values) < 16:
        raise argparse.ArgumentTypeError(f'resolutions must be integers >= 16, got {text!r}')
    return values


def add_parser(sub) -> None:
    p = sub.add_parser('bench', help='time and memory versus resolution', description=__doc__)
    p.add_argument('--model', '-m', default='xcit_nano_12_p16_224,xcit_small_12_p16_224',
                   help='comma-separated model names')
    p.add_argument('--resolutions', type=_int_list, default=[224, 512, 1024], help='comma-separated square sizes')
    p.add_argument('--batch-size', '-b', type=int, default=1)
    p.add_argument('--iters', type=int, default=3, help='timed forward passes per point')
    p.add_argument('--warmup', type=int, default=1, help='untimed passes first (the first also measures memory)')
    p.add_argument('--device', default='cpu')
    p.add_argument('--json', type=Path, help='also write the results and their environment here')
    p.add_argument('--no-isolate', action='store_true', help='measure every point in this process (memory less exact)')
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    models = [m for m in args.model.split(',') if m]
    unknown = [m for m in models if not is_model(m)]
    if unknown:
        raise ValueError(f"unknown model(s): {', '.join(unknown)} (see `xcit models`)")
    if args.batch_size < 1 or args.iters < 1 or args.warmup < 1:
        raise ValueError('--batch-size, --iters and --warmup must be at least 1')
    env = bench.environment()
    print(f"device {args.device}, torch {env['torch']}, {env['torch_threads']} threads, batch {args.batch_size}, "
          f"median of {args.iters}; GMACs by {bench.MAC_COUNTER}")
    points = bench.run_sweep(models, args.resolutions, isolate=not args.no_isolate, batch_size=args.batch_size,
                             warmup=args.warmup, iters=args.iters, device=args.device)
    print(bench.format_table(points))
    print('XCA cost is linear in tokens: time x and mem x should track tokens x.')
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(bench.as_json(points), indent=2))
        print(f'wrote {args.json}')
    return 0
