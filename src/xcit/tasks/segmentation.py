"""Semantic segmentation: Semantic FPN or UperNet over our backbones, cross-entropy with an ignore index.

Batches of different sizes are padded (image 0 after normalising, label `ignore_index`), never
resized. Evaluation accumulates one confusion matrix over the whole validation set, summed
over ranks, whole-image inference; mIoU picks `best.pth`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import Config, ConfigError
from ..data.dense import pad_and_stack
from ..engine.distributed import DistEnv
from ..metrics.segmentation import ConfusionMatrix
from .dense import DenseTask

IGNORE_INDEX = 255


class SegmentationTask(DenseTask):
    best_metric = 'mIoU'
    name = 'segmentation'

    def __init__(self, config: Config, load: str | None = None, evaluate_only: bool = False):
        super().__init__(config, load, evaluate_only)
        weights = config.loss.class_weight
        if weights is not None and len(weights) != self.num_classes:
            raise ConfigError(f'loss.class_weight has {len(weights)} weights for {self.num_classes} classes')

    def setup(self, env: DistEnv, fresh: bool) -> None:
        super().setup(env, fresh)
        cfg = self.model.pretrained_cfg
        self.mean, self.std = self.config.data.mean or cfg['mean'], self.config.data.std or cfg['std']
        weights = self.config.loss.class_weight
        self.class_weight = None if weights is None else torch.tensor(weights, device=env.device)

    def _stack(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        images = [image.to(self.env.device) for image in batch.images]
        maps = [target['semantic'].to(self.env.device) for target in batch.targets]
        return pad_and_stack(images, maps, self.mean, self.std, ignore_index=IGNORE_INDEX)  # (B, 3, H, W), (B, H, W)

    def training_loss(self, model: nn.Module, batch) -> torch.Tensor:
        images, labels = self._stack(batch)
        out = model(images)  # (B, K, H, W), or with an auxiliary head {'out': ..., 'aux': ...}
        loss = lambda logits: F.cross_entropy(logits.float(), labels, weight=self.class_weight,  # noqa: E731
                                              ignore_index=IGNORE_INDEX)
        if isinstance(out, dict):
            return sum(weight * loss(out[key]) for key, weight in model_loss_weights(model).items())
        return loss(out)

    def evaluate(self, model: nn.Module, batches) -> dict[str, float]:
        confusion = ConfusionMatrix(self.num_classes, ignore_index=IGNORE_INDEX, device=self.env.device)
        for batch in batches:
            images, labels = self._stack(batch)
            confusion.update(model(images).argmax(1), labels)  # padding is ignored through its labels
        scores = confusion.reduce().compute()
        metrics = dict(mIoU=scores['mIoU'], pixel_accuracy=scores['pixel_accuracy'],
                       mean_accuracy=scores['mean_accuracy'])
        return metrics | {f'IoU_{name}': iou for name, iou in zip(self.classes, scores['iou'])}

    def summary(self, metrics: dict) -> str:
        return f"mIoU {metrics['mIoU']:.3f} (pixel accuracy {metrics['pixel_accuracy']:.3f})"


def model_loss_weights(model: nn.Module) -> dict[str, float]:
    """The weight of each output in the loss: 1 for 'out', the model's `aux_weight` for 'aux'."""
    model = getattr(model, 'module', model)  # DDP
    model = getattr(model, '_orig_mod', model)  # torch.compile
    return dict(out=1.0, aux=getattr(model, 'aux_weight', 0.4))
