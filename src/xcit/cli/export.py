"""`xcit export --model NAME --onnx OUT.onnx [--dynamic-size]`: a model for ONNX runtimes (or TorchScript).

The batch size is always free; --dynamic-size frees the height and width too.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser('export', help='export a model to ONNX or TorchScript', description=__doc__)
    p.add_argument('--model', required=True)
    p.add_argument('--checkpoint', help='weights (any supported format, or a training checkpoint)')
    p.add_argument('--onnx', type=Path, help='write ONNX here')
    p.add_argument('--torchscript', type=Path, help='write a traced TorchScript module here')
    p.add_argument('--dynamic-size', action='store_true', help='ONNX: accept any height and width')
    p.add_argument('--image-size', type=int, help="export size (default: the model's input size)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..export import export_onnx, export_torchscript
    from ._weights import model_with_weights

    if not args.onnx and not args.torchscript:
        raise ValueError('nothing to write: give --onnx PATH and/or --torchscript PATH')
    model, _ = model_with_weights(args.model, args.checkpoint)
    size = args.image_size or model.pretrained_cfg['input_size'][-1]
    if args.onnx:
        export_onnx(model, args.onnx, (size, size), dynamic_size=args.dynamic_size)
        shape = 'B x 3 x H x W' if args.dynamic_size else f'B x 3 x {size} x {size}'
        print(f'wrote {args.onnx} (input "image": {shape}, output "logits")')
    if args.torchscript:
        export_torchscript(model, args.torchscript, (size, size))
        print(f'wrote {args.torchscript} (TorchScript, input 1 x 3 x {size} x {size}; batch size free)')
    return 0
