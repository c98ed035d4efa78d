"""`xcit train -c CONFIG` and `xcit eval -c CONFIG --load WEIGHTS`: PASSL's workflow, timm's recipes.

Several -c files layer left to right (e.g. a model config, then a recipe);
-o key.path=value overrides any key. Launch with `torchrun --nproc_per_node N`
to train on N processes. `xcit eval --mode knn|probe` reads out the frozen
backbone of any weights (a classifier, a DINO run, a .dino tag's file) on the
config's labelled train/val data: DINO's weighted k-NN, or a linear probe.
`xcit eval --image-sizes 160,224,384` evaluates the weights at each test
resolution and writes the table and a plot of top-1 against resolution.
"""
from __future__ import annotations

import argparse
import logging

from ..config import load_config

_logger = logging.getLogger('xcit.train')


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument('-c', '--config', action='append', required=True, metavar='CONFIG',
                   help='YAML config; repeat to layer several')
    p.add_argument('-o', '--override', action='append', default=[], metavar='KEY=VALUE',
                   help="override a config key, e.g. -o optim.lr=1e-3 -o data.root=/data/imagenet")


def add_parser(sub) -> None:
    p = sub.add_parser('train', help='train (or distill) a model from a config', description=__doc__)
    _common(p)
    p.add_argument('--resume', metavar='CKPT', help='continue a run from its checkpoint (e.g. runs/NAME/last.pth)')
    p.add_argument('--load', metavar='WEIGHTS', help='start from these weights (any supported format)')
    p.add_argument('--evaluate-only', action='store_true', help='evaluate --load (or the configured weights) and exit')
    p.set_defaults(run=run_train)

    e = sub.add_parser('eval', help='evaluate weights on the configured validation set', description=__doc__)
    _common(e)
    e.add_argument('--load', metavar='WEIGHTS', required=True, help='weights to evaluate (any supported format)')
    e.add_argument('--mode', choices=('task', 'knn', 'probe'), default='task', help=(
        "task: the config task's own metric (default); knn: weighted k-NN top-1 of the frozen backbone's "
        "features (dino.knn_k, dino.knn_temperature); probe: the k-NN and a linear probe on those features"))
    e.add_argument('--probe-epochs', type=int, default=100, metavar='N', help='--mode probe: epochs of the probe')
    e.add_argument('--image-sizes', metavar='S1,S2,...', help=(
        'evaluate at each of these test resolutions (e.g. 160,192,224,288,384,448): top-1, top-5, images/s and '
        'peak memory, printed and written as resolution.json/.csv with a plot of top-1 (resolution.png)'))
    e.add_argument('--compare-load', metavar='WEIGHTS', help='--image-sizes: a second checkpoint on the same axes')
    e.add_argument('--compare-model', metavar='NAME', help=(
        "--compare-load's architecture: a registered or timm model (e.g. deit_small_patch16_224); "
        "default: the config's model"))
    e.add_argument('--out', metavar='DIR', help=(
        "--image-sizes: where to write the results (default: the weights' run folder, else the current folder)"))
    e.set_defaults(run=run_eval, resume=None, evaluate_only=True)


def run_train(args: argparse.Namespace) -> int:
    import os

    from ..tasks import run
    config = load_config(args.config, args.override)
    result = run(config, resume=args.resume, load=args.load, evaluate_only=args.evaluate_only)
    if int(os.environ.get('RANK', 0)) != 0:  # under torchrun, one process reports
        return 0
    if result.run_dir is not None:
        print(f'run folder: {result.run_dir}')
    if result.metrics:
        if result.report:
            print(result.report)
        print(f'final evaluation: {result.summary}')
    return 0


def run_eval(args: argparse.Namespace) -> int:
    if args.image_sizes is not None:
        return run_resolution_sweep(args)
    if args.compare_load or args.compare_model or args.out:
        raise ValueError('--compare-load, --compare-model and --out go with --image-sizes')
    if args.mode != 'task':  # the dino task's read-outs, on whatever backbone the weights hold
        if not 1 <= args.probe_epochs <= 10_000:
            raise ValueError(f'--probe-epochs must be 1 to 10000, not {args.probe_epochs}')
        epochs = args.probe_epochs if args.mode == 'probe' else 0
        args.override = [*args.override, 'task=dino', f'dino.probe_epochs={epochs}']
    return run_train(args)


def run_resolution_sweep(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from .resolution import format_table, parse_sizes, run_sweep, write_results
    sizes = parse_sizes(args.image_sizes)
    if args.mode != 'task':
        raise ValueError('--image-sizes measures the task\'s accuracy; it does not go with --mode knn/probe')
    if args.compare_model and not args.compare_load:
        raise ValueError('--compare-model names the architecture of --compare-load, which is missing')
    config = load_config(args.config, args.override)
    results = run_sweep(config, args.load, sizes, args.compare_load, args.compare_model)
    if int(os.environ.get('RANK', 0)) != 0:  # under torchrun, one process reports
        return 0
    weights = Path(args.load)
    out = Path(args.out) if args.out else weights.parent if (weights.parent / 'config.yaml').is_file() else Path.cwd()
    print(format_table(results))
    for path in write_results(results, out, trained_size=config.data.image_size):
        print(f'wrote {path}')
    return 0
