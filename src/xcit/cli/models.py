"""`xcit models [PATTERN]`: the registered architectures, their size and published weights with their accuracy."""
from __future__ import annotations

import argparse

import torch

from ..registry import build_model, get_model_entry, get_pretrained_cfg, list_models


def add_parser(sub) -> None:
    p = sub.add_parser('models', help='list registered models', description=__doc__)
    p.add_argument('pattern', nargs='*', default=['*'], help="fnmatch wildcards, e.g. 'xcit_*_p8_*'")
    p.add_argument('--pretrained', action='store_true', help='list one row per published weight file')
    p.set_defaults(run=run)


def parameter_count(name: str) -> int:
    """Counted on the meta device: no memory, no initialisation cost."""
    with torch.device('meta'):
        return sum(p.numel() for p in build_model(name).parameters())


def run(args: argparse.Namespace) -> int:
    names = list_models(args.pattern, pretrained=args.pretrained)
    if not names:
        raise ValueError(f"no model matches {' '.join(args.pattern)}")
    if args.pretrained:
        print(f"{'weights':<42} {'input':>5} {'top-1':>6}  {'hub':<42} url")
        sources = {}
        for name in names:
            cfg = get_pretrained_cfg(name)
            top1 = f"{cfg['top1']:.2f}" if cfg.get('top1') is not None else '-'
            sources.setdefault(cfg.get('top1_source'), None)
            print(f"{name:<42} {cfg['input_size'][-1]:>5} {top1:>6}  {cfg.get('hf_hub_id') or '-':<42} {cfg['url']}")
        print(f"top-1: published ImageNet-1k accuracy (%), from {'; '.join(filter(None, sources))}")
        return 0
    print(f"{'model':<28} {'family':<8} {'params (M)':>10} {'input':>5}  weights")
    for name in names:
        entry = get_model_entry(name)
        size = get_pretrained_cfg(name)['input_size'][-1]
        print(f"{name:<28} {entry.family:<8} {parameter_count(name) / 1e6:>10.2f} {size:>5}  {', '.join(entry.cfgs) or '-'}")
    return 0
