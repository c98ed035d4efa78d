"""`xcit data pack SRC DST --shard-size N`: write a dataset as WebDataset shards for `data.dataset: webdataset`.

SRC is an image folder of one split (`<class>/<image>`; the split is named after
the folder, e.g. imagenet/train -> train), a PaddleClas/PASSL label list
(train_list.txt -> train; images under --image-root, default the list's folder),
or `digits` / `digit_views` / `digit_places` (both splits). DST receives `<split>-000000.tar`, ...
and info.json with the shard names, their sample counts and the class names.
JPEG, PNG and WebP files are copied as they are; other images are written as PNG.
"""
from __future__ import annotations

import argparse
from pathlib import Path

BUILT_IN = ('digits', 'digit_views', 'digit_places')


def add_parser(sub) -> None:
    p = sub.add_parser('data', help='prepare datasets (pack WebDataset shards)', description=__doc__)
    commands = p.add_subparsers(dest='data_command', required=True, metavar='ACTION')
    pack = commands.add_parser('pack', help='write a dataset as .tar shards', description=__doc__)
    pack.add_argument('src', help='image folder of one split, label list file, digits, digit_views or digit_places')
    pack.add_argument('dst', help='folder to write the shards and info.json into')
    pack.add_argument('--shard-size', type=int, default=10_000, metavar='N', help='samples per shard (default 10000)')
    pack.add_argument('--split', help='split name (default: from SRC; digits: train and val)')
    pack.add_argument('--image-root', help="label list: folder its paths are relative to (default: the list's)")
    pack.add_argument('--digits-size', type=int, default=32, metavar='PX',
                      help='digits, digit_views, digit_places: image side (default 32, as data.digits_size)')
    pack.set_defaults(run=run_pack)


def _sources(args: argparse.Namespace) -> list[tuple[str, object]]:
    """(split name, sample source) pairs that SRC stands for."""
    from ..config import ConfigError
    from ..data.datasets import DigitsSource, image_folder, label_list
    if args.src in BUILT_IN:
        if not 8 <= args.digits_size <= 512:
            raise ConfigError(f'--digits-size must be 8 to 512, not {args.digits_size}')
        if args.src == 'digits':
            build = lambda split: DigitsSource(split, size=args.digits_size)  # noqa: E731
        else:
            from ..data import views
            view = views.DigitViews if args.src == 'digit_views' else views.DigitPlaces
            build = lambda split: view(split, size=args.digits_size)  # noqa: E731
        return [(split, build(split)) for split in ([args.split] if args.split else ['train', 'val'])]
    src = Path(args.src)
    if src.is_dir():
        return [(args.split or src.name, image_folder(src))]
    if src.is_file():
        split = args.split or src.stem.removesuffix('_list')
        return [(split, label_list(args.image_root or src.parent, src))]
    raise ConfigError(f"{src}: no such folder or label list (or give {' or '.join(BUILT_IN)})")


def run_pack(args: argparse.Namespace) -> int:
    from ..config import ConfigError
    from ..data.shards import pack_split
    if args.shard_size < 1:
        raise ConfigError(f'--shard-size must be at least 1, not {args.shard_size}')
    if args.split is not None and (not args.split or '/' in args.split or args.split in ('.', '..')):
        raise ConfigError(f'--split must be a plain name, not {args.split!r}')
    dst = Path(args.dst)
    if dst.exists() and not dst.is_dir():
        raise ConfigError(f'{dst}: exists and is not a folder')
    for split, source in _sources(args):
        entry, unreadable = pack_split(source, dst, split, args.shard_size)
        shards = entry['filenames']
        print(f"{split}: {entry['num_samples']} samples in {len(shards)} shards, "
              f"{dst / shards[0]} .. {shards[-1]}")
        if unreadable:
            print(f"{split}: {len(unreadable)} unreadable images left out: {', '.join(unreadable[:5])}"
                  + (', ...' if len(unreadable) > 5 else ''))
    return 0
