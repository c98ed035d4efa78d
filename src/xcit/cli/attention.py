"""`xcit attention IMAGE_OR_FOLDER... --model NAME`: where the class token looks, and how each head mixes channels.

For each image, a PNG with the input, every head's class-attention map of the
last class-attention block laid over it, and every head's d x d cross-covariance
attention matrix of one XCA block (--xca-block, default the last). A folder
stands for the image files in it, in name order. An input that cannot be read
is reported on its own line and the others are still drawn; the exit status is then 2.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

MAX_IMAGE_SIZE = 4096


def add_parser(sub) -> None:
    p = sub.add_parser('attention', help='draw attention maps for images', description=__doc__)
    p.add_argument('images', nargs='+', metavar='IMAGE', help='image files, or folders of them')
    p.add_argument('--model', required=True, help='an XCiT, e.g. xcit_small_12_p16_224')
    p.add_argument('--checkpoint', help='weights (any supported format, or a training checkpoint)')
    p.add_argument('--out', type=Path, default=Path('attention'), help='folder for the PNGs (default: attention/)')
    p.add_argument('--xca-block', type=int, default=-1, help='XCA block whose channel attention is drawn')
    p.add_argument('--image-size', type=int, default=None,
                   help=f"resize the short side to this, up to {MAX_IMAGE_SIZE} (default: the model's input size; "
                        f"0 keeps the image's, when no side exceeds {MAX_IMAGE_SIZE})")
    p.set_defaults(run=run)


def load_image(path: str | Path, short_side: int | None):
    """The image's pixels in [0, 1] as (3, H, W), the short side resized to `short_side` unless that is 0/None."""
    from torchvision.transforms import functional as TF

    from ..data.datasets import read_image
    img = read_image(path)
    if short_side:
        img = TF.resize(img, short_side, interpolation=TF.InterpolationMode.BICUBIC)
    elif max(img.size) > MAX_IMAGE_SIZE:
        raise ValueError(f'{path}: {img.size[0]} x {img.size[1]} pixels is more than {MAX_IMAGE_SIZE} per side; '
                         'pass --image-size to draw it smaller')
    return TF.to_tensor(img)


def _output_name(path: str, used: set[str]) -> str:
    """`<stem>_attention.png`, numbered when two inputs share a stem (a/x.png, b/x.jpg): no map overwrites another."""
    stem = Path(path).stem
    name, n = f'{stem}_attention.png', 1
    while name in used:
        n += 1
        name = f'{stem}-{n}_attention.png'
    used.add(name)
    return name


def run(args: argparse.Namespace) -> int:
    from ..data.datasets import image_files
    from ..viz import attention_maps, plot_attention
    from ._weights import error, model_with_weights, report_problems

    if args.image_size is not None and not 0 <= args.image_size <= MAX_IMAGE_SIZE:
        raise ValueError(f'--image-size must be between 0 and {MAX_IMAGE_SIZE}, not {args.image_size}')
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f'--out {args.out}: is a file; the PNGs go into a folder')
    inputs = image_files(args.images)
    failed = report_problems(args.command, inputs)
    if failed == len(inputs):
        return 2
    model, _ = model_with_weights(args.model, args.checkpoint)
    cfg = model.pretrained_cfg
    short_side = cfg['input_size'][-1] if args.image_size is None else args.image_size
    mean = torch.tensor(cfg['mean']).view(3, 1, 1)
    std = torch.tensor(cfg['std']).view(3, 1, 1)
    used: set[str] = set()
    for path, problem in inputs:
        if problem is not None:
            continue
        try:
            pixels = load_image(path, short_side)
        except ValueError as e:
            error(args.command, e)
            failed += 1
            continue
        maps = attention_maps(model, ((pixels - mean) / std)[None], xca_block=args.xca_block)
        out = plot_attention(pixels, maps, args.out / _output_name(path, used),
                             title=f'{args.model}: {Path(path).name}, {maps.grid[0]} x {maps.grid[1]} patches')
        print(f'{path} -> {out}', flush=True)
    return 2 if failed else 0
