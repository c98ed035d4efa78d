import numpy as np
import pytest
import torch
from PIL import Image

from xcit.config import ConfigError, load_config
from xcit.data import build_eval_transform, build_train_transform
from xcit.data.datasets import (DigitsSource, FileSource, TransformedDataset, UnreadableImageError, collate,
                                image_folder, label_list)
from xcit.seeding import rng_scope
from xcit.data.samplers import ShardSampler, TrainSampler


def _png(path, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((12, 12, 3), value, dtype=np.uint8)).save(path)
    return path


def test_label_list_parsing(tmp_path):
    _png(tmp_path / 'img' / 'a b.png')
    _png(tmp_path / 'img' / 'c.png')
    lst = tmp_path / 'train_list.txt'
    lst.write_text('# PaddleClas style\nimg/a b.png 3\n\n   img/c.png\t0  \n')
    source = label_list(tmp_path, lst)
    assert source.targets == [3, 0] and source.paths[0].endswith('a b.png')
    assert source.classes == ['0', '1', '2', '3']
    assert source.load(0).size == (12, 12)
    relative = label_list(tmp_path, 'train_list.txt')  # list files may be given relative to the root
    assert relative.targets == [3, 0]
    lst.write_text('img/c.png zero\n')
    with pytest.raises(ConfigError, match=r'train_list.txt:1: expected'):
        label_list(tmp_path, lst)
    with pytest.raises(ConfigError, match='label list not found'):
        label_list(tmp_path, tmp_path / 'absent.txt')


def test_image_folder(tmp_path):
    for cls in ('cat', 'ant'):
        _png(tmp_path / cls / '0.png')
    source = image_folder(tmp_path)
    assert source.classes == ['ant', 'cat'] and sorted(source.targets) == [0, 1]
    with pytest.raises(ConfigError, match='not found'):
        image_folder(tmp_path / 'nope')


def test_digits_split_is_fixed_and_stratified():
    train, val = DigitsSource('train', size=16), DigitsSource('val', size=16)
    assert (len(train), len(val)) == (1438, 359)
    assert np.bincount(val.targets).min() >= 35
    assert train.load(0).size == (16, 16) and train.load(0).mode == 'RGB'
    again = DigitsSource('val', size=16)
    assert again.targets == val.targets and np.array_equal(np.asarray(again.load(5)), np.asarray(val.load(5)))


def _tiny_config(**overrides):
    return load_config([], [f'{k}={v!r}' for k, v in overrides.items()])


def test_augmentation_depends_only_on_seed_epoch_and_index():
    config = _tiny_config(**{'data.image_size': 16, 'augment.auto_augment': 'rand-m9-mstd0.5-inc1', 'augment.reprob': 0.5})
    source = DigitsSource('train', size=16)
    transform = build_train_transform(config, {})
    a = TransformedDataset(source, transform, training=True, seed=1)
    b = TransformedDataset(source, transform, training=True, seed=1)
    first = a[7][0]
    a[3], a[100]  # other samples in between change nothing
    assert torch.equal(b[7][0], first) and torch.equal(a[7][0], first)
    a.set_epoch(1)
    assert not torch.equal(a[7][0], first)


class _Flaky(FileSource):
    def load(self, index):
        if index == 1:
            raise OSError('image file is truncated')
        return Image.new('RGB', (8, 8), color=(index, 0, 0))


def test_unreadable_images_are_skipped_or_fatal():
    source = _Flaky([(f'/data/{i}.png', i % 2) for i in range(4)], ['a', 'b'])
    as_tensor = lambda img: torch.tensor(np.asarray(img), dtype=torch.float32)  # noqa: E731
    train = TransformedDataset(source, as_tensor, training=True)
    image, target, skipped = train[1]  # the next readable image takes its place
    assert skipped == ['/data/1.png'] and target == source.targets[2] and image[0, 0, 0] == 2
    val = TransformedDataset(source, as_tensor, training=False)
    images, targets, skipped = collate([val[i] for i in range(4)])
    assert len(images) == 3 and targets.tolist() == [0, 0, 1] and skipped == ['/data/1.png']
    strict = TransformedDataset(source, as_tensor, training=True, on_corrupt='error')
    with pytest.raises(UnreadableImageError, match='/data/1.png'):
        strict[1]


def test_train_sampler_shards_cover_the_data_and_resume():
    size = 10
    shards = []
    for rank in range(2):
        sampler = TrainSampler(size, num_replicas=2, rank=rank, seed=3)
        sampler.set_epoch(0)
        shards.append(list(sampler))
    assert len(shards[0]) == len(shards[1]) == 5 and set(shards[0]) | set(shards[1]) == set(range(size))
    assert not set(shards[0]) & set(shards[1])
    sampler = TrainSampler(size, seed=3)
    sampler.set_epoch(0)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != epoch0
    sampler.set_epoch(0)
    sampler.skip(4)
    assert list(sampler) == epoch0[4:] and len(sampler) == 6
    repeated = TrainSampler(size, num_replicas=2, rank=0, repeats=3)
    assert len(list(repeated)) == 5


def test_shard_sampler_counts_each_sample_once():
    indices = [i for rank in range(3) for i in ShardSampler(10, 3, rank)]
    assert sorted(indices) == list(range(10))


def test_eval_transform_uses_crop_pct():
    config = _tiny_config(**{'data.image_size': 32})
    transform = build_eval_transform(config, {'crop_pct': 1.0, 'interpolation': 'bicubic'})
    assert transform(Image.new('RGB', (64, 48))).shape == (3, 32, 32)
    names = [type(t).__name__ for t in transform.transforms]
    assert names[:2] == ['Resize', 'CenterCrop']


def test_squash_crop_mode_resizes_without_cropping():
    config = _tiny_config(**{'data.image_size': 32})
    transform = build_eval_transform(config, {'crop_pct': 1.0, 'crop_mode': 'squash', 'interpolation': 'bicubic'})
    assert transform(Image.new('RGB', (64, 48))).shape == (3, 32, 32)
    resize = transform.transforms[0]
    assert type(resize).__name__ == 'Resize' and tuple(resize.size) == (32, 32)  # both sides: nothing left to crop


def test_the_recipes_randaugment_runs_at_every_magnitude(monkeypatch):
    """rand-m9-mstd0.5-inc1 reaches magnitude 10, where posterize keeps 0 bits; Pillow 13 refuses that."""
    from PIL import ImageOps
    bits_seen = []
    original = ImageOps.posterize

    def recording_posterize(image, bits):
        bits_seen.append(bits)
        return original(image, bits)

    monkeypatch.setattr(ImageOps, 'posterize', recording_posterize)
    config = _tiny_config(**{'data.image_size': 32, 'augment.auto_augment': 'rand-m9-mstd0.5-inc1'})
    transform = build_train_transform(config, {})
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    for seed in range(3000):
        with rng_scope(seed):
            assert transform(image).shape == (3, 32, 32)
    assert 0 in bits_seen  # the case that breaks under Pillow 13 was exercised
