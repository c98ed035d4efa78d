"""Data for the dense tasks: lists of images of any size with their targets, in torchvision's
detection convention, sharded and resumable like the classification loaders.

Images stay (3, H, W) floats in [0, 1] at their own sizes: the detector resizes, normalises and
pads them itself (torchvision's GeneralizedRCNNTransform); the segmentation task normalises and
pads each batch (`pad_and_stack`). Joint transforms go through `torchvision.transforms.v2`, so
boxes (`tv_tensors.BoundingBoxes`) and masks (`tv_tensors.Mask`) move with their image.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch.utils.data import DataLoader
from torchvision import tv_tensors

from ..config import Config, ConfigError
from . import EpochLoader
from .samplers import ShardSampler, TrainSampler
from .scenes import CLASSES, DigitScenes

DENSE_DATASETS = ('digit_scenes', 'coco', 'semantic_folder')


class DenseBatch(NamedTuple):
    images: list[torch.Tensor]  # (3, H_i, W_i) each, floats in [0, 1]
    targets: list[dict]  # boxes (XYXY), labels, masks, semantic, image_id
    unreadable: list[str]  # the samples left out: the engine counts and lists them


def dense_collate(items) -> DenseBatch:
    images, targets = zip(*items) if items else ((), ())
    return DenseBatch(list(images), list(targets), [])


def pad_and_stack(images: list[torch.Tensor], maps: list[torch.Tensor] | None, mean, std, divisor: int = 32,
                  ignore_index: int = 255) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Normalised images padded at the bottom and right to one size divisible by `divisor`: (B, 3, H, W),
    with their label maps padded with `ignore_index`: (B, H, W). Nothing is resized."""
    H = -(-max(im.shape[-2] for im in images) // divisor) * divisor
    W = -(-max(im.shape[-1] for im in images) // divisor) * divisor
    mean = torch.as_tensor(mean, dtype=images[0].dtype, device=images[0].device)[:, None, None]
    std = torch.as_tensor(std, dtype=images[0].dtype, device=images[0].device)[:, None, None]
    batch = images[0].new_zeros(len(images), 3, H, W)
    for i, image in enumerate(images):
        batch[i, :, :image.shape[-2], :image.shape[-1]] = (image - mean) / std
    if maps is None:
        return batch, None
    labels = maps[0].new_full((len(maps), H, W), ignore_index, dtype=torch.long)
    for i, label in enumerate(maps):
        labels[i, :label.shape[-2], :label.shape[-1]] = label
    return batch, labels


class PadBottomRight(torch.nn.Module):
    """Pad at the bottom and right to sides divisible by `divisor` and at least `at_least` (height, width):
    images and instance masks with 0, the semantic map with `ignore_index`; boxes do not move."""

    def __init__(self, divisor: int = 1, at_least: tuple[int, int] = (0, 0), ignore_index: int = 255):
        super().__init__()
        self.divisor, self.at_least, self.ignore_index = divisor, at_least, ignore_index

    def forward(self, image, target):
        from torchvision.transforms.v2 import functional as TF
        H, W = image.shape[-2:]
        H2, W2 = (-(-max(side, least) // self.divisor) * self.divisor for side, least in zip((H, W), self.at_least))
        padding = [0, 0, W2 - W, H2 - H]  # left, top, right, bottom
        image = TF.pad(image, padding, fill=0)
        target = {k: TF.pad(v, padding, fill=self.ignore_index if k == 'semantic' else 0)
                  if isinstance(v, (tv_tensors.Mask, tv_tensors.BoundingBoxes)) else v for k, v in target.items()}
        return image, target


class BoxesFromMasks(torch.nn.Module):
    """Each box made tight around what its mask still shows: after a crop, the clipped box of a cut
    instance is larger than its visible part."""

    def forward(self, image, target):
        if 'masks' not in target or not len(target['masks']):
            return image, target
        from .scenes import masks_to_boxes
        boxes = target['boxes']
        target = dict(target, boxes=tv_tensors.wrap(masks_to_boxes(target['masks'].bool()), like=boxes))
        return image, target


class WithInstances(torch.nn.Module):
    """`transform` on samples that have instances (`boxes`); a semantic map alone passes as it is."""

    def __init__(self, transform):
        super().__init__()
        self.transform = transform

    def forward(self, image, target):
        return self.transform(image, target) if 'boxes' in target else (image, target)


def joint_transforms(hflip: float = 0.0, min_sizes: tuple[int, ...] = (), max_size: int | None = None,
                     crop: tuple[int, int] | None = None, jitter: float | None = None, pad_divisor: int | None = None,
                     ignore_index: int = 255):
    """Image, boxes and masks together (torchvision.transforms.v2): flip; resize keeping the ratio, the short
    side one of `min_sizes` and the long side at most `max_size`; a random crop, dropping the instances it
    cuts away and fitting the boxes to what remains (an image smaller than the crop is padded first);
    photometric jitter; padding to a multiple of `pad_divisor`. Padding fills the semantic map with
    `ignore_index`, the rest with 0."""
    from torchvision.transforms import v2
    steps: list = []
    if hflip > 0:
        steps.append(v2.RandomHorizontalFlip(hflip))
    if min_sizes:
        steps.append(v2.RandomShortestSize(list(min_sizes), max_size=max_size))
    if crop:
        labels = lambda sample: tuple(sample[1][k] for k in ('labels', 'iscrowd') if k in sample[1])  # noqa: E731
        steps += [PadBottomRight(at_least=crop, ignore_index=ignore_index), v2.RandomCrop(crop),
                  WithInstances(v2.Compose([BoxesFromMasks(), v2.SanitizeBoundingBoxes(labels_getter=labels)]))]
    if jitter:
        steps.append(v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter))
    if pad_divisor:
        steps.append(PadBottomRight(pad_divisor, ignore_index=ignore_index))
    return v2.Compose(steps) if steps else None


def train_transforms(config: Config):
    """The joint training transforms of a config: a horizontal flip (`augment.hflip`), a ratio-keeping resize
    (`augment.short_sides`, `augment.max_side`), a random crop (`augment.crop_size`) and photometric jitter
    (`augment.color_jitter`), or None when all are off."""
    a = config.augment
    return joint_transforms(hflip=a.hflip, min_sizes=tuple(a.short_sides), max_size=a.max_side,
                            crop=a.crop_size, jitter=a.color_jitter)


def build_dense_source(config: Config, split: str, transforms=None):
    """The split's dataset: `digit_scenes`, COCO's layout (root/<split>/ images and
    root/annotations/instances_<split>.json), or label maps in ADE20K's or VOC's layout
    (`semantic_folder`, `data.semantic_layout`; segmentation only, `model.num_classes` classes)."""
    data = config.data
    if data.dataset not in DENSE_DATASETS:
        raise ConfigError(f"task {config.task}: data.dataset must be one of {', '.join(DENSE_DATASETS)}, "
                          f'not {data.dataset!r}')
    if data.dataset == 'semantic_folder':
        from .semantic import semantic_split
        if config.task != 'segmentation':
            raise ConfigError(f'task {config.task}: data.dataset semantic_folder holds label maps, for task '
                              'segmentation only')
        if config.model.num_classes is None:
            raise ConfigError('data.dataset semantic_folder: set model.num_classes, the classes its label maps '
                              'hold (e.g. 150 for ADE20K with reduce_zero_label, 21 for VOC)')
        return semantic_split(data.root, data.train_split if split == 'train' else data.val_split,
                              data.semantic_layout, transforms=transforms, reduce_zero_label=data.reduce_zero_label,
                              num_classes=config.model.num_classes)
    if data.dataset == 'coco':
        from pathlib import Path

        from .coco import CocoDetection
        name = data.train_split if split == 'train' else data.val_split
        root = Path(data.root)
        return CocoDetection(root / name, root / 'annotations' / f'instances_{name}.json', transforms=transforms)
    s = config.scenes
    return DigitScenes(split, length=s.train_length if split == 'train' else s.val_length, seed=config.seed,
                       min_side=s.min_side, max_side=s.max_side, max_digits=s.max_digits,
                       digit_sizes=tuple(s.digit_sizes), transforms=transforms)


def build_dense_loaders(config: Config, train_set, val_set, rank: int = 0, world_size: int = 1
                        ) -> tuple[EpochLoader | None, DataLoader]:
    data = config.data
    common = dict(num_workers=data.num_workers, collate_fn=dense_collate,
                  generator=torch.Generator().manual_seed(config.seed))
    val = DataLoader(val_set, batch_size=data.eval_batch_size or data.batch_size,
                     sampler=ShardSampler(len(val_set), world_size, rank), **common)
    if train_set is None:
        return None, val
    if len(train_set) < data.batch_size * world_size:
        raise ConfigError(f'the training set has {len(train_set)} images, fewer than one global batch '
                          f'({data.batch_size} x {world_size} processes)')
    sampler = TrainSampler(len(train_set), world_size, rank, seed=config.seed)
    train = DataLoader(train_set, batch_size=data.batch_size, sampler=sampler, drop_last=True, **common)
    return EpochLoader(train, sampler), val


__all__ = ['CLASSES', 'DENSE_DATASETS', 'BoxesFromMasks', 'DenseBatch', 'PadBottomRight',
           'build_dense_loaders', 'build_dense_source', 'dense_collate', 'joint_transforms', 'pad_and_stack',
           'train_transforms']
