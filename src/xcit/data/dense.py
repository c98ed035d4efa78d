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

from ..config import Config, ConfigError
from .samplers import ShardSampler, TrainSampler
from .scenes import CLASSES, DigitScenes

DENSE_DATASETS = ('digit_scenes',)


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


def train_transforms(config: Config):
    """The joint training transforms: a horizontal flip (`augment.hflip`) and photometric jitter
    (`augment.color_jitter`), or None when both are off."""
    from torchvision.transforms import v2
    steps = []
    if config.augment.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(config.augment.hflip))
    if config.augment.color_jitter:
        j = config.augment.color_jitter
        steps.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j))
    return v2.Compose(steps) if steps else None


def build_dense_source(config: Config, split: str, transforms=None) -> DigitScenes:
    if config.data.dataset not in DENSE_DATASETS:
        raise ConfigError(f"task {config.task}: data.dataset must be one of {', '.join(DENSE_DATASETS)}, "
                          f'not {config.data.dataset!r}')
    s = config.scenes
    return DigitScenes(split, length=s.train_length if split == 'train' else s.val_length, seed=config.seed,
                       min_side=s.min_side, max_side=s.max_side, max_digits=s.max_digits,
                       digit_sizes=tuple(s.digit_sizes), transforms=transforms)


class DenseEpochLoader:
    """Training batches epoch by epoch: `set_epoch(epoch, start_batch)` reshuffles and leaves out the batches
    a resumed run already trained on."""

    def __init__(self, loader: DataLoader, sampler: TrainSampler):
        self.loader, self.sampler = loader, sampler
        self.batch_size = loader.batch_size
        self.batches_per_epoch = len(loader)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.set_epoch(epoch)
        self.sampler.skip(start_batch * self.batch_size)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self):
        return iter(self.loader)


def build_dense_loaders(config: Config, train_set, val_set, rank: int = 0, world_size: int = 1
                        ) -> tuple[DenseEpochLoader | None, DataLoader]:
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
    return DenseEpochLoader(train, sampler), val


__all__ = ['CLASSES', 'DENSE_DATASETS', 'DenseBatch', 'DenseEpochLoader', 'build_dense_loaders',
           'build_dense_source', 'dense_collate', 'pad_and_stack', 'train_transforms']
