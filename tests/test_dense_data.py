"""Dense data: COCO json (polygons, RLE, iscrowd) read through pycocotools and written back by our writer;
joint transforms that keep every box on its mask; the ground truth of a COCO file scoring AP 1."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torchvision.transforms import v2

from xcit.data.coco import CocoDetection
from xcit.data.dense import PadBottomRight, joint_transforms
from xcit.data.scenes import DigitScenes, masks_to_boxes
from xcit.metrics.coco import CocoEvaluator, coco_ground_truth


def _coco_files(tmp_path):
    """Two images; a polygon, a compressed RLE and an uncompressed crowd RLE; categories with gaps in their ids."""
    (tmp_path / 'images').mkdir()
    Image.new('RGB', (40, 30), (10, 20, 30)).save(tmp_path / 'images' / 'a.png')
    Image.new('RGB', (24, 32), (200, 20, 30)).save(tmp_path / 'images' / 'b.png')
    square = np.zeros((30, 40), dtype=np.uint8)
    square[5:15, 20:32] = 1
    rle = mask_utils.encode(np.asfortranarray(square))
    rle['counts'] = rle['counts'].decode('ascii')
    crowd = np.zeros((32, 24), dtype=np.uint8)
    crowd[2:30, 1:9] = 1
    counts, run, value = [], 0, 0  # an uncompressed RLE: run lengths down the columns, from a 0-run
    for pixel in crowd.flatten(order='F'):
        if pixel != value:
            counts.append(run)
            run, value = 0, pixel
        run += 1
    counts.append(run)
    data = {
        'images': [{'id': 7, 'file_name': 'a.png', 'height': 30, 'width': 40},
                   {'id': 9, 'file_name': 'b.png', 'height': 32, 'width': 24}],
        'categories': [{'id': 3, 'name': 'cat'}, {'id': 17, 'name': 'dog'}],
        'annotations': [
            {'id': 1, 'image_id': 7, 'category_id': 17, 'iscrowd': 0, 'bbox': [2, 3, 10, 8], 'area': 80,
             'segmentation': [[2, 3, 12, 3, 12, 11, 2, 11]]},
            {'id': 2, 'image_id': 7, 'category_id': 3, 'iscrowd': 0, 'bbox': [20, 5, 12, 10], 'area': 120,
             'segmentation': rle},
            {'id': 3, 'image_id': 9, 'category_id': 3, 'iscrowd': 1, 'bbox': [1, 2, 8, 28], 'area': 224,
             'segmentation': {'size': [32, 24], 'counts': counts}},
        ]}
    (tmp_path / 'ann.json').write_text(json.dumps(data))
    return tmp_path / 'images', tmp_path / 'ann.json', square, crowd


def test_a_coco_file_with_polygons_rle_and_crowds_loads_and_round_trips_through_our_writer(tmp_path):
    images, ann, square, crowd = _coco_files(tmp_path)
    data = CocoDetection(images, ann)
    assert data.classes == ['background', 'cat', 'dog'] and data.category_ids == [0, 3, 17]
    image, target = data[0]
    assert image.shape == (3, 30, 40) and target['image_id'] == 7
    assert target['labels'].tolist() == [2, 1] and target['iscrowd'].tolist() == [0, 0]
    assert target['boxes'].tolist() == [[2, 3, 12, 11], [20, 5, 32, 15]]  # XYWH -> XYXY
    assert torch.equal(target['masks'][1], torch.from_numpy(square))
    assert target['masks'][0][4:10, 3:11].all() and not target['masks'][0][15:].any()  # the polygon, filled
    _, crowd_target = data[1]
    assert crowd_target['iscrowd'].tolist() == [1] and torch.equal(crowd_target['masks'][0], torch.from_numpy(crowd))

    samples = []
    for i in range(len(data)):
        image, t = data[i]
        t = dict(t, labels=torch.tensor([data.category_ids[label] for label in t['labels']]))
        samples.append((t['image_id'], image.shape[-2:], t))
    written = coco_ground_truth(samples, json.loads(ann.read_text())['categories'], {7: 'a.png', 9: 'b.png'})
    (tmp_path / 'ours.json').write_text(json.dumps(written))
    again = CocoDetection(images, tmp_path / 'ours.json')
    for i in range(len(data)):
        (_, first), (_, second) = data[i], again[i]
        for key in ('labels', 'iscrowd', 'masks'):
            assert torch.equal(first[key], second[key]), key
        assert torch.allclose(first['boxes'], second['boxes'])


def test_the_ground_truth_of_a_coco_file_scores_ap_1(tmp_path):
    images, ann, _, _ = _coco_files(tmp_path)
    data = CocoDetection(images, ann)
    evaluator = CocoEvaluator(data.ground_truth())
    for i in range(len(data)):
        _, t = data[i]
        keep = t['iscrowd'] == 0  # a crowd region is neither to be found nor held against a detector
        evaluator.update(t['image_id'], dict(boxes=t['boxes'][keep], scores=torch.ones(int(keep.sum())),
                                             labels=torch.tensor([data.category_ids[c] for c in t['labels'][keep]]),
                                             masks=t['masks'][keep]))
    scores = evaluator.compute()
    assert scores['bbox']['AP'] == pytest.approx(1.0) and scores['segm']['AP'] == pytest.approx(1.0)


def test_a_missing_or_broken_annotation_file_is_named(tmp_path):
    from xcit.config import ConfigError
    with pytest.raises(ConfigError, match='COCO annotations not found'):
        CocoDetection(tmp_path, tmp_path / 'none.json')
    (tmp_path / 'bad.json').write_text('{"images": 3}')
    with pytest.raises(ConfigError, match='not a COCO annotation file'):
        CocoDetection(tmp_path, tmp_path / 'bad.json')


def _boxes_fit_masks(target, tolerance=0.0):
    return torch.allclose(masks_to_boxes(target['masks'].bool()), target['boxes'].as_subclass(torch.Tensor),
                          atol=tolerance)


@pytest.mark.parametrize('name, transform, tolerance', [
    ('flip', v2.RandomHorizontalFlip(1.0), 0),
    ('pad', PadBottomRight(32), 0),
    ('crop', joint_transforms(crop=(80, 72)), 0),
    ('crop beyond the image', joint_transforms(crop=(300, 280)), 0),
    ('resize', v2.RandomShortestSize([200, 240], max_size=400), 2.5),  # masks resize by nearest pixels
    ('all', joint_transforms(hflip=1.0, min_sizes=(160,), max_size=300, crop=(96, 96), jitter=0.2,
                             pad_divisor=32), 2.5),
])
def test_every_transform_keeps_each_box_on_its_mask(name, transform, tolerance):
    torch.manual_seed(0)
    scenes = DigitScenes('train', length=6, seed=4, transforms=transform)
    for i in range(len(scenes)):
        image, target = scenes[i]
        assert _boxes_fit_masks(target, tolerance), (name, i)
        assert image.shape[-2:] == target['masks'].shape[-2:] == target['semantic'].shape[-2:]
        assert len(target['boxes']) == len(target['labels']) == len(target['masks'])
        if name in ('pad', 'all'):
            assert image.shape[-2] % 32 == 0 and image.shape[-1] % 32 == 0


def test_padding_fills_the_semantic_map_with_the_ignore_index_and_nothing_else():
    image, target = DigitScenes('train', length=1, seed=4, min_side=64, max_side=64, digit_sizes=(16, 40))[0]
    padded, out = PadBottomRight(at_least=(100, 90), ignore_index=255)(image, target)
    assert padded.shape[-2:] == (100, 90) and (padded[:, 64:] == 0).all() and (padded[:, :, 64:] == 0).all()
    assert (out['semantic'][64:] == 255).all() and (out['semantic'][:, 64:] == 255).all()
    assert torch.equal(out['semantic'][:64, :64], target['semantic']) and not (out['masks'][:, 64:] != 0).any()
    assert torch.equal(out['boxes'], target['boxes'])


def test_the_detection_task_reads_coco_and_maps_its_labels_back_to_the_category_ids(tmp_path):
    import shutil

    import torch.nn as nn

    from xcit.config import load_config
    from xcit.engine.distributed import DistEnv
    from xcit.tasks import build_task
    (tmp_path / 'src').mkdir()
    images, ann, _, _ = _coco_files(tmp_path / 'src')
    (tmp_path / 'coco' / 'annotations').mkdir(parents=True)
    shutil.copytree(images, tmp_path / 'coco' / 'val2017')
    shutil.copy(ann, tmp_path / 'coco' / 'annotations' / 'instances_val2017.json')
    config = load_config([], ['task=detection', 'model.name=maskrcnn_xcit_nano_12_p16', 'data.dataset=coco',
                              f"data.root={tmp_path / 'coco'}", 'data.val_split=val2017', 'data.num_workers=0',
                              'data.batch_size=2'])
    task = build_task(config, evaluate_only=True)
    task.setup(DistEnv(), fresh=True)
    assert task.num_classes == 3 and task.classes == ['background', 'cat', 'dog']

    class Oracle(nn.Module):  # answers with the contiguous labels a trained detector would
        def forward(self, images):
            by_shape = {task.val_set[i][0].shape: task.val_set[i][1] for i in range(len(task.val_set))}
            return [dict(boxes=t['boxes'].as_subclass(torch.Tensor), labels=t['labels'], scores=torch.ones(len(t['labels'])),
                         masks=t['masks'][:, None].float()) for t in (by_shape[im.shape] for im in images)]
    metrics = task.evaluate(Oracle(), task.eval_batches())
    assert metrics['box_AP'] == pytest.approx(1.0) and metrics['mask_AP'] == pytest.approx(1.0)
    crowded = task._targets([task.val_set[1][1]])[0]
    assert len(crowded['boxes']) == 0  # the crowd region is not trained on
