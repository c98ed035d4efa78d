"""`xcit models [PATTERN]`: the registered architectures, their size and published weights."""
from __future__ import annotations

import argparse

import torch

from ..models import create_model, get_pretrained_cfg, list_models
from ..models._registry import get_model_entry


def add_parser(sub) -> None:
    p = sub.add_parser('models', help='list registered models', description=__doc__)
    p.add_argument('pattern', nargs='*', default=['*'], help="fnmatch wildcards, e.g. 'xcit_*_p8_*'")
    p.add_argument('--pretrained', action='store_true', help='list one row per published weight file')
    p.set_defaults(run=run)


def model_summary(name: str) -> dict:
    """Shape and parameter count of a model, built on the meta device (no memory, no init cost)."""
    with torch.device('meta'):
        model = create_model(name)
    cfg = get_pretrained_cfg(name)
    return dict(
        name=name, patch=getattr(model, 'patch_size', None), dim=getattr(model, 'embed_dim', None),
        depth=len(getattr(model, 'blocks', ())), heads=model.blocks[0].attn.num_heads if hasattr(model, 'blocks') else None,
        params_m=sum(p.numel() for p in model.parameters()) / 1e6, input_size=cfg['input_size'][-1],
        url=cfg.get('url', ''))


def run(args: argparse.Namespace) -> int:
    names = list_models(args.pattern, pretrained=args.pretrained)
    if not names:
        raise ValueError(f"no model matches {' '.join(args.pattern)}")
    if args.pretrained:
        print(f"{'weights':<42} {'input':>5}  url")
        for name in names:
            cfg = get_pretrained_cfg(name)
            print(f"{name:<42} {cfg['input_size'][-1]:>5}  {cfg['url']}")
        return 0
    print(f"{'model':<24} {'patch':>5} {'dim':>5} {'depth':>5} {'heads':>5} {'params (M)':>10}  weights")
    for name in names:
        s = model_summary(name)
        tags = ', '.join(get_model_entry(name).cfgs)
        print(f"{name:<24} {s['patch']:>5} {s['dim']:>5} {s['depth']:>5} {s['heads']:>5} {s['params_m']:>10.2f}  {tags}")
    return 0
