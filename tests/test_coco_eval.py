"""COCO box and mask AP through pycocotools: ground truth as predictions scores 1, a box at a known IoU is a hit
at AP50 and a miss at AP75, and two gloo ranks score what one process does."""
import math
import os

import pytest
import torch
import torch.multiprocessing as mp

from conftest import free_port
from xcit.data.scenes import CLASSES, DigitScenes
from xcit.metrics import CocoEvaluator, coco_ground_truth

CATEGORIES = [dict(id=i, name=name) for i, name in enumerate(CLASSES) if i]


def _scenes(n=6):
    scenes = DigitScenes('val', length=n, seed=1)
    return [(i, tuple(img.shape[-2:]), t) for i, (img, t) in enumerate(scenes)]


def test_ground_truth_as_predictions_scores_ap_1():
    samples = _scenes()
    evaluator = CocoEvaluator(coco_ground_truth(samples, CATEGORIES))
    for image_id, _, target in samples:
        evaluator.update(image_id, dict(boxes=target['boxes'], labels=target['labels'],
                                        scores=torch.ones(len(target['labels'])), masks=target['masks']))
    scores = evaluator.compute()
    for iou_type in ('bbox', 'segm'):
        assert scores[iou_type]['AP'] == pytest.approx(1.0) and scores[iou_type]['AP50'] == pytest.approx(1.0)


def _one_box_scores(shift):
    gt = dict(boxes=torch.tensor([[0.0, 0.0, 100.0, 100.0]]), labels=torch.tensor([3]))
    evaluator = CocoEvaluator(coco_ground_truth([(1, (200, 200), gt)], CATEGORIES), iou_types=('bbox',))
    evaluator.update(1, dict(boxes=torch.tensor([[shift, 0.0, 100.0 + shift, 100.0]]), labels=torch.tensor([3]),
                             scores=torch.tensor([0.9])))
    return evaluator.compute()['bbox']


def test_a_box_at_iou_0_6_is_a_hit_at_ap50_and_a_miss_at_ap75():
    scores = _one_box_scores(25.0)  # IoU = (100 - 25) / (100 + 25) = 0.6
    assert scores['AP50'] == pytest.approx(1.0) and scores['AP75'] == 0.0
    assert _one_box_scores(10.0)['AP75'] == pytest.approx(1.0)  # IoU 0.82
    assert math.isnan(scores['APs'])  # no small ground truth: no score, not a zero


def test_nothing_detected_scores_zero():
    samples = _scenes(2)
    assert CocoEvaluator(coco_ground_truth(samples, CATEGORIES)).compute()['segm']['AP'] == 0.0



def _predictions(samples):
    g = torch.Generator().manual_seed(0)
    out = {}
    for image_id, _, target in samples:  # jittered boxes with random scores: an imperfect detector
        boxes = target['boxes'].as_subclass(torch.Tensor) + torch.randn(len(target['labels']), 4, generator=g) * 2
        out[image_id] = dict(boxes=boxes, labels=target['labels'], scores=torch.rand(len(boxes), generator=g),
                             masks=target['masks'])
    return out


def _rank(rank, port, samples, out):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=2)
    evaluator = CocoEvaluator(coco_ground_truth(samples, CATEGORIES))
    for image_id, prediction in _predictions(samples).items():
        if image_id % 2 == rank:
            evaluator.update(image_id, prediction)
    torch.save(evaluator.reduce().compute(), os.path.join(out, f'{rank}.pt'))
    dist.destroy_process_group()


def test_two_gloo_ranks_score_what_one_process_does(tmp_path):
    samples = _scenes()
    mp.spawn(_rank, args=(free_port(), samples, str(tmp_path)), nprocs=2, join=True)
    single = CocoEvaluator(coco_ground_truth(samples, CATEGORIES))
    for image_id, prediction in _predictions(samples).items():
        single.update(image_id, prediction)
    expected = single.compute()
    assert 0.1 < expected['bbox']['AP'] < 1.0
    for rank in range(2):
        got = torch.load(tmp_path / f'{rank}.pt')
        for iou_type in expected:
            for name, value in expected[iou_type].items():
                assert got[iou_type][name] == pytest.approx(value, nan_ok=True), (iou_type, name)
