"""Image datasets: folders, PaddleClas/PASSL label lists, and a built-in digits set needing no download.

Every dataset lists (path or image, label) samples without opening the images;
`SampleSource.load(i)` reads one. Reading happens in `TransformedDataset`,
which decides what an unreadable image costs: the run (`error`) or just that
image (`skip`, counted and reported).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..config import ConfigError
from ..seeding import rng_scope, sample_seed

# what PIL raises for truncated, corrupt or non-image files, and for headers declaring a decompression bomb
IMAGE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)


class SampleSource:
    """Labelled images, listed up front and read one at a time."""

    classes: list[str]
    targets: list[int]

    def __len__(self) -> int:
        return len(self.targets)

    def load(self, index: int) -> Image.Image:
        """The image at `index` (a source that draws a sample anew each time, like `digit_places` with
        `renders` > 1, returns a list of images of it: the multi-crop transform takes crop k from image k mod n)."""
        raise NotImplementedError

    def describe(self, index: int) -> str:
        """Where a sample comes from, for error reports."""
        return f'sample {index}'


class FileSource(SampleSource):
    def __init__(self, samples: Sequence[tuple[str, int]], classes: list[str]):
        self.paths = [p for p, _ in samples]
        self.targets = [t for _, t in samples]
        self.classes = classes

    def load(self, index: int) -> Image.Image:
        with Image.open(self.paths[index]) as img:
            return img.convert('RGB')

    def describe(self, index: int) -> str:
        return self.paths[index]


def image_folder(root: str | os.PathLike) -> FileSource:
    """`root/<class name>/<image>`: class indices in sorted folder order, as torchvision and timm do."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f'image folder not found: {root}')
    try:
        classes, class_to_idx = find_classes(str(root))
        samples = make_dataset(str(root), class_to_idx, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as e:
        raise ConfigError(f'{root}: {e}') from None
    return FileSource(samples, classes)


def read_image(path: str | os.PathLike) -> Image.Image:
    """The image at `path` in RGB; any reason it cannot be read is a ValueError naming the file, on one line."""
    try:
        with Image.open(path) as img:
            return img.convert('RGB')
    except IMAGE_ERRORS as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else ' '.join(str(e).split())[:200]
        raise ValueError(f'{path}: cannot read the image ({reason})') from None


def image_files(inputs: Sequence[str | os.PathLike]) -> list[tuple[str, str | None]]:
    """Files and folders given on a command line, as (image path, None) or (input, why it has no image).

    A folder stands for its image files (torchvision's extensions, any case), sorted by name.
    """
    from torchvision.datasets.folder import IMG_EXTENSIONS
    found: list[tuple[str, str | None]] = []
    for item in map(str, inputs):
        path = Path(item)
        if path.is_dir():
            try:
                images = sorted(str(p) for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
            except OSError as e:
                found.append((item, f'{item}: cannot list the folder ({e.strerror or e})'))
                continue
            found.extend((image, None) for image in images)
            if not images:
                found.append((item, f"{item}: no image files ({', '.join(IMG_EXTENSIONS[:4])}, ...) in this folder"))
        elif not path.exists():
            found.append((item, f'{item}: no such file or folder'))
        else:
            found.append((item, None))
    return found


MAX_CLASSES = 1_000_000  # beyond any labelled set (ImageNet-21k has 21,841); a classifier that wide is a typo


def label_list(root: str | os.PathLike, list_file: str | os.PathLike) -> FileSource:
    """PaddleClas/PASSL label files: `relative/path label` per line.

    The label is split off at the last whitespace, so paths may contain spaces;
    blank lines and `#` comments are skipped. Files are not stat-ed up front
    (an ImageNet list has 1.28 M lines); a missing one is an unreadable image.
    """
    root, list_file = Path(root), Path(list_file)
    if not list_file.is_absolute() and not list_file.exists():
        list_file = root / list_file
    if not list_file.is_file():
        raise ConfigError(f'label list not found: {list_file}')
    if not root.is_dir():
        raise ConfigError(f'image root not found: {root}')
    try:
        text = list_file.read_text(encoding='utf-8')
    except UnicodeDecodeError as e:
        raise ConfigError(f'{list_file}: not UTF-8 text (byte {e.start}); is it a label list?') from None
    samples = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith('#'):
            continue
        parts = line.rsplit(None, 1)
        if len(parts) != 2 or not (parts[1].isascii() and parts[1].isdigit()):
            shown = repr(line) if len(line) <= 200 else repr(line[:200]) + '...'
            raise ConfigError(f'{list_file}:{number}: expected "<relative/path> <label from 0>", got {shown}')
        label = int(parts[1])
        if label >= MAX_CLASSES:
            raise ConfigError(f'{list_file}:{number}: label {label} would make {label + 1:,} classes; '
                              f'labels are class indices below {MAX_CLASSES:,}')
        samples.append((str(root / parts[0]), label))
    if not samples:
        raise ConfigError(f'{list_file}: no samples listed')
    num_classes = max(t for _, t in samples) + 1
    return FileSource(samples, [str(i) for i in range(num_classes)])


def digits_split(split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits (values 0..16) of one split, their labels and their indices in the full set.

    The split is made once, stratified and seeded: 20 % of each class to 'val', the rest to 'train', so
    everything built from the digits (the classification set, the digit scenes) keeps them apart alike.
    """
    from sklearn.datasets import load_digits
    if split not in ('train', 'val'):
        raise ConfigError(f"digits has splits 'train' and 'val', not {split!r}")
    digits = load_digits()
    rng = np.random.default_rng(0)
    val_mask = np.zeros(len(digits.target), dtype=bool)
    for label in range(10):
        members = np.flatnonzero(digits.target == label)
        val_mask[rng.choice(members, size=round(0.2 * len(members)), replace=False)] = True
    keep = ~val_mask if split == 'train' else val_mask
    return digits.images[keep], digits.target[keep], np.flatnonzero(keep)


def digit_images(images: np.ndarray, size: int) -> np.ndarray:
    """(n, 8, 8) digits valued 0..16 -> (n, size, size) uint8, upsampled bicubically as `digits` shows them."""
    pixels = (images * (255 / 16)).round().astype(np.uint8)  # values 0..16 -> 0..255
    return np.stack([np.asarray(Image.fromarray(p).resize((size, size), Image.BICUBIC)) for p in pixels])


class DigitsSource(SampleSource):
    """scikit-learn's bundled 8x8 handwritten digits, upsampled to RGB images (nothing is downloaded).

    The 1,797 images are split once, stratified and seeded, into 1,438 training
    and 359 validation images (20 % of each class), so every run sees the same split.
    """

    def __init__(self, split: str, size: int = 32):
        images, targets, _ = digits_split(split)
        self.images = [Image.fromarray(p).convert('RGB') for p in digit_images(images, size)]
        self.targets = targets.tolist()
        self.classes = [str(i) for i in range(10)]

    def load(self, index: int) -> Image.Image:
        return self.images[index]


class UnreadableImageError(RuntimeError):
    """An image that cannot be decoded, with `on_corrupt: error`."""


class TransformedDataset(torch.utils.data.Dataset):
    """Reads and transforms one sample; its randomness depends only on (seed, epoch, index).

    That makes augmentation independent of worker count, rank and order, so a
    run resumed mid-epoch, or split across processes, sees the same images.
    An unreadable image either stops the run (`on_corrupt='error'`) or is
    skipped: in training the next readable sample takes its place (batches keep
    their size), in evaluation it is left out (nothing is counted twice).
    """

    def __init__(self, source: SampleSource, transform: Callable, training: bool, on_corrupt: str = 'skip',
                 seed: int = 0):
        self.source = source
        self.transform = transform
        self.training = training
        self.on_corrupt = on_corrupt
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        skipped = []
        for attempt in range(len(self.source)):
            i = (index + attempt) % len(self.source)
            with rng_scope(sample_seed(self.seed, self.epoch, index)):  # a source may draw too (digit_places)
                try:
                    image = self.source.load(i)
                except IMAGE_ERRORS as e:
                    if self.on_corrupt == 'error':
                        raise UnreadableImageError(f'unreadable image {self.source.describe(i)}: {e}') from None
                    skipped.append(self.source.describe(i))
                    if not self.training:
                        return None, self.source.targets[i], skipped
                    continue
                return self.transform(image), self.source.targets[i], skipped
        raise RuntimeError('no readable image in the dataset')


class Batch(NamedTuple):
    images: torch.Tensor | list[torch.Tensor]  # (B, 3, H, W); multi-crop samples: one (B, 3, h, w) per crop
    targets: torch.Tensor  # (B,)
    unreadable: list[str]  # the samples left out: the engine counts and lists them


def collate(batch) -> Batch:
    """Stack the readable samples (crop by crop where a transform gave each a list of crops); report the
    unreadable ones alongside."""
    skipped = [path for _, _, paths in batch for path in paths]
    kept = [(image, target) for image, target, _ in batch if image is not None]
    if not kept:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), skipped)
    if isinstance(kept[0][0], list):
        images = [torch.stack(crops) for crops in zip(*(image for image, _ in kept))]
    else:
        images = torch.stack([image for image, _ in kept])
    targets = torch.tensor([target for _, target in kept], dtype=torch.long)
    return Batch(images, targets, skipped)
