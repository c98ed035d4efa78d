"""Datasets, transforms and loaders built from a run configuration."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from ..config import ConfigError, Config
from ..registry import IMAGENET_MEAN, IMAGENET_STD
from .datasets import DigitsSource, SampleSource, TransformedDataset, collate, image_folder, label_list
from .samplers import ShardSampler, TrainSampler
from .shards import ShardSet, ShardStream, StreamLoader, eval_stream_loader, shard_set

__all__ = ['DataBundle', 'EpochLoader', 'build_data', 'build_eval_loader', 'build_eval_transform', 'build_mixup', 'build_source', 'build_train_transform',
           'input_spec']


def build_source(config: Config, split: str, renders: int = 1) -> SampleSource | ShardSet:
    """A split's samples; `renders` > 1 (digit_places' train split) draws each sample that many times anew."""
    data = config.data
    name = data.train_split if split == 'train' else data.val_split
    if data.dataset == 'webdataset':
        return shard_set(data.root, name)
    if data.dataset == 'digits':
        return DigitsSource(split, size=data.digits_size)
    if data.dataset == 'digit_views':
        from .views import DigitViews
        return DigitViews(split, size=data.digits_size, views=data.views_per_digit if split == 'train' else 1,
                          seed=config.seed)
    if data.dataset == 'digit_places':
        from .views import DigitPlaces
        return DigitPlaces(split, size=data.digits_size, views=data.views_per_digit if split == 'train' else 1,
                           seed=config.seed, renders=renders)
    if data.dataset == 'imagefolder':
        from pathlib import Path
        return image_folder(Path(data.root) / name)
    return label_list(data.root, name)


def input_spec(config: Config, model_cfg: dict) -> dict:
    """Size, interpolation, crop and normalisation: the config's, else the model's pretrained cfg."""
    data = config.data
    return dict(
        size=data.image_size or model_cfg.get('input_size', (3, 224, 224))[-1],
        interpolation=data.interpolation or model_cfg.get('interpolation', 'bicubic'),
        crop_pct=data.crop_pct or model_cfg.get('crop_pct', 1.0),
        crop_mode=model_cfg.get('crop_mode', 'center'),
        mean=tuple(data.mean or model_cfg.get('mean', IMAGENET_MEAN)),
        std=tuple(data.std or model_cfg.get('std', IMAGENET_STD)),
    )


def build_train_transform(config: Config, model_cfg: dict):
    from timm.data import create_transform
    spec, aug = input_spec(config, model_cfg), config.augment
    return create_transform(
        spec['size'], is_training=True, scale=aug.scale, ratio=aug.ratio, hflip=aug.hflip,
        color_jitter=aug.color_jitter or 0.0, auto_augment=aug.auto_augment, interpolation=spec['interpolation'],
        mean=spec['mean'], std=spec['std'], re_prob=aug.reprob, re_mode=aug.remode, re_count=aug.recount)


def build_eval_transform(config: Config, model_cfg: dict):
    """Resize the short side to size / crop_pct, then center-crop `size` (crop_pct 1.0: no border lost).

    Models whose cfg says `crop_mode: squash` (CvT at 384) are resized to size x size instead, as evaluated.
    """
    from timm.data import create_transform
    spec = input_spec(config, model_cfg)
    return create_transform(spec['size'], is_training=False, interpolation=spec['interpolation'],
                            crop_pct=spec['crop_pct'], crop_mode=spec['crop_mode'], mean=spec['mean'], std=spec['std'])


def build_mixup(config: Config, num_classes: int):
    """timm's Mixup/CutMix (with label smoothing folded into its targets), or None when both are off."""
    aug = config.augment
    if aug.mixup <= 0 and aug.cutmix <= 0:
        return None
    from timm.data import Mixup
    return Mixup(mixup_alpha=aug.mixup, cutmix_alpha=aug.cutmix, prob=aug.mixup_prob, switch_prob=aug.mixup_switch_prob,
                 mode=aug.mixup_mode, label_smoothing=aug.smoothing, num_classes=num_classes)


class EpochLoader:
    """Training batches epoch by epoch, as the engine drives them: `set_epoch(epoch, start_batch)`
    shuffles and augments for that epoch and leaves out the batches a resumed run already trained on."""

    def __init__(self, loader: DataLoader, sampler: TrainSampler, dataset: TransformedDataset | None = None):
        self.loader, self.sampler, self.dataset = loader, sampler, dataset
        self.batch_size = loader.batch_size
        self.batches_per_epoch = len(loader)  # counted before any skip

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.set_epoch(epoch)
        if self.dataset is not None:  # augmentation seeded per epoch; the dense data draws from the step's scope
            self.dataset.set_epoch(epoch)
        self.sampler.skip(start_batch * self.batch_size)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self):
        return iter(self.loader)


@dataclass
class DataBundle:
    train: EpochLoader | None
    val: DataLoader
    classes: list[str]


def build_eval_loader(config: Config, model_cfg: dict, source: SampleSource | ShardSet, rank: int = 0,
                      world_size: int = 1, pin_memory: bool = False) -> DataLoader:
    """`source` through the evaluation transform, in order, each rank its exact share."""
    data = config.data
    if isinstance(source, ShardSet):
        return eval_stream_loader(source, build_eval_transform(config, model_cfg), data.eval_batch_size or data.batch_size,
                                  rank, world_size, data.num_workers, data.on_corrupt, pin_memory)
    dataset = TransformedDataset(source, build_eval_transform(config, model_cfg), training=False,
                                 on_corrupt=data.on_corrupt, seed=config.seed)
    return DataLoader(dataset, batch_size=data.eval_batch_size or data.batch_size,
                      sampler=ShardSampler(len(dataset), world_size, rank), num_workers=data.num_workers,
                      collate_fn=collate, pin_memory=pin_memory, generator=torch.Generator().manual_seed(config.seed))


def build_data(config: Config, model_cfg: dict, train_source: SampleSource | ShardSet | None,
               val_source: SampleSource | ShardSet,
               rank: int = 0, world_size: int = 1, pin_memory: bool = False, train_transform=None) -> DataBundle:
    """Loaders for training (sharded, shuffled, resumable; none without a source) and evaluation (sharded, exact).

    `train_transform` (default: the classification augmentation) lets a task shape its training samples
    (DINO's multi-crop).
    """
    data = config.data
    # a generator of the loader's own: workers' base seeds then leave the global generator alone
    common = dict(num_workers=data.num_workers, collate_fn=collate, pin_memory=pin_memory,
                  generator=torch.Generator().manual_seed(config.seed))
    val = build_eval_loader(config, model_cfg, val_source, rank, world_size, pin_memory)
    if train_source is None:
        return DataBundle(None, val, val_source.classes)
    if len(train_source) < data.batch_size * world_size:
        raise ConfigError(f'the training set has {len(train_source)} images, fewer than one global batch '
                          f'({data.batch_size} x {world_size} processes)')
    transform = train_transform or build_train_transform(config, model_cfg)
    if isinstance(train_source, ShardSet):
        stream = ShardStream(train_source, transform, data.batch_size, training=True, rank=rank,
                             world_size=world_size, seed=config.seed, shuffle_buffer=data.shuffle_buffer,
                             on_corrupt=data.on_corrupt)
        return DataBundle(StreamLoader(stream, data.num_workers, pin_memory), val, train_source.classes)
    train_set = TransformedDataset(train_source, transform, training=True, on_corrupt=data.on_corrupt, seed=config.seed)
    sampler = TrainSampler(len(train_set), world_size, rank, seed=config.seed, repeats=config.augment.repeated_aug)
    train = DataLoader(train_set, batch_size=data.batch_size, sampler=sampler, drop_last=True, **common)
    return DataBundle(EpochLoader(train, sampler, train_set), val, train_source.classes)
