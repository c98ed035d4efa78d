"""`xcit predict --model NAME --checkpoint W IMAGE...`: top-k classes for each image."""
from __future__ import annotations

import argparse

import torch


def add_parser(sub) -> None:
    p = sub.add_parser('predict', help='classify images', description=__doc__)
    p.add_argument('images', nargs='+', metavar='IMAGE')
    p.add_argument('--model', required=True, help='architecture, e.g. xcit_nano_12_p16_224')
    p.add_argument('--checkpoint', required=True, help='weights (any supported format, or a training checkpoint)')
    p.add_argument('--topk', type=int, default=5)
    p.add_argument('--image-size', type=int, help="input size (default: the run's, else the model's)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from PIL import Image

    from ..config import Config
    from ..data import build_eval_transform
    from ..data.datasets import IMAGE_ERRORS
    from ._weights import model_with_weights

    if args.topk < 1:
        raise ValueError('--topk must be at least 1')
    model, raw = model_with_weights(args.model, args.checkpoint)
    # a training checkpoint carries the run's config (input size, normalisation) and class names
    config = Config.model_validate(raw['config']) if isinstance(raw, dict) and 'config' in raw else Config()
    if args.image_size:
        config.data.image_size = args.image_size
    classes = raw.get('classes') if isinstance(raw, dict) else None
    transform = build_eval_transform(config, model.pretrained_cfg)
    for path in args.images:
        try:
            with Image.open(path) as img:
                x = transform(img.convert('RGB'))[None]
        except (FileNotFoundError, *IMAGE_ERRORS) as e:
            raise ValueError(f'{path}: cannot read the image ({e})') from None
        with torch.no_grad():
            probs = model(x).softmax(dim=1)[0]
        top = probs.topk(min(args.topk, probs.numel()))
        labels = [classes[i] if classes and i < len(classes) else str(i) for i in top.indices.tolist()]
        print(path + ': ' + ', '.join(f'{label} {p:.3f}' for label, p in zip(labels, top.values.tolist())))
    return 0
