"""Semantic segmentation data as folders of images and PNG label maps, paired by file stem.

Label maps are single-channel PNGs whose pixel values are class indices: grayscale (ADE20K) or
palette-mode (VOC, read as their indices, never through the palette's colours). 255 is ignored.
Items have the form of `digit_scenes`' for the segmentation task: a (3, H, W) image in [0, 1] and
a target with `semantic` ((H, W) long labels, a `tv_tensors.Mask`, so joint transforms move it
with the image) and `image_id` (the item's index).

Two layouts are read (`semantic_split`):
- ade20k: <root>/images/<split>/*.jpg with <root>/annotations/<split>/*.png; ADE20K names its
  splits `training` and `validation`, and marks unlabelled pixels 0 (`reduce_zero_label`);
- voc: <root>/JPEGImages with <root>/SegmentationClass, only the stems listed in
  <root>/ImageSets/Segmentation/<split>.txt (most VOC photos have no label map).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torchvision import tv_tensors

from ..config import ConfigError

IGNORE_INDEX = 255  # the segmentation task's: pixels with this label count in no loss and no score
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png')
LAYOUTS = ('ade20k', 'voc')


class SemanticFolder(torch.utils.data.Dataset):
    """Each image of `image_root` (jpg, jpeg or png, sorted by stem) with the `<stem>.png` label map in
    `label_root`; `stems`: only these images (a split list). The classes are `classes` (names) or
    `num_classes` (named by their index); label values must be class indices or 255.

    `reduce_zero_label` (ADE20K): label 0 ('other') becomes 255 and every other label drops by one, so
    the raw maps hold 0..num_classes.
    """

    def __init__(self, image_root: str | os.PathLike, label_root: str | os.PathLike, transforms=None,
                 reduce_zero_label: bool = False, classes: Sequence[str] | None = None,
                 num_classes: int | None = None, stems: Sequence[str] | None = None):
        if classes is None and num_classes is None:
            raise ConfigError('semantic folder: the number of classes is unknown (give classes or num_classes)')
        if classes is not None and num_classes is not None and len(classes) != num_classes:
            raise ConfigError(f'semantic folder: {len(classes)} class names for {num_classes} classes')
        self.classes = [str(c) for c in classes] if classes is not None else [str(i) for i in range(num_classes)]
        self.num_classes = len(self.classes)
        if not 1 <= self.num_classes <= IGNORE_INDEX:
            raise ConfigError(f'semantic folder: {self.num_classes} classes; label maps hold 1 to {IGNORE_INDEX} '
                              f'classes ({IGNORE_INDEX} is the ignored label)')
        self.image_root, self.label_root = Path(image_root), Path(label_root)
        self.transforms, self.reduce_zero_label = transforms, reduce_zero_label
        images = _images_by_stem(self.image_root)
        if stems is not None:
            missing = sorted(set(stems) - set(images))
            if missing:
                raise ConfigError(f'{self.image_root}: no image for {len(missing)} listed stems '
                                  f'({_some(missing)})')
            images = {stem: images[stem] for stem in set(stems)}
        if not images:
            raise ConfigError(f"{self.image_root}: no images ({', '.join(IMAGE_SUFFIXES)}) to segment")
        if not self.label_root.is_dir():
            raise ConfigError(f'label folder not found: {self.label_root}')
        self.stems = sorted(images)
        self.images = [images[stem] for stem in self.stems]
        self.labels = [self.label_root / f'{stem}.png' for stem in self.stems]
        unlabelled = [stem for stem, label in zip(self.stems, self.labels) if not label.is_file()]
        if unlabelled:
            raise ConfigError(f'{self.label_root}: no label map (<stem>.png) for {len(unlabelled)} of '
                              f'{len(self.stems)} images ({_some(unlabelled)})')

    def __len__(self) -> int:
        return len(self.images)

    def describe(self, index: int) -> str:
        return str(self.images[index])

    def __getitem__(self, index: int):
        from torchvision.transforms.v2.functional import pil_to_tensor

        from .datasets import read_image
        image = pil_to_tensor(read_image(self.images[index])).float() / 255  # (3, H, W)
        raw = read_label_map(self.labels[index])  # (H, W) int64
        if raw.shape != tuple(image.shape[-2:]):
            raise ValueError(f'{self.labels[index]}: label map of {raw.shape[1]}x{raw.shape[0]} pixels for the '
                             f'{image.shape[-1]}x{image.shape[-2]} image {self.images[index]}')
        label = self._classes_of(raw, self.labels[index])
        target = {'semantic': tv_tensors.Mask(torch.from_numpy(label)), 'image_id': index}
        image = tv_tensors.Image(image)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def _classes_of(self, raw: np.ndarray, path: Path) -> np.ndarray:
        """The class of each pixel, or 255; a raw value that is neither fails naming the file."""
        n, ignored = self.num_classes, raw == IGNORE_INDEX
        wrong = ~ignored & (raw > n if self.reduce_zero_label else raw >= n)
        if wrong.any():
            allowed = f'1..{n} (0 and {IGNORE_INDEX} ignored, reduce_zero_label)' if self.reduce_zero_label \
                else f'0..{n - 1} (and {IGNORE_INDEX}, ignored)'
            values = np.unique(raw[wrong]).tolist()
            raise ValueError(f'{path}: label values {_some(values)} are not classes: {n} classes take {allowed}')
        if not self.reduce_zero_label:
            return raw
        return np.where(ignored | (raw == 0), IGNORE_INDEX, raw - 1)


def read_label_map(path: str | os.PathLike) -> np.ndarray:
    """The (H, W) int64 values of a single-channel label map (a palette image's indices, not its colours);
    any reason it cannot be read is a ValueError naming the file."""
    from PIL import Image

    from .datasets import IMAGE_ERRORS
    try:
        with Image.open(path) as img:
            mode = img.mode
            values = np.array(img) if len(img.getbands()) == 1 else None
    except IMAGE_ERRORS as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else ' '.join(str(e).split())[:200]
        raise ValueError(f'{path}: cannot read the label map ({reason})') from None
    if values is None:
        raise ValueError(f'{path}: a {mode} label map; label maps have one channel of class indices '
                         '(palette or grayscale)')
    if values.dtype.kind not in 'biu':
        raise ValueError(f'{path}: label values of type {values.dtype}, not integers')
    return values.astype(np.int64)


def semantic_split(root: str | os.PathLike, split: str, layout: str = 'ade20k', **kwargs) -> SemanticFolder:
    """The `split` of the dataset at `root` in `layout` ('ade20k' or 'voc', see the module's docstring);
    `kwargs` go to `SemanticFolder`."""
    root = Path(root)
    if layout == 'ade20k':
        images, labels = root / 'images' / split, root / 'annotations' / split
        if not images.is_dir():
            present = sorted(p.name for p in (root / 'images').iterdir() if p.is_dir()) \
                if (root / 'images').is_dir() else []
            there = f" ({root / 'images'} has {', '.join(present)})" if present else ''
            raise ConfigError(f'image folder not found: {images}{there}')
        return SemanticFolder(images, labels, **kwargs)
    if layout == 'voc':
        listing = root / 'ImageSets' / 'Segmentation' / f'{split}.txt'
        if not listing.is_file():
            raise ConfigError(f'VOC split list not found: {listing}')
        stems = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
        return SemanticFolder(root / 'JPEGImages', root / 'SegmentationClass', stems=stems, **kwargs)
    raise ConfigError(f"semantic folder layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")


def _images_by_stem(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise ConfigError(f'image folder not found: {folder}')
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if path.stem in found:
            raise ConfigError(f'{folder}: two images share the stem {path.stem!r} ({found[path.stem].name}, '
                              f'{path.name}); each pairs with one label map')
        found[path.stem] = path
    return found


def _some(items: Sequence, shown: int = 5) -> str:
    """The first few items, comma-separated, with how many more there are."""
    text = ', '.join(map(str, items[:shown]))
    return text + (f' and {len(items) - shown} more' if len(items) > shown else '')
