"""What the fast paths do inside a compiled graph, against the reference graph that `auto` compiles.

    python benchmarks/compiled_paths.py -m xcit_nano_12_p16_224 -b 32 --mode infer
    python benchmarks/compiled_paths.py -m xcit_nano_12_p16_224 -b 32 --mode train --json out.json

`auto` is the model as `xcit bench` compiles it (`compile_static`: each layer's candidates timed
compiled, each on its own, the fastest in the graph, and the graph run only where it beat the eager
model, which runs otherwise); `reference` the graph of every module's
reference maths. Each other variant compiles the model with the named kinds of module on `fast`
(their fast path as whole ops in the graph) and the rest on `reference`; `eager` is the model as
`xcit bench` runs it uncompiled (every path timed), `timm-compiled` timm's model compiled. All are
timed in alternating rounds in one process.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from xcit.bench import _compile, _timed, build_model, make_step, timed_in_turns
from xcit.allocator import keep_freed_memory
from xcit.factory import create_model
from xcit.models import set_fast_path
from xcit.models.fastpath import cpu_name
from xcit.models.layers import Linear, Mlp
from xcit.models.xcit import XCA, ClassAttention, ConvPatchEmbed

KINDS = dict(xca=XCA, linear=Linear, mlp=Mlp, stem=ConvPatchEmbed, cls=ClassAttention)
VARIANTS = 'auto,reference,xca,xca+linear+mlp,eager,timm-compiled'


def fast_kinds(variant: str) -> list[str]:
    """The module kinds a variant puts on 'fast' (ValueError naming any unknown one)."""
    if variant in ('auto', 'eager', 'timm-compiled', 'reference'):
        return []
    kinds = variant.split('+')
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown variant {variant!r}: {', '.join(unknown)} is not one of "
                         f"auto, reference, eager, timm-compiled or {'+'.join(KINDS)} joined by '+'")
    return kinds


def build(name: str, variant: str) -> torch.nn.Module:
    """The model of one variant: 'eager', 'timm-compiled', 'auto' (compiled as it is), or '+'-joined KINDS put
    on 'fast' and compiled ('reference': none of them)."""
    if variant == 'timm-compiled':
        return build_model(name, 'timm-compiled', 224)
    kinds = fast_kinds(variant)
    model = create_model(name)
    if variant in ('eager', 'auto'):
        return model if variant == 'eager' else _compile(model)
    set_fast_path(model, 'reference')
    for module in model.modules():
        if any(isinstance(module, KINDS[kind]) for kind in kinds):
            module.impl = 'fast'
    return _compile(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('-m', '--model', default='xcit_nano_12_p16_224')
    parser.add_argument('-b', '--batch-size', type=int, default=32)
    parser.add_argument('--mode', choices=('infer', 'train'), default='infer')
    parser.add_argument('--variants', default=VARIANTS, help=f'comma-separated (default {VARIANTS})')
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--json', help='write the step times and the machine here')
    args = parser.parse_args()
    try:
        for variant in args.variants.split(','):
            fast_kinds(variant)
    except ValueError as e:
        parser.error(str(e))
    keep_freed_memory()
    steps = {}
    for variant in args.variants.split(','):
        torch.manual_seed(0)
        steps[variant] = make_step(build(args.model, variant), args.mode, args.batch_size, 224, 'cpu')
        _timed(steps[variant], 2, 'cpu')
    times = timed_in_turns(steps, args.rounds, 3, 'cpu')
    rows = [dict(variant=v, median_ms=round(statistics.median([t for r in rounds for t in r]), 1),
                 round_medians_ms=[round(statistics.median(r), 1) for r in rounds]) for v, rounds in times.items()]
    print(f'{args.model} b{args.batch_size} {args.mode} on {cpu_name()}, {torch.get_num_threads()} threads')
    for row in rows:
        print(f"{row['variant']:>28}  {row['median_ms']:8.1f} ms  rounds {row['round_medians_ms']}")
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(date=time.strftime('%Y-%m-%d'), cpu=cpu_name(), torch=torch.__version__,
                           threads=torch.get_num_threads(), model=args.model, batch_size=args.batch_size,
                           mode=args.mode, rows=rows), f, indent=1)
        print(f'wrote {args.json}')


if __name__ == '__main__':
    main()
