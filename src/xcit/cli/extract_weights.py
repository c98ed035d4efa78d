"""`xcit extract-weights CKPT --prefix P --remove-prefix --output OUT`: PASSL's extract_weight.py.

Keeps the entries whose name starts with P (for a distillation checkpoint,
`--prefix Student` gives the student), optionally without P and its dot.
OUT in .pdparams is written in PASSL's layout, anything else in ours.
"""
from __future__ import annotations

import argparse

from ..checkpoints.convert import extract_weights


def add_parser(sub) -> None:
    p = sub.add_parser('extract-weights', help="extract part of a checkpoint (PASSL's extract_weight.py)",
                       description=__doc__)
    p.add_argument('checkpoint', help='training checkpoint, e.g. a PASSL epoch_N.pd')
    p.add_argument('--prefix', default='backbone', help='keep entries whose name starts with this (default: backbone)')
    p.add_argument('--remove-prefix', '--remove_prefix', dest='remove_prefix', action='store_true',
                   help='drop the prefix and the dot after it from the kept names')
    p.add_argument('--output', '-o', required=True, help='file to write (.pdparams: PASSL layout; else ours)')
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    count = extract_weights(args.checkpoint, args.output, prefix=args.prefix, remove_prefix=args.remove_prefix)
    print(f'wrote {count} entries starting with {args.prefix!r} to {args.output}')
    return 0
