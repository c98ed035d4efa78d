"""Object detection and instance segmentation: torchvision's Mask R-CNN over our backbones.

The loss is the sum of torchvision's five (RPN objectness and box, RoI class, box and mask).
Evaluation scores COCO box and mask AP with pycocotools over the whole validation set, the
detections of every rank gathered first; box AP picks `best.pth`.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..config import Config
from ..data.dense import build_dense_loaders, build_dense_source, train_transforms
from ..engine.distributed import DistEnv, all_reduce_sum
from ..engine.task import Task
from ..factory import create_model
from ..metrics.coco import STATS, CocoEvaluator, coco_ground_truth

_TARGET_KEYS = ('boxes', 'labels', 'masks')  # what torchvision's detectors train on


class DetectionTask(Task):
    best_metric = 'box_AP'
    higher_is_better = True

    def __init__(self, config: Config, load: str | None = None, evaluate_only: bool = False):
        self.config = config
        self.weights = load or config.model.checkpoint
        self.evaluate_only = evaluate_only
        self.train_set = None if evaluate_only else build_dense_source(config, 'train', train_transforms(config))
        self.val_set = build_dense_source(config, 'val')
        self.classes = list(self.val_set.classes)  # index 0 is the background
        self.num_classes = config.model.num_classes or len(self.classes)

    def setup(self, env: DistEnv, fresh: bool) -> None:
        m = self.config.model
        self.model = create_model(m.name, checkpoint_path=self.weights if fresh else None,
                                  num_classes=self.num_classes, drop_path_rate=m.drop_path_rate,
                                  **m.kwargs).to(env.device)
        self.masks = getattr(self.model.roi_heads, 'has_mask', lambda: False)()
        self.env = env
        self.train_data, self.val_loader = build_dense_loaders(self.config, self.train_set, self.val_set,
                                                               env.rank, env.world_size)
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

    def eval_batches(self):
        return self.val_loader

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

    def summary(self, metrics: dict) -> str:
        line = f"box AP50 {metrics['box_AP50']:.3f}"
        if 'mask_AP50' in metrics:
            line += f", mask AP50 {metrics['mask_AP50']:.3f}"
        return line + f" (box AP {metrics['box_AP']:.3f}; {metrics['count']} images)"

    def describe(self) -> str:
        sizes = f'{len(self.train_set)} train / ' if self.train_set is not None else ''
        return f'{self.config.model.name}, {self.num_classes - 1} classes, {sizes}{len(self.val_set)} val images'

    def state_dict(self) -> dict:
        return dict(classes=self.classes, architecture=self.config.model.name, task='detection')
