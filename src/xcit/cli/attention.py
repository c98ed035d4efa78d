"""`xcit attention IMAGE... --model NAME`: where the class token looks, and how each head mixes channels.

For each image, a PNG with the input, every head's class-attention map of the
last class-attention block laid over it, and every head's d x d cross-covariance
attention matrix of one XCA block (--xca-block, default the last).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch


def add_parser(sub) -> None:
    p = sub.add_parser('attention', help='draw attention maps for images', description=__doc__)
    p.add_argument('images', nargs='+', metavar='IMAGE')
    p.add_argument('--model', required=True, help='an XCiT, e.g. xcit_small_12_p16_224')
    p.add_argument('--checkpoint', help='weights (any supported format, or a training checkpoint)')
    p.add_argument('--out', type=Path, default=Path('attention'), help='folder for the PNGs (default: attention/)')
    p.add_argument('--xca-block', type=int, default=-1, help='XCA block whose channel attention is drawn')
    p.add_argument('--image-size', type=int, default=None,
                   help="resize the short side to this (default: the model's input size; 0 keeps the image's)")
    p.set_defaults(run=run)


def load_image(path: str | Path, short_side: int | None):
    """(pixels in [0, 1] as (3, H, W), the same normalised for the model's statistics are added by the caller)."""
    from PIL import Image
    from torchvision.transforms import functional as TF

    from ..data.datasets import IMAGE_ERRORS
    try:
        with Image.open(path) as img:
            img = img.convert('RGB')
    except (FileNotFoundError, *IMAGE_ERRORS) as e:
        raise ValueError(f'{path}: cannot read the image ({e})') from None
    if short_side:
        img = TF.resize(img, short_side, interpolation=TF.InterpolationMode.BICUBIC)
    return TF.to_tensor(img)


def run(args: argparse.Namespace) -> int:
    from ..viz import attention_maps, plot_attention
    from ._weights import model_with_weights

    model, _ = model_with_weights(args.model, args.checkpoint)
    cfg = model.pretrained_cfg
    short_side = cfg['input_size'][-1] if args.image_size is None else args.image_size
    mean = torch.tensor(cfg['mean']).view(3, 1, 1)
    std = torch.tensor(cfg['std']).view(3, 1, 1)
    for path in args.images:
        pixels = load_image(path, short_side)
        maps = attention_maps(model, ((pixels - mean) / std)[None], xca_block=args.xca_block)
        out = plot_attention(pixels, maps, args.out / f'{Path(path).stem}_attention.png',
                             title=f'{args.model}: {Path(path).name}, {maps.grid[0]} x {maps.grid[1]} patches')
        print(f'{path} -> {out}')
    return 0
