"""`xcit convert SRC DST`: rewrite weights in another layout (PASSL, flat Paddle, timm, official, safetensors).

The weights are loaded strictly into their model first, so what is written is
known to be complete. The model is recognised from the shapes unless --model names it.
Of a DINO checkpoint (a dino run's last.pth, facebookresearch/dino's), the teacher's
backbone is written (--ssl-part student for the student): a classification-ready file.
"""
from __future__ import annotations

import argparse

from ..checkpoints.convert import FORMATS, convert_checkpoint


def add_parser(sub) -> None:
    p = sub.add_parser('convert', help='convert a checkpoint to another format', description=__doc__)
    p.add_argument('src', help='checkpoint to read (.pth, .pdparams, .pd, .safetensors, ...)')
    p.add_argument('dst', help='file to write; its extension picks the format unless --to is given')
    p.add_argument('--model', help='architecture the weights belong to (default: recognised from their shapes); '
                                   'a timm model (regnety_160) for a distillation teacher')
    p.add_argument('--to', choices=FORMATS, help='output format (default: from DST: .pdparams -> passl, '
                                                 '.safetensors -> safetensors, .pth -> official); paddle: '
                                                 'the flat Paddle layout of our module names')
    p.add_argument('--use-ema', action='store_true', help='take the EMA weights of a training checkpoint')
    p.add_argument('--ssl-part', choices=('teacher', 'student'), default='teacher',
                   help="of a DINO checkpoint, whose backbone to write (default: the teacher, as DINO's evaluations)")
    p.add_argument('--allow-nonfinite', action='store_true',
                   help='convert weights holding NaN or infinity too (refused by default)')
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    model_name, fmt = convert_checkpoint(args.src, args.dst, model_name=args.model, to=args.to, use_ema=args.use_ema,
                                         allow_nonfinite=args.allow_nonfinite, ssl_part=args.ssl_part)
    print(f'{args.src} -> {args.dst} ({model_name}, {fmt} format)')
    return 0
