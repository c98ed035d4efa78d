"""Object detection and instance segmentation: torchvision's Mask R-CNN over our backbones.

The loss is the sum of torchvision's five (RPN objectness and box, RoI class, box and mask).
Evaluation scores COCO box and mask AP with pycocotools over the whole validation set, the
detections of every rank gathered first; box AP picks `best.pth`.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..engine.distributed import DistEnv, all_reduce_sum
from ..metrics.coco import STATS, CocoEvaluator, coco_ground_truth
from .dense import DenseTask

_TARGET_KEYS = ('boxes', 'labels', 'masks')  # what torchvision's detectors train on


class DetectionTask(DenseTask):
    best_metric = 'box_AP'
    name = 'detection'

    def setup(self, env: DistEnv, fresh: bool) -> None:
        super().setup(env, fresh)
        self.masks = getattr(self.model.roi_heads, 'has_mask', lambda: False)()
        # label -> the category id the ground truth uses (a COCO file's own ids; the scenes' labels are theirs)
        self.category_ids = getattr(self.val_set, 'category_ids', list(range(len(self.classes))))
        if hasattr(self.val_set, 'ground_truth'):
            self.ground_truth = self.val_set.ground_truth()
        else:
            categories = [dict(id=i, name=name) for i, name in enumerate(self.classes) if i > 0]
            scenes = (self.val_set[i] for i in range(len(self.val_set)))
            self.ground_truth = coco_ground_truth(((t['image_id'], image.shape[-2:], t) for image, t in scenes),
                                                  categories)

    def _targets(self, targets: list[dict]) -> list[dict]:
        """What the detector trains on; crowd regions (COCO's `iscrowd`) are left out, as in COCO training."""
        keys = _TARGET_KEYS if self.masks else _TARGET_KEYS[:2]
        kept = []
        for t in targets:
            keep = t['iscrowd'] == 0 if 'iscrowd' in t else slice(None)
            kept.append({k: t[k][keep].to(self.env.device) for k in keys})
        return kept

    def training_loss(self, model: nn.Module, batch) -> torch.Tensor:
        images = [image.to(self.env.device) for image in batch.images]  # (3, H_i, W_i)
        losses = model(images, self._targets(batch.targets))
        return sum(losses.values())

    def evaluate(self, model: nn.Module, batches) -> dict[str, float]:
        iou_types = ('bbox', 'segm') if self.masks else ('bbox',)
        evaluator = CocoEvaluator(self.ground_truth, iou_types)
        count = torch.zeros(1, dtype=torch.float64)
        for batch in batches:
            outputs = model([image.to(self.env.device) for image in batch.images])
            for target, output in zip(batch.targets, outputs):
                output = {k: v.cpu() for k, v in output.items()}
                output['labels'] = torch.tensor([self.category_ids[c] for c in output['labels'].tolist()],
                                                dtype=torch.long)
                evaluator.update(target['image_id'], output)
            count += len(batch.images)
        all_reduce_sum(count, self.env)
        scores = evaluator.reduce().compute()
        metrics = {f'box_{name}': scores['bbox'][name] for name in STATS}
        if self.masks:
            metrics |= {f'mask_{name}': scores['segm'][name] for name in STATS}
        return metrics | dict(count=int(count.item()))

    def report(self, metrics: dict) -> str:
        """COCOeval's six headline figures per kind, as one table (APl is '-' when no object is large)."""
        kinds = [k for k in ('box', 'mask') if f'{k}_AP' in metrics]
        rows = [f"{'':6}" + ''.join(f'{name:>8}' for name in STATS)]
        for kind in kinds:
            cells = (metrics[f'{kind}_{name}'] for name in STATS)
            rows.append(f'{kind:6}' + ''.join(f'{v:8.3f}' if v == v else f"{'-':>8}" for v in cells))
        return '\n'.join(rows)

    def summary(self, metrics: dict) -> str:
        line = f"box AP50 {metrics['box_AP50']:.3f}"
        if 'mask_AP50' in metrics:
            line += f", mask AP50 {metrics['mask_AP50']:.3f}"
        return line + f" (box AP {metrics['box_AP']:.3f}; {metrics['count']} images)"
