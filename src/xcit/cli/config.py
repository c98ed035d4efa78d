"""`xcit config import PASSL.yaml --output OURS.yaml` and `xcit config show -c CONFIG [-o KEY=VALUE]`.

`import` translates a PaddlePaddle PASSL config into one of ours (what it does not carry over is
listed, key by key); `show` prints the resolved config of any stack of configs (ours or PASSL's,
layered left to right, then the overrides), exactly what `xcit train` would run.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from ..checkpoints import atomic_write
from ..config import ConfigError, load_config, load_yaml_tree, validate_config


def add_parser(sub) -> None:
    p = sub.add_parser('config', help='translate PASSL configs, print resolved ones', description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = p.add_subparsers(dest='action', required=True, metavar='ACTION')
    imp = actions.add_parser('import', help="translate a PASSL config into this package's schema")
    imp.add_argument('passl_config', help='a PASSL YAML config (configs/xcit/*.yaml, configs/cvt/*.yaml)')
    imp.add_argument('--output', required=True, help='YAML file to write')
    imp.set_defaults(run=run_import)
    show = actions.add_parser('show', help='print the resolved config of a stack of configs')
    show.add_argument('-c', '--config', action='append', required=True, metavar='CONFIG',
                      help='YAML config (ours or PASSL\'s); repeat to layer several')
    show.add_argument('-o', '--override', action='append', default=[], metavar='KEY=VALUE')
    show.set_defaults(run=run_show)


def run_import(args: argparse.Namespace) -> int:
    from ..passl_config import is_passl_config, translate_passl_config
    data = load_yaml_tree(args.passl_config)
    if not is_passl_config(data):
        raise ConfigError(f'{args.passl_config}: not a PASSL config (no model.architecture or DistillationWrapper, '
                          'dataloader and lr_scheduler sections)')
    ours, notes = translate_passl_config(data, args.passl_config)
    validate_config(dict(ours, experiment=Path(args.passl_config).stem), args.passl_config)  # it must load as ours
    header = [f'# Translated from the PASSL config {Path(args.passl_config).name} by `xcit config import`.']
    header += [f'# not carried over: {note}' for note in notes]
    text = '\n'.join(header) + '\n' + yaml.safe_dump(ours, sort_keys=False)
    with atomic_write(args.output) as tmp:
        Path(tmp).write_text(text)
    for note in notes:
        print(f'not carried over: {note}', file=sys.stderr)
    print(f'{args.passl_config} -> {args.output}')
    return 0


def run_show(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.override)
    print(yaml.safe_dump(config.to_dict(), sort_keys=False), end='')
    return 0
