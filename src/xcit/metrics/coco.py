"""COCO box and mask AP through pycocotools' COCOeval, over predictions gathered from every rank.

Boxes here are XYXY in pixel-edge coordinates (x2 one past the last column), so COCO's
[x, y, w, h] is [x1, y1, x2 - x1, y2 - y1], the same box pycocotools computes for a mask.
"""
from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
import torch
import torch.distributed as dist

STATS = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl')  # the first six of COCOeval.stats, in its order


def encode_masks(masks: torch.Tensor) -> list[dict]:
    """(N, H, W) binary masks -> COCO RLEs (counts as str, so they can be written as JSON)."""
    from pycocotools import mask as mask_utils
    array = np.asfortranarray(masks.to(torch.uint8).cpu().numpy().transpose(1, 2, 0))
    rles = mask_utils.encode(array) if len(masks) else []
    for rle in rles:
        rle['counts'] = rle['counts'].decode('ascii')
    return list(rles)


def xyxy_to_xywh(boxes: torch.Tensor) -> list[list[float]]:
    boxes = boxes.detach().cpu().double()
    return torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).tolist()


def coco_ground_truth(samples, categories: list[dict], file_names: dict | None = None) -> dict:
    """A COCO annotation dict (what `json.dump` writes as a COCO file) from (image_id, (H, W), target) triples
    whose targets hold `boxes` (XYXY), `labels` (the category ids) and optionally `masks` (written as RLE)
    and `iscrowd`; `file_names`: image id -> file name."""
    from pycocotools import mask as mask_utils
    images, annotations = [], []
    for image_id, (height, width), target in samples:
        images.append(dict(id=int(image_id), height=int(height), width=int(width)))
        if file_names:
            images[-1]['file_name'] = file_names[image_id]
        boxes = xyxy_to_xywh(torch.as_tensor(target['boxes']))
        rles = encode_masks(torch.as_tensor(target['masks'])) if 'masks' in target else [None] * len(boxes)
        crowd = target.get('iscrowd', torch.zeros(len(boxes), dtype=torch.long))
        for box, label, rle, is_crowd in zip(boxes, target['labels'].tolist(), rles, crowd.tolist()):
            annotation = dict(id=len(annotations) + 1, image_id=int(image_id), category_id=int(label), bbox=box,
                              area=float(box[2] * box[3]), iscrowd=int(is_crowd))
            if rle is not None:
                annotation['segmentation'] = rle
                annotation['area'] = float(mask_utils.area(rle))
            annotations.append(annotation)
    return dict(images=images, annotations=annotations, categories=categories)


class CocoEvaluator:
    """Collects detections per image (`update`), gathers them from every rank (`reduce`) and scores them
    against the ground truth with COCOeval (`compute`): AP, AP50, AP75, APs, APm, APl per IoU type."""

    def __init__(self, ground_truth: dict, iou_types: tuple[str, ...] = ('bbox', 'segm')):
        from pycocotools.coco import COCO
        unknown = set(iou_types) - {'bbox', 'segm'}
        if unknown:
            raise ValueError(f"iou_types are 'bbox' and 'segm', not {sorted(unknown)}")
        self.iou_types = iou_types
        self.coco = COCO()
        self.coco.dataset = copy.deepcopy(ground_truth)
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints as it indexes
            self.coco.createIndex()
        self.results: list[dict] = []

    def update(self, image_id: int, prediction: dict) -> None:
        """One image's detections: `boxes` (XYXY), `scores`, `labels` (category ids), optionally `masks`
        ((N, H, W) binary, or (N, 1, H, W) probabilities, thresholded at 0.5)."""
        boxes = xyxy_to_xywh(prediction['boxes'])
        scores, labels = prediction['scores'].tolist(), prediction['labels'].tolist()
        rles = [None] * len(boxes)
        if 'segm' in self.iou_types:
            masks = prediction['masks']
            if masks.dim() == 4:
                masks = masks[:, 0] > 0.5
            rles = encode_masks(masks)
        for box, score, label, rle in zip(boxes, scores, labels, rles):
            result = dict(image_id=int(image_id), category_id=int(label), bbox=box, score=float(score))
            if rle is not None:
                result['segmentation'] = rle
            self.results.append(result)

    def reduce(self) -> CocoEvaluator:
        """Every rank's detections on every rank (a no-op in one process)."""
        if dist.is_available() and dist.is_initialized():
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, self.results)
            self.results = [r for part in gathered for r in part]
        return self

    def compute(self) -> dict[str, dict[str, float]]:
        """{'bbox': {'AP': ..., 'AP50': ...}, 'segm': {...}}: 0 where nothing was detected, NaN for a size
        range without ground truth (COCOeval's -1)."""
        from pycocotools.cocoeval import COCOeval
        scores = {}
        for iou_type in self.iou_types:
            if not self.results:
                scores[iou_type] = dict.fromkeys(STATS, 0.0)
                continue
            with contextlib.redirect_stdout(io.StringIO()):
                detections = self.coco.loadRes(copy.deepcopy(self.results))
                evaluation = COCOeval(self.coco, detections, iou_type)
                evaluation.evaluate()
                evaluation.accumulate()
                evaluation.summarize()
            scores[iou_type] = {name: float('nan') if v < 0 else float(v) for name, v in zip(STATS, evaluation.stats)}
        return scores
