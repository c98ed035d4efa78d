"""mIoU, per-class IoU and pixel accuracy from one confusion matrix: known matrices, ignored pixels, and two
gloo ranks giving the scores of one process."""
import math
import os

import pytest
import torch
import torch.multiprocessing as mp

from conftest import free_port
from xcit.metrics import ConfusionMatrix


def _maps_for(matrix):
    """A (1, n) target and prediction whose confusion matrix is `matrix` (counts[t][p])."""
    pairs = [(t, p) for t, row in enumerate(matrix) for p, n in enumerate(row) for _ in range(n)]
    target, prediction = zip(*pairs)
    return torch.tensor([prediction]), torch.tensor([target])


def test_scores_of_a_known_confusion_matrix():
    # class 0: 8 right, 2 taken for 1; class 1: 3 right, 1 taken for 0, 1 for 2; class 2: 4 right
    matrix = [[8, 2, 0], [1, 3, 1], [0, 0, 4]]
    cm = ConfusionMatrix(3)
    cm.update(*_maps_for(matrix))
    assert cm.counts.tolist() == matrix
    scores = cm.compute()
    iou = [8 / (10 + 9 - 8), 3 / (5 + 5 - 3), 4 / (4 + 5 - 4)]
    assert scores['iou'] == pytest.approx(iou)
    assert scores['mIoU'] == pytest.approx(sum(iou) / 3)
    assert scores['pixel_accuracy'] == pytest.approx(15 / 19)
    assert scores['accuracy'] == pytest.approx([0.8, 0.6, 1.0])


def test_ignored_pixels_and_absent_classes_do_not_count():
    cm = ConfusionMatrix(4, ignore_index=255)
    target = torch.tensor([[0, 0, 255, 1], [1, 255, 0, 0]])
    prediction = torch.tensor([[0, 2, 3, 1], [1, 3, 0, 0]])  # the ignored pixels' predictions are wrong
    cm.update(prediction, target)
    scores = cm.compute()
    assert cm.counts.sum() == 6
    assert scores['iou'][2] == 0  # predicted, never true: IoU 0
    assert math.isnan(scores['iou'][3])  # occurs nowhere: left out of the mean
    assert scores['mIoU'] == pytest.approx((3 / 4 + 1 + 0) / 3)
    with pytest.raises(ValueError, match='target classes'):
        cm.update(torch.zeros(1, 2, dtype=torch.long), torch.tensor([[0, 7]]))



def _rank(rank, port, prediction, target, out):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=2)
    cm = ConfusionMatrix(5)
    cm.update(prediction[rank::2], target[rank::2])  # each rank sees every other image
    torch.save(cm.reduce().compute(), os.path.join(out, f'{rank}.pt'))
    dist.destroy_process_group()


def test_two_gloo_ranks_give_the_scores_of_one_process(tmp_path):
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 5, (6, 16, 16), generator=g)
    prediction = torch.where(torch.rand(6, 16, 16, generator=g) < 0.7, target, torch.randint(0, 5, (6, 16, 16),
                                                                                             generator=g))
    mp.spawn(_rank, args=(free_port(), prediction, target, str(tmp_path)), nprocs=2, join=True)
    single = ConfusionMatrix(5)
    single.update(prediction, target)
    expected = single.compute()
    for rank in range(2):
        assert torch.load(tmp_path / f'{rank}.pt') == expected
