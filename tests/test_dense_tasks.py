"""`task: detection` and `task: segmentation` on the shared engine: what they score, how batches of different
sizes are padded, a real (tiny) training run through the CLI, and bad configs refused in one line."""
import pytest
import torch
import torch.nn as nn
import yaml

from conftest import run_cli
from xcit.config import ConfigError, load_config
from xcit.data.dense import pad_and_stack
from xcit.engine.distributed import DistEnv
from xcit.tasks import build_task

ENV = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device('cpu'))
SCENES = {'train_length': 4, 'val_length': 6, 'min_side': 64, 'max_side': 112, 'digit_sizes': [16, 40],
          'max_digits': 3}


def _config(tmp_path, task, name, kwargs=None, **extra):
    data = {'task': task, 'experiment': task, 'output_dir': str(tmp_path / 'runs'),
            'model': {'name': name, 'kwargs': kwargs or {'fpn_channels': 32}},
            'data': {'dataset': 'digit_scenes', 'batch_size': 2, 'num_workers': 0}, 'scenes': SCENES,
            'augment': {'hflip': 0.0}, 'schedule': {'epochs': 1, 'warmup_epochs': 0}, 'train': {'progress': False}}
    data.update(extra)
    path = tmp_path / f'{task}.yaml'
    path.write_text(yaml.safe_dump(data))
    return path


class _Oracle(nn.Module):
    """Answers with the ground truth of the scene the images came from, found by their pixels."""

    def __init__(self, scenes, kind):
        super().__init__()
        self.lookup = [(image, target) for image, target in scenes]
        self.kind = kind

    def _target(self, image):
        return next(t for im, t in self.lookup if im.shape == image.shape and torch.equal(im, image))

    def forward(self, images):
        if self.kind == 'detection':
            outputs = []
            for image in images:
                t = self._target(image)
                outputs.append(dict(boxes=t['boxes'].as_subclass(torch.Tensor), labels=t['labels'],
                                    scores=torch.ones(len(t['labels'])), masks=t['masks'][:, None].float()))
            return outputs
        raise NotImplementedError


def test_ground_truth_as_detections_scores_box_and_mask_ap_1(tmp_path):
    task = build_task(load_config(_config(tmp_path, 'detection', 'maskrcnn_xcit_nano_12_p16')), evaluate_only=True)
    task.setup(ENV, fresh=True)
    metrics = task.evaluate(_Oracle(task.val_set, 'detection'), task.eval_batches())
    assert metrics['box_AP'] == pytest.approx(1.0) and metrics['mask_AP'] == pytest.approx(1.0)
    assert metrics['count'] == SCENES['val_length']
    assert task.summary(metrics).startswith('box AP50 1.000, mask AP50 1.000')
    header, box, mask = task.report(metrics).splitlines()
    assert header.split() == ['AP', 'AP50', 'AP75', 'APs', 'APm', 'APl']
    assert box.split()[0] == 'box' and mask.split()[0] == 'mask'
    for row in (box, mask):  # '-' for the sizes these small scenes have no object of
        cells = row.split()[1:]
        assert cells[:3] == ['1.000'] * 3 and set(cells[3:]) <= {'1.000', '-'} and '-' in cells


class _SegmentationOracle(nn.Module):
    """One-hot logits of the truth, on the padded batch the task stacked (the labels are passed in)."""

    def __init__(self, labels, num_classes, wrong_class=None):
        super().__init__()
        self.labels, self.num_classes, self.wrong_class = labels, num_classes, wrong_class

    def forward(self, images):
        labels = self.labels.pop(0).clone()
        labels[labels == 255] = 0  # padding: any answer, it is not counted
        if self.wrong_class is not None:
            labels[labels == self.wrong_class] = 0
        return nn.functional.one_hot(labels, self.num_classes).permute(0, 3, 1, 2).float()


def test_segmentation_scores_the_truth_1_and_ignores_the_padding(tmp_path):
    task = build_task(load_config(_config(tmp_path, 'segmentation', 'semfpn_xcit_nano_12_p16')), evaluate_only=True)
    task.setup(ENV, fresh=True)
    batches = list(task.eval_batches())
    assert any(len({im.shape for im in b.images}) > 1 for b in batches)  # sizes differ within a batch
    labels = [task._stack(b)[1] for b in batches]
    metrics = task.evaluate(_SegmentationOracle(list(labels), task.num_classes), batches)
    assert metrics['mIoU'] == pytest.approx(1.0) and metrics['pixel_accuracy'] == pytest.approx(1.0)
    present = sorted({int(c) for lab in labels for c in lab.unique() if c not in (0, 255)})
    wrong = present[0]
    metrics = task.evaluate(_SegmentationOracle(list(labels), task.num_classes, wrong_class=wrong), batches)
    assert metrics[f'IoU_{task.classes[wrong]}'] == 0 and metrics['mIoU'] < 1
    rows = dict(line.split() for line in task.report(metrics).splitlines()[1:])
    assert list(rows) == task.classes + ['mean'] and float(rows[task.classes[wrong]]) == 0
    assert float(rows['mean']) == pytest.approx(metrics['mIoU'], abs=5e-4)


def test_padding_keeps_images_and_labels_aligned():
    images = [torch.rand(3, 40, 70), torch.rand(3, 65, 33)]
    maps = [torch.randint(0, 5, (40, 70)), torch.randint(0, 5, (65, 33))]
    batch, labels = pad_and_stack(images, maps, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert batch.shape == (2, 3, 96, 96) and labels.shape == (2, 96, 96)
    for i, (image, label) in enumerate(zip(images, maps)):
        h, w = label.shape
        assert torch.allclose(batch[i, :, :h, :w], (image - 0.5) / 0.25)
        assert torch.equal(labels[i, :h, :w], label)
        assert (labels[i, h:] == 255).all() and (labels[i, :, w:] == 255).all() and (batch[i, :, h:] == 0).all()


@pytest.mark.parametrize('task, name', [('detection', 'maskrcnn_xcit_nano_12_p16'),
                                        ('segmentation', 'upernet_xcit_nano_12_p16')])
def test_a_tiny_run_trains_evaluates_and_checkpoints(tmp_path, task, name):
    kwargs = {'fpn_channels': 32, 'box_head_width': 64, 'mask_head_layers': [16], 'min_size': 64, 'max_size': 112} \
        if task == 'detection' else {'channels': 16, 'aux_channels': 8}
    path = _config(tmp_path, task, name, kwargs=kwargs)
    done = run_cli('train', '-c', path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert ('final evaluation: box AP50 ' if task == 'detection' else 'final evaluation: mIoU ') in done.stdout
    table = done.stdout.split('final evaluation')[0].splitlines()  # the COCO table, or IoU per class
    assert (['AP', 'AP50', 'AP75', 'APs', 'APm', 'APl'] in [line.split() for line in table] if task == 'detection'
            else any(line.split()[0] == 'background' for line in table if line.strip()))
    run_dir = tmp_path / 'runs' / task
    assert (run_dir / 'best.pth').is_file() and (run_dir / 'curves.png').is_file()
    checkpoint = torch.load(run_dir / 'last.pth', weights_only=True)
    assert checkpoint['task']['task'] == task and checkpoint['task']['classes'][0] == 'background'

    # and `xcit predict` draws what the trained model finds on a picture of another size
    from PIL import Image
    Image.new('RGB', (90, 70), (200, 120, 40)).save(tmp_path / 'scene.jpg')
    done = run_cli('predict', '--model', name, '--checkpoint', run_dir / 'best.pth', tmp_path / 'scene.jpg',
                   '--output', tmp_path / 'pictures', '--score-threshold', '0')
    assert done.returncode == 0, done.stderr[-2000:]
    picture = Image.open(tmp_path / 'pictures' / 'scene.png')
    assert picture.size == ((90, 70) if task == 'detection' else (2 * 90 + 8, 70))  # the map beside the image
    assert ('objects' if task == 'detection' else 'background') in done.stdout


def test_a_dense_task_on_a_classification_dataset_is_one_line_and_exit_2(tmp_path, capsys):
    from xcit.cli.main import main
    path = _config(tmp_path, 'detection', 'maskrcnn_xcit_nano_12_p16')
    assert main(['train', '-c', str(path), '-o', 'data.dataset=digits']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'data.dataset must be one of digit_scenes' in err[0]


def test_class_weights_must_match_the_classes(tmp_path):
    path = _config(tmp_path, 'segmentation', 'semfpn_xcit_nano_12_p16', loss={'class_weight': [0.2, 1.0]})
    with pytest.raises(ConfigError, match='2 weights for 11 classes'):
        build_task(load_config(path))


def test_sliding_window_and_resized_evaluation_run_image_by_image(tmp_path):
    per_pixel = nn.Conv2d(3, 11, 1)  # any window or padding gives each pixel the same logits
    with torch.no_grad():  # bright pixels are background, dark ones a '0': a map that varies, and mIoU > 0
        per_pixel.weight.zero_()
        per_pixel.bias.zero_()
        per_pixel.weight[0], per_pixel.weight[1] = 1.0, -1.0
    scores = {}
    for mode in ('whole', 'slide'):
        config = load_config(_config(tmp_path, 'segmentation', 'semfpn_xcit_nano_12_p16',
                                     inference={'mode': mode, 'crop': 48, 'stride': 32}))
        task = build_task(config, evaluate_only=True)
        task.setup(ENV, fresh=True)
        scores[mode] = task.evaluate(per_pixel, task.eval_batches())
    assert scores['slide'] == pytest.approx(scores['whole'], abs=1e-9, nan_ok=True) and scores['whole']['mIoU'] > 0
    with pytest.raises(ValueError, match='stride 96 is above crop 64'):
        load_config([], ['inference.stride=96', 'inference.crop=64'])
