"""Semantic segmentation scores from one confusion matrix accumulated over the whole set.

Per-image scores averaged afterwards would weight a small image like a large one; mmseg,
the official XCiT segmentation code, accumulates pixel counts over the set, and so does
this. Under torchrun the per-rank matrices are summed before anything is computed, so
the scores are the set's, whatever the number of processes.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class ConfusionMatrix:
    """counts[t, p]: pixels of true class t predicted as p, over every `update` (and every rank after `reduce`).

    Pixels labelled `ignore_index` (255 in ADE20K and VOC) are not counted.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, device: torch.device | str | None = None):
        if num_classes < 1:
            raise ValueError(f'num_classes must be at least 1, not {num_classes}')
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.counts = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        """Add (..., H, W) predicted and true class maps of the same shape."""
        if prediction.shape != target.shape:
            raise ValueError(f'prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape')
        valid = target != self.ignore_index
        t, p = target[valid].long(), prediction[valid].long()
        if t.numel() and (t.min() < 0 or t.max() >= self.num_classes):
            raise ValueError(f'target classes must be in [0, {self.num_classes}) or {self.ignore_index}, '
                             f'found {int(t.min())}..{int(t.max())}')
        if p.numel() and (p.min() < 0 or p.max() >= self.num_classes):
            raise ValueError(f'predicted classes must be in [0, {self.num_classes}), found {int(p.min())}..{int(p.max())}')
        self.counts += torch.bincount(t * self.num_classes + p, minlength=self.num_classes ** 2).view_as(self.counts)

    def reduce(self) -> ConfusionMatrix:
        """Sum the matrices of every rank (a no-op in one process)."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.counts)
        return self

    def compute(self) -> dict:
        """mIoU and mean accuracy over the classes that occur (in the truth or the predictions), per-class IoU
        and accuracy (NaN for a class that never occurs), and pixel accuracy."""
        counts = self.counts.double()
        hits = counts.diag()
        true, predicted = counts.sum(1), counts.sum(0)
        union = true + predicted - hits
        iou = hits / union  # NaN where the class occurs nowhere
        accuracy = hits / true
        total = counts.sum()
        return dict(mIoU=float(iou.nanmean()), mean_accuracy=float(accuracy.nanmean()),
                    pixel_accuracy=float(hits.sum() / total) if total else float('nan'),
                    iou=iou.tolist(), accuracy=accuracy.tolist())
