"""Semantic segmentation: Semantic FPN or UperNet over our backbones, cross-entropy with an ignore index.

Batches of different sizes are padded (image 0 after normalising, label `ignore_index`), never
resized. Evaluation accumulates one confusion matrix over the whole validation set, summed
over ranks, from whole-image inference (the batch as it is, or each image resized to
`inference.short_side`) or sliding windows (`inference.mode: slide`); mIoU picks `best.pth`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import Config, ConfigError
from ..data.dense import pad_and_stack
from ..dense.segmentation import sliding_window_logits, whole_image_logits
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
        inference = self.config.inference
        for batch in batches:
            if inference.mode == 'whole' and not inference.short_side:  # the batch at once, padded
                images, labels = self._stack(batch)
                confusion.update(model(images).argmax(1), labels)  # padding is ignored through its labels
                continue
            for image, target in zip(batch.images, batch.targets):  # one at a time, each at its own size
                logits = self._image_logits(model, image.to(self.env.device))  # (K, H, W)
                confusion.update(logits.argmax(0)[None], target['semantic'].to(self.env.device)[None])
        scores = confusion.reduce().compute()
        metrics = dict(mIoU=scores['mIoU'], pixel_accuracy=scores['pixel_accuracy'],
                       mean_accuracy=scores['mean_accuracy'])
        return metrics | {f'IoU_{name}': iou for name, iou in zip(self.classes, scores['iou'])}

    def _image_logits(self, model: nn.Module, image: torch.Tensor) -> torch.Tensor:
        mean = torch.as_tensor(self.mean, dtype=image.dtype, device=image.device)[:, None, None]
        std = torch.as_tensor(self.std, dtype=image.dtype, device=image.device)[:, None, None]
        x, inference = (image - mean) / std, self.config.inference
        if inference.mode == 'slide':
            return sliding_window_logits(model, x, inference.crop, inference.stride)
        return whole_image_logits(model, x, inference.short_side, inference.max_side)

    def report(self, metrics: dict) -> str:
        """IoU per class ('-' for a class absent from both the truth and the predictions), then the means."""
        width = max(len('class'), *(len(name) for name in self.classes))
        rows = [f"{'class':{width}}     IoU"]
        for name in self.classes:
            iou = metrics[f'IoU_{name}']
            rows.append(f'{name:{width}}  ' + (f'{iou:6.3f}' if iou == iou else f"{'-':>6}"))
        rows.append(f"{'mean':{width}}  {metrics['mIoU']:6.3f}")
        return '\n'.join(rows)

    def summary(self, metrics: dict) -> str:
        return f"mIoU {metrics['mIoU']:.3f} (pixel accuracy {metrics['pixel_accuracy']:.3f})"


def model_loss_weights(model: nn.Module) -> dict[str, float]:
    """The weight of each output in the loss: 1 for 'out', the model's `aux_weight` for 'aux'."""
    model = getattr(model, 'module', model)  # DDP
    model = getattr(model, '_orig_mod', model)  # torch.compile
    return dict(out=1.0, aux=getattr(model, 'aux_weight', 0.4))
