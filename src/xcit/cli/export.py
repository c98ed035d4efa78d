"""`xcit export --model NAME --onnx OUT.onnx [--dynamic-size]`: a model for ONNX runtimes (or TorchScript),
or `--hub-dir DIR`: a timm-style Hugging Face Hub folder (config.json, model.safetensors, README.md).

The batch size is always free; --dynamic-size frees the height and width too. The Hub folder takes
the class names, run config and best metric of a training checkpoint into its config.json and model
card; upload it with `hf upload ORG/REPO DIR`, or call xcit.push_to_hub from Python.
"""
from __future__ import annotations

import argparse
import errno
import os
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser('export', help='export a model to ONNX, TorchScript or a Hugging Face Hub folder',
                       description=__doc__)
    p.add_argument('--model', required=True)
    p.add_argument('--checkpoint', help='weights (any supported format, or a training checkpoint)')
    p.add_argument('--onnx', type=Path, help='write ONNX here')
    p.add_argument('--torchscript', type=Path, help='write a traced TorchScript module here')
    p.add_argument('--hub-dir', type=Path, help='write a timm-style Hugging Face Hub folder here')
    p.add_argument('--dynamic-size', action='store_true', help='ONNX: accept any height and width')
    p.add_argument('--image-size', type=int,
                   help=f"export size, {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} (default: the model's input size)")
    p.set_defaults(run=run)


MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 32, 4096  # the range the exported graph's dynamic height and width allow


def check_destination(path: Path, option: str) -> None:
    """Fail before the (slow) export when the file could not be written."""
    from ..checkpoints import WriteError
    if path.is_dir():
        raise ValueError(f'{option} {path}: is a folder; give the file to write')
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(e.errno, e.strerror or str(e), str(path)) from None
    if not os.access(path.parent, os.W_OK):
        raise WriteError(errno.EACCES, 'its folder is not writable', str(path))


def run(args: argparse.Namespace) -> int:
    from ..export import export_onnx, export_torchscript
    from ._weights import model_with_weights

    if not args.onnx and not args.torchscript and not args.hub_dir:
        raise ValueError('nothing to write: give --onnx PATH, --torchscript PATH and/or --hub-dir DIR')
    if args.hub_dir is not None and args.hub_dir.exists() and not args.hub_dir.is_dir():
        raise ValueError(f'--hub-dir {args.hub_dir}: is a file; give the folder to write')
    if args.onnx and args.torchscript and args.onnx.resolve() == args.torchscript.resolve():
        raise ValueError(f'--onnx and --torchscript both name {args.onnx}; one would overwrite the other')
    if args.image_size is not None and not MIN_IMAGE_SIZE <= args.image_size <= MAX_IMAGE_SIZE:
        raise ValueError(f'--image-size must be between {MIN_IMAGE_SIZE} and {MAX_IMAGE_SIZE}, not {args.image_size}')
    for path, option in ((args.onnx, '--onnx'), (args.torchscript, '--torchscript')):
        if path:
            check_destination(path, option)
    model, raw = model_with_weights(args.model, args.checkpoint)
    if args.hub_dir:
        export_hub_dir(model, raw, args.hub_dir, args.checkpoint)
    size = args.image_size or model.pretrained_cfg['input_size'][-1]
    if args.onnx:
        export_onnx(model, args.onnx, (size, size), dynamic_size=args.dynamic_size)
        shape = 'B x 3 x H x W' if args.dynamic_size else f'B x 3 x {size} x {size}'
        print(f'wrote {args.onnx} (input "image": {shape}, output "logits")')
    if args.torchscript:
        export_torchscript(model, args.torchscript, (size, size))
        print(f'wrote {args.torchscript} (TorchScript, input 1 x 3 x {size} x {size}; batch size free)')
    return 0


def export_hub_dir(model, raw, folder: Path, checkpoint: str | None) -> None:
    """The Hub folder, with what a training checkpoint knows of its run: class names, config, best metric, and
    the model arguments (a reduced depth, say) without which timm would build another network for the weights."""
    from ..checkpoints.hf_hub import save_pretrained
    from ._weights import class_names, run_config

    best = raw.get('best') if isinstance(raw, dict) else None
    metrics = ({best['metric']: best['value']} if isinstance(best, dict) and isinstance(best.get('metric'), str)
               and isinstance(best.get('value'), (int, float)) else None)
    config = run_config(raw, checkpoint)
    model_args = dict(config.model.kwargs) if config is not None and config.model.kwargs else None
    save_pretrained(model, folder, label_names=class_names(raw), config=config, metrics=metrics,
                    model_args=model_args)
    print(f'wrote {folder} (config.json, model.safetensors, README.md)')
