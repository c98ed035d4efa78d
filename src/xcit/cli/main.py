"""`xcit <command>`: one entry point for every tool, each command in its own module."""
from __future__ import annotations

import argparse
import logging
import sys

from ..checkpoints import CheckpointError
from ..data.datasets import UnreadableImageError
from ..engine import TrainingDiverged
from . import attention, bench, config, convert, data, export, extract_weights, models, predict, train
from ._weights import error

COMMANDS = {'train': train, 'predict': predict, 'models': models, 'config': config, 'convert': convert,
            'extract-weights': extract_weights, 'attention': attention, 'export': export, 'bench': bench,
            'data': data}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='xcit', description='Cross-covariance image transformers: models and tools.')
    sub = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')
    for name, module in COMMANDS.items():
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except (CheckpointError, ValueError, OSError) as e:
        # bad input: one line, no traceback
        error(args.command, e)
        return 2
    except KeyboardInterrupt:
        error(args.command, 'interrupted')
        return 130
    except (TrainingDiverged, UnreadableImageError) as e:
        # raised in a data-loader worker, the message ends with the original error's line
        print(f'xcit {args.command}: error: {str(e).strip().splitlines()[-1]}', file=sys.stderr)
        return 1


if __name__ == '__main__':
    sys.exit(main())
