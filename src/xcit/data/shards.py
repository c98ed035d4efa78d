"""WebDataset shards: `.tar` files of `<key>.{jpg,png,webp}` + `<key>.cls` (or `<key>.json`) samples.

`pack_split` writes them from any sample source, with an `info.json` beside
them that holds each split's shard names, their sample counts and the class
names: the counts give a stream its epoch length (hence the LR schedule).

Reading (`ShardStream`) is a stream, not an indexable set. Per epoch the shard
list is shuffled by (seed, epoch) and dealt out to ranks (rank r takes shards
r, r + world, ...); each rank reads its shards in turn through a seeded
shuffle buffer, restarting them if its share runs short, and stops after
len(shards' samples) // (batch x world) batches, so all ranks step together.
Within a rank, batch j is made by loader worker j mod workers; every worker
reads the rank's records but decodes only its own batches, so what a batch
holds does not depend on the number of workers. Resuming mid-epoch reads the
interrupted epoch's records again from its start and passes over the batches
already trained on without decoding them.
"""
from __future__ import annotations

import io
import itertools
import json
import math
import os
import tarfile
from pathlib import Path
from typing import Callable, Iterator

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..config import ConfigError
from ..seeding import rng_scope, sample_seed
from .datasets import IMAGE_ERRORS, Batch, SampleSource, UnreadableImageError, collate

INFO_FILE = 'info.json'
IMAGE_KEYS = ('jpg', 'jpeg', 'png', 'webp')
RAW_SUFFIXES = {'.jpg': 'jpg', '.jpeg': 'jpg', '.png': 'png', '.webp': 'webp'}


class ShardSet:
    """One split's shard files, its sample count and the class names, from `info.json`."""

    def __init__(self, urls: list[str], lengths: list[int], classes: list[str]):
        self.urls, self.lengths, self.classes = urls, lengths, classes

    def __len__(self) -> int:
        return sum(self.lengths)


def read_info(folder: Path) -> dict:
    path = folder / INFO_FILE
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text(encoding='utf-8'))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f'{path}: not a JSON shard index ({e})') from None
    if not isinstance(info, dict) or not isinstance(info.get('splits', {}), dict):
        raise ConfigError(f'{path}: expected {{"classes": [...], "splits": {{...}}}}')
    return info


def shard_set(root: str | os.PathLike, split: str) -> ShardSet:
    """`split` of the shards in `root`: a split name of its info.json (as `xcit data pack` writes), or a brace
    pattern of `.tar` files relative to `root` (`train-{000000..000009}.tar`) that info.json has counts for."""
    import braceexpand
    folder = Path(root)
    if not folder.is_dir():
        raise ConfigError(f'shard folder not found: {folder}')
    info = read_info(folder)
    splits = info.get('splits', {})
    counts = {name: length for entry in splits.values()
              for name, length in zip(entry.get('filenames', []), entry.get('shard_lengths', []))}
    if split in splits:
        names = list(splits[split].get('filenames', []))
    elif '.tar' in split:
        names = list(braceexpand.braceexpand(split))
    elif not (folder / INFO_FILE).is_file():
        raise ConfigError(f'{folder / INFO_FILE} not found: write shards with `xcit data pack`, or give a brace '
                          f'pattern of .tar shards for split {split!r}')
    else:
        raise ConfigError(f"{folder / INFO_FILE}: no split {split!r} (splits: {', '.join(splits) or 'none'}); "
                          f'give a split of it or a brace pattern of .tar shards')
    if not names:
        raise ConfigError(f'{folder}: split {split!r} lists no shards')
    for name in names:
        if not (folder / name).is_file():
            raise ConfigError(f'shard not found: {folder / name}')
        if name not in counts:
            raise ConfigError(f'{folder / INFO_FILE}: no sample count for {name}; write shards with '
                              f'`xcit data pack`, or list them with their shard_lengths there')
    classes = info.get('classes')
    if not isinstance(classes, list) or not classes:
        raise ConfigError(f'{folder / INFO_FILE}: no "classes" list')
    return ShardSet([str(folder / n) for n in names], [int(counts[n]) for n in names], [str(c) for c in classes])


def decode_record(record: dict) -> tuple[Image.Image, int]:
    """The RGB image and class index of one record; an OSError-family error when either cannot be had."""
    image_key = next((k for k in IMAGE_KEYS if k in record), None)
    if image_key is None:
        raise ValueError(f"no image ({', '.join(IMAGE_KEYS)}) in the record")
    if 'cls' in record:
        label = int(record['cls'].decode().strip())
    elif 'json' in record:
        meta = json.loads(record['json'])
        label = int(meta['label'] if 'label' in meta else meta['cls'])
    else:
        raise ValueError('no label (cls or json) in the record')
    with Image.open(io.BytesIO(record[image_key])) as img:
        return img.convert('RGB'), label


def shard_records(url: str, expected: int) -> Iterator[dict]:
    """The records of one shard; when it holds fewer than info.json says (a file cut short), a last record
    without an image that names the shortfall, so that it is reported as unreadable rather than unnoticed."""
    import webdataset as wds
    count, reason = 0, 'cut short?'
    try:
        for count, record in enumerate(wds.tarfile_to_samples()([{'url': url}]), start=1):
            yield record
    except (tarfile.TarError, OSError) as e:  # not a tar, or damaged past this record
        reason = f'{type(e).__name__}: {e.args[0] if e.args else e}'
    if count < expected:
        yield {'__url__': url, '__key__': f'{expected - count} of {expected} samples missing ({reason})'}


class ShardStream(IterableDataset):
    """Batches (`datasets.Batch`) of one rank's share of a shard set; see the module's docstring.

    training: shuffled shards and samples, `batches` full batches per epoch;
    evaluation: the rank's shards once, in order, the last batch short.
    """

    def __init__(self, shards: ShardSet, transform: Callable, batch_size: int, training: bool, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle_buffer: int = 1000, on_corrupt: str = 'skip'):
        self.shards, self.transform, self.batch_size, self.training = shards, transform, batch_size, training
        self.rank, self.world_size, self.seed, self.shuffle_buffer = rank, world_size, seed, shuffle_buffer
        self.on_corrupt = on_corrupt
        self.epoch, self.start_batch = 0, 0
        if training and len(shards.urls) < world_size:
            raise ConfigError(f'{len(shards.urls)} training shards for {world_size} processes: every process '
                              f'needs one at least; pack with a smaller --shard-size')
        empty = [url for url, length in zip(shards.urls, shards.lengths) if not length]
        if training and empty:  # a process dealt only empty shards would wait for samples forever
            raise ConfigError(f'{empty[0]}: an empty training shard (info.json says 0 samples)')
        self.batches = len(shards) // (batch_size * world_size) if training else None

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def rank_shards(self, epoch: int | None = None) -> list[str]:
        """The shards this rank reads in `epoch`, in reading order."""
        urls = list(self.shards.urls)
        if self.training and self.shuffle_buffer > 0:
            order = torch.randperm(len(urls), generator=torch.Generator().manual_seed(
                sample_seed(self.seed, self.epoch if epoch is None else epoch)))
            urls = [urls[i] for i in order]
        return urls[self.rank::self.world_size]

    def records(self) -> Iterator[dict]:
        """This rank's raw records of the epoch: its shards (over and over in training), shuffled when asked."""
        import webdataset as wds
        urls = self.rank_shards()
        if not urls:
            return
        lengths = dict(zip(self.shards.urls, self.shards.lengths))
        for repeat in itertools.count():  # a share too short for the epoch is read again, reshuffled
            stream = itertools.chain.from_iterable(shard_records(url, lengths[url]) for url in urls)
            if self.training and self.shuffle_buffer > 0:
                stream = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer,
                                     seed=sample_seed(self.seed, self.epoch, self.rank, repeat))(stream)
            yield from stream
            if not self.training:
                return

    def __iter__(self) -> Iterator[Batch]:
        worker = get_worker_info()
        worker_id, workers = (worker.id, worker.num_workers) if worker else (0, 1)
        skip = self.start_batch * self.batch_size
        end = self.batches * self.batch_size if self.training else math.inf
        pending: list = []
        for position, record in enumerate(self.records()):
            if position >= end:
                break
            batch_index = position // self.batch_size
            if position < skip or (batch_index - self.start_batch) % workers != worker_id:
                continue  # passed over: before the resume point, or another worker's batch
            pending.append(self.sample(record, position))
            if len(pending) == self.batch_size:
                yield self.collate(pending, batch_index)
                pending = []
        if pending:
            yield self.collate(pending, None)

    def sample(self, record: dict, position: int):
        """(image, label, unreadable) of one record, as `datasets.collate` takes them."""
        where = f"{record.get('__url__', '?')}:{record.get('__key__', '?')}"
        try:
            image, label = decode_record(record)
        except (*IMAGE_ERRORS, KeyError, TypeError) as e:
            if self.on_corrupt == 'error':
                raise UnreadableImageError(f'unreadable image {where}: {e}') from None
            return None, -1, [where]
        with rng_scope(sample_seed(self.seed, self.epoch, self.rank, position)):
            return self.transform(image), label, []

    def collate(self, samples: list, batch_index: int | None) -> Batch:
        batch = collate(samples)
        if self.training and not len(batch.targets):
            raise UnreadableImageError(f'every image of batch {batch_index} is unreadable: '
                                       f"{', '.join(batch.unreadable[:3])}, ...")
        return batch


class StreamLoader:
    """The engine's view of a training stream: `set_epoch(epoch, start_batch)`, a length, batches."""

    def __init__(self, stream: ShardStream, num_workers: int, pin_memory: bool = False):
        self.stream, self.batch_size = stream, stream.batch_size
        self.loader = DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.stream.set_epoch(epoch, start_batch)

    def __len__(self) -> int:
        return self.stream.batches

    def __iter__(self):
        return iter(self.loader)


def eval_stream_loader(shards: ShardSet, transform: Callable, batch_size: int, rank: int, world_size: int,
                       num_workers: int, on_corrupt: str, pin_memory: bool = False) -> DataLoader:
    """Each rank's shards once, in order: every sample is counted once over the ranks."""
    stream = ShardStream(shards, transform, batch_size, training=False, rank=rank, world_size=world_size,
                         on_corrupt=on_corrupt)
    return DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory)


def _record(source: SampleSource, index: int) -> dict | None:
    """The record of sample `index`: a file's own bytes when it already is a JPEG, PNG or WebP, else a PNG."""
    record = {'cls': str(source.targets[index])}
    path = getattr(source, 'paths', None)
    if path is not None:
        kind = RAW_SUFFIXES.get(Path(path[index]).suffix.lower())
        if kind is not None:  # copied unread: a corrupt file stays corrupt, and training skips and counts it
            try:
                record[kind] = Path(path[index]).read_bytes()
            except OSError:
                return None
            return record
    try:
        image = source.load(index)
    except IMAGE_ERRORS:
        return None
    buffer = io.BytesIO()
    image.save(buffer, format='PNG')
    record['png'] = buffer.getvalue()
    return record


def pack_split(source: SampleSource, folder: str | os.PathLike, split: str, shard_size: int) -> tuple[dict, list[str]]:
    """Write `source` to `folder/<split>-NNNNNN.tar` shards of `shard_size` samples, in order, and record them
    in `folder/info.json`; the split's entry and the samples that could not be written."""
    import webdataset as wds
    folder = Path(folder)
    if not len(source):
        raise ConfigError(f'split {split!r} has no samples to pack')
    folder.mkdir(parents=True, exist_ok=True)
    info = read_info(folder)
    known, classes = info.get('classes') or [], list(source.classes)
    if known[:len(classes)] != classes[:len(known)]:  # a label list's split may lack the last classes
        raise ConfigError(f'{folder / INFO_FILE}: its other splits have other classes; pack into another folder')
    pattern = str(folder / f'{split}-%06d.tar')
    existing = sorted(p.name for p in folder.glob(f'{split}-*.tar'))
    if existing:
        raise ConfigError(f'{folder / existing[0]} exists: pack split {split!r} into a folder without its shards')
    lengths, unreadable = [], []
    try:
        with wds.ShardWriter(pattern, maxcount=shard_size, verbose=0) as writer:
            for index in range(len(source)):
                record = _record(source, index)
                if record is None:
                    unreadable.append(source.describe(index))
                    continue
                if writer.count >= shard_size or not lengths:
                    lengths.append(0)
                writer.write({'__key__': f'{index:08d}', **record})
                lengths[-1] += 1
        if not lengths:
            raise ConfigError(f'split {split!r}: none of its {len(source)} images can be read')
    except BaseException:  # no half-written split: its shards go, the other splits and info.json stay
        for shard in folder.glob(f'{split}-*.tar'):
            shard.unlink()
        raise
    names = [f'{split}-{i:06d}.tar' for i in range(len(lengths))]
    entry = dict(filenames=names, shard_lengths=lengths, num_samples=sum(lengths))
    info.setdefault('splits', {})[split] = entry
    info['classes'] = max(known, classes, key=len)
    written = folder / f'.{INFO_FILE}.partial'
    written.write_text(json.dumps(info, indent=1) + '\n', encoding='utf-8')
    written.replace(folder / INFO_FILE)
    return entry, unreadable
