"""`data.dataset: semantic_folder`: images paired with PNG label maps in ADE20K's and VOC's layouts, their labels
as written (palette indices, ADE20K's zero label), an evaluation through the segmentation task, and each kind of
bad folder refused with the problem named."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import yaml
from PIL import Image

from xcit.config import ConfigError, load_config
from xcit.data.dense import build_dense_source, joint_transforms
from xcit.data.semantic import SemanticFolder, semantic_split
from xcit.engine.distributed import DistEnv
from xcit.tasks import build_task

ENV = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device('cpu'))
# the colour each raw label is painted in; far apart, so a JPEG's small errors never make one look like another
COLOURS = np.array([[128, 128, 128], [230, 30, 30], [30, 200, 40], [40, 50, 220], [240, 220, 30]], dtype=np.uint8)
VOC_PALETTE = [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0] + [0] * (3 * 251) + [224, 224, 192]  # 0-3, 255


def _blocks(rows: int, cols: int, values, seed: int) -> np.ndarray:
    """A label map of 8x8 blocks drawn from `values`: JPEG's 8x8 tiles keep each block's colour clean."""
    grid = np.random.default_rng(seed).choice(values, size=(rows, cols)).astype(np.uint8)
    return np.kron(grid, np.ones((8, 8), dtype=np.uint8))


def _palette_png(path, labels: np.ndarray) -> None:
    image = Image.frombytes('P', labels.shape[::-1], np.ascontiguousarray(labels, dtype=np.uint8).tobytes())
    image.putpalette(VOC_PALETTE)
    image.save(path)


def _photo(path, labels: np.ndarray) -> None:
    """An image showing each pixel's raw label as its colour."""
    Image.fromarray(COLOURS[labels]).save(path, quality=100, subsampling=0)


def _ade(root, sizes=(((5, 7), (4, 6)), ((6, 4), (4, 5)))) -> dict:
    """ADE20K's layout: grayscale label maps with 0 ('other') to 4 in blocks, JPEG images; raw maps by stem."""
    maps = {}
    for split, split_sizes in zip(('training', 'validation'), sizes):
        (root / 'images' / split).mkdir(parents=True)
        (root / 'annotations' / split).mkdir(parents=True)
        for i, (rows, cols) in enumerate(split_sizes):
            stem = f'ADE_{split}_{i:08d}'
            labels = _blocks(rows, cols, range(5), seed=len(maps))
            _photo(root / 'images' / split / f'{stem}.jpg', labels)
            Image.fromarray(labels).save(root / 'annotations' / split / f'{stem}.png')
            maps[stem] = labels
    return maps


def _voc(root) -> dict:
    """VOC's layout: palette label maps with a 255 border around each object, split lists, and a photo that is
    in no list and has no label map (most of VOC's)."""
    for folder in ('JPEGImages', 'SegmentationClass', 'ImageSets/Segmentation'):
        (root / folder).mkdir(parents=True)
    maps = {}
    for stem, seed in (('2007_000032', 0), ('2007_000039', 1), ('2008_000002', 2)):
        labels = _blocks(4, 5, range(4), seed=seed)
        labels[7:9, :] = 255  # the boundary VOC leaves unlabelled
        _photo(root / 'JPEGImages' / f'{stem}.jpg', np.where(labels == 255, 0, labels))
        _palette_png(root / 'SegmentationClass' / f'{stem}.png', labels)
        maps[stem] = labels
    _photo(root / 'JPEGImages' / '2009_000001.jpg', np.zeros((16, 16), dtype=np.uint8))
    (root / 'ImageSets' / 'Segmentation' / 'train.txt').write_text('2008_000002\n2007_000032\n')
    (root / 'ImageSets' / 'Segmentation' / 'val.txt').write_text('2007_000039\n')
    return maps


def test_ade20k_maps_come_through_as_written_or_with_the_zero_label_ignored(tmp_path):
    maps = _ade(tmp_path)
    plain = semantic_split(tmp_path, 'training', num_classes=5)
    assert len(plain) == 2 and plain.classes == ['0', '1', '2', '3', '4']
    for i, stem in enumerate(sorted(s for s in maps if 'training' in s)):
        image, target = plain[i]
        assert plain.describe(i).endswith(f'images/training/{stem}.jpg') and target['image_id'] == i
        assert image.shape == (3, *maps[stem].shape) and 0 <= image.min() and image.max() <= 1
        semantic = target['semantic']
        assert semantic.dtype == torch.long and torch.equal(semantic, torch.from_numpy(maps[stem]).long())

    Image.fromarray(np.array([[0, 1, 2, 3, 4, 255]] * 2, dtype=np.uint8)).save(
        tmp_path / 'annotations' / 'training' / 'ADE_training_00000000.png')
    Image.new('RGB', (6, 2)).save(tmp_path / 'images' / 'training' / 'ADE_training_00000000.jpg')
    reduced = semantic_split(tmp_path, 'training', num_classes=4, reduce_zero_label=True)
    assert reduced[0][1]['semantic'].tolist() == [[255, 0, 1, 2, 3, 255]] * 2  # 'other' ignored, 255 stays


def test_voc_palette_maps_read_as_indices_and_only_the_listed_images(tmp_path):
    maps = _voc(tmp_path)
    train = semantic_split(tmp_path, 'train', layout='voc', classes=['background', 'aeroplane', 'bicycle', 'bird'])
    names = [train.describe(i).rsplit('/', 1)[1] for i in range(len(train))]
    assert names == ['2007_000032.jpg', '2008_000002.jpg']  # sorted by stem, not in the list's order
    assert train.classes[1] == 'aeroplane'
    with Image.open(tmp_path / 'SegmentationClass' / '2007_000032.png') as png:
        assert png.mode == 'P' and not np.array_equal(np.array(png.convert('L')), maps['2007_000032'])  # colours
    for i, stem in enumerate(('2007_000032', '2008_000002')):
        semantic = train[i][1]['semantic']
        assert torch.equal(semantic, torch.from_numpy(maps[stem]).long())
        assert set(semantic.unique().tolist()) <= {0, 1, 2, 3, 255} and (semantic[7:9] == 255).all()
    assert len(semantic_split(tmp_path, 'val', layout='voc', num_classes=4)) == 1


def test_joint_transforms_move_the_label_map_with_its_image(tmp_path):
    maps = _ade(tmp_path)
    stem = 'ADE_training_00000000'
    data = semantic_split(tmp_path, 'training', num_classes=5, transforms=joint_transforms(hflip=1.0, pad_divisor=32))
    image, target = data[0]
    h, w = maps[stem].shape
    assert image.shape[-2:] == target['semantic'].shape == (64, 64)
    assert torch.equal(target['semantic'][:h, :w], torch.from_numpy(maps[stem][:, ::-1].copy()).long())
    assert (target['semantic'][h:] == 255).all() and (target['semantic'][:, w:] == 255).all()



def test_a_crop_larger_than_the_image_pads_the_label_map_with_the_ignore_label(tmp_path):
    _ade(tmp_path)
    data = semantic_split(tmp_path, 'training', num_classes=5,
                          transforms=joint_transforms(min_sizes=(40,), max_size=400, crop=(48, 80)))
    image, target = data[0]  # 40 x 56 after the resize, then padded for the 48 x 80 crop
    assert image.shape[-2:] == target['semantic'].shape == (48, 80) and 'boxes' not in target
    assert (target['semantic'][40:] == 255).all() and set(target['semantic'][:40, :56].unique().tolist()) <= set(range(5))


class _ColourReader(nn.Module):
    """Answers each pixel's class from its colour: right exactly when every image is paired with its own map."""

    def __init__(self, mean, std, colours):
        super().__init__()
        self.mean, self.std = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]
        self.colours = torch.from_numpy(colours).float() / 255  # (K, 3)

    def forward(self, images):
        pixels = images * self.std + self.mean  # (B, 3, H, W)
        return -(pixels[:, None] - self.colours[None, :, :, None, None]).square().sum(2)  # (B, K, H, W)


def _config(tmp_path, root, **data) -> object:
    config = {'task': 'segmentation', 'experiment': 'folder', 'output_dir': str(tmp_path / 'runs'),
              'model': {'name': 'semfpn_xcit_nano_12_p16', 'num_classes': 4, 'kwargs': {'fpn_channels': 16}},
              'data': {'dataset': 'semantic_folder', 'root': str(root), 'train_split': 'training',
                       'val_split': 'validation', 'reduce_zero_label': True, 'batch_size': 2, 'num_workers': 0,
                       **data},
              'augment': {'hflip': 0.5}, 'schedule': {'epochs': 1, 'warmup_epochs': 0}, 'train': {'progress': False}}
    path = tmp_path / 'folder.yaml'
    path.write_text(yaml.safe_dump(config))
    return load_config(path)


def test_the_segmentation_task_evaluates_a_semantic_folder(tmp_path):
    _ade(tmp_path / 'ade', sizes=(((5, 7), (4, 6)), ((6, 4), (4, 5), (3, 3))))
    task = build_task(_config(tmp_path, tmp_path / 'ade'))
    assert task.num_classes == 4 and task.classes == ['0', '1', '2', '3']
    assert len(task.train_set) == 2 and len(task.val_set) == 3
    task.setup(ENV, fresh=True)
    batches = list(task.eval_batches())
    assert len({im.shape for im in batches[0].images}) > 1  # images of different sizes share a batch
    reader = _ColourReader(task.mean, task.std, COLOURS[1:])  # raw labels 1-4 are classes 0-3; 0 is ignored
    metrics = task.evaluate(reader, batches)
    assert metrics['mIoU'] == pytest.approx(1.0) and metrics['pixel_accuracy'] == pytest.approx(1.0)
    shifted = _ColourReader(task.mean, task.std, COLOURS[:4])  # without the reduction every class is off by one
    assert task.evaluate(shifted, batches)['pixel_accuracy'] < 0.5
    assert set(metrics) >= {f'IoU_{c}' for c in task.classes}


def _unlabelled(root):
    (root / 'annotations' / 'training' / 'ADE_training_00000001.png').unlink()


def _resized_map(root):
    Image.new('L', (9, 7), 1).save(root / 'annotations' / 'training' / 'ADE_training_00000001.png')


def _bad_value(value):
    def write(root):
        labels = np.ones((32, 48), dtype=np.uint8)
        labels[3, 4] = value
        Image.fromarray(labels).save(root / 'annotations' / 'training' / 'ADE_training_00000001.png')
    return write


def _rgb_map(root):
    Image.new('RGB', (48, 32), (128, 0, 0)).save(root / 'annotations' / 'training' / 'ADE_training_00000001.png')


def _broken_map(root):
    (root / 'annotations' / 'training' / 'ADE_training_00000001.png').write_bytes(b'\x89PNG not really')


def _twins(root):
    Image.new('RGB', (8, 8)).save(root / 'images' / 'training' / 'ADE_training_00000001.png')


@pytest.mark.parametrize('damage, reduce_zero_label, error, needle', [
    (_unlabelled, False, ConfigError, r'no label map \(<stem>.png\) for 1 of 2 images \(ADE_training_00000001\)'),
    (_twins, False, ConfigError, "two images share the stem 'ADE_training_00000001'"),
    (_resized_map, False, ValueError, 'label map of 9x7 pixels for the 48x32 image'),
    (_bad_value(7), False, ValueError, r'label values 7 are not classes: 5 classes take 0..4'),
    (_bad_value(5), True, ValueError, r'label values 5 are not classes: 4 classes take 1..4'),
    (_rgb_map, False, ValueError, 'a RGB label map; label maps have one channel'),
    (_broken_map, False, ValueError, 'cannot read the label map'),
])
def test_bad_folders_and_maps_are_named(tmp_path, damage, reduce_zero_label, error, needle):
    _ade(tmp_path)  # ADE_training_00000001: 4x6 blocks, 48x32 pixels
    damage(tmp_path)
    with pytest.raises(error, match=needle) as caught:
        data = semantic_split(tmp_path, 'training', num_classes=5 if not reduce_zero_label else 4,
                              reduce_zero_label=reduce_zero_label)
        data[1]
    assert 'ADE_training_00000001' in str(caught.value)


def test_an_edge_label_is_a_class_only_where_it_exists(tmp_path):
    _ade(tmp_path)
    _bad_value(4)(tmp_path)
    assert semantic_split(tmp_path, 'training', num_classes=4, reduce_zero_label=True)[1][1]['semantic'][3, 4] == 3
    with pytest.raises(ValueError, match='label values 4 are not classes'):
        semantic_split(tmp_path, 'training', num_classes=4)[1]


def test_missing_folders_lists_and_classes_are_named(tmp_path):
    _ade(tmp_path / 'ade')
    with pytest.raises(ConfigError, match=r'image folder not found: .*images/train \(.* has training, validation'):
        semantic_split(tmp_path / 'ade', 'train', num_classes=5)
    with pytest.raises(ConfigError, match='label folder not found'):
        SemanticFolder(tmp_path / 'ade' / 'images' / 'training', tmp_path / 'ade' / 'labels', num_classes=5)
    with pytest.raises(ConfigError, match='the number of classes is unknown'):
        semantic_split(tmp_path / 'ade', 'training')
    with pytest.raises(ConfigError, match='3 class names for 5 classes'):
        semantic_split(tmp_path / 'ade', 'training', classes=['a', 'b', 'c'], num_classes=5)
    with pytest.raises(ConfigError, match='256 classes; label maps hold 1 to 255'):
        semantic_split(tmp_path / 'ade', 'training', num_classes=256)
    _voc(tmp_path / 'voc')
    with pytest.raises(ConfigError, match='VOC split list not found: .*Segmentation/trainval.txt'):
        semantic_split(tmp_path / 'voc', 'trainval', layout='voc', num_classes=4)
    (tmp_path / 'voc' / 'ImageSets' / 'Segmentation' / 'val.txt').write_text('2007_000039\n2012_999999\n')
    with pytest.raises(ConfigError, match=r'no image for 1 listed stems \(2012_999999\)'):
        semantic_split(tmp_path / 'voc', 'val', layout='voc', num_classes=4)


def test_configs_that_cannot_work_are_refused(tmp_path, capsys):
    _ade(tmp_path / 'ade')
    config = _config(tmp_path, tmp_path / 'ade')
    config.model.num_classes = None
    with pytest.raises(ConfigError, match='set model.num_classes'):
        build_dense_source(config, 'val')
    config = _config(tmp_path, tmp_path / 'ade')
    config.task = 'detection'
    with pytest.raises(ConfigError, match='semantic_folder holds label maps, for task segmentation only'):
        build_dense_source(config, 'val')
    assert len(build_dense_source(_config(tmp_path, tmp_path / 'ade'), 'train')) == 2

    from xcit.cli.main import main
    _config(tmp_path, tmp_path / 'ade')
    assert main(['train', '-c', str(tmp_path / 'folder.yaml'), '-o', 'data.val_split=val']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'image folder not found' in err[0] and 'images/val' in err[0]
