"""Image classification: cross-entropy with label smoothing or Mixup/CutMix targets, optionally distilled.

Top-1 accuracy picks `best.pth`. Evaluation sums correct predictions and
losses exactly over ranks, so a sharded evaluation equals a single-process one.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import Config
from ..data import build_data, build_mixup, build_source
from ..engine.distributed import DistEnv, all_reduce_sum
from ..engine.task import Task
from ..factory import create_model
from .distill import DistillationLoss, Renormalize, build_teacher


class ClassificationTask(Task):
    best_metric = 'top1'
    higher_is_better = True

    def __init__(self, config: Config, load: str | None = None, evaluate_only: bool = False):
        """`load`: weights to start from (or to evaluate), over `model.checkpoint`."""
        self.config = config
        self.weights = load or config.model.checkpoint
        self.evaluate_only = evaluate_only
        self.channels_last = config.train.channels_last
        # everything that can be wrong with the data fails here, before any model is built
        self.train_source = None if evaluate_only else build_source(config, 'train')
        self.val_source = build_source(config, 'val')
        self.classes = list((self.train_source or self.val_source).classes)
        self.num_classes = config.model.num_classes or len(self.classes)

    def setup(self, env: DistEnv, fresh: bool) -> None:
        config, m = self.config, self.config.model
        weights = self.weights if fresh else None  # a resumed run's weights come from its checkpoint
        model = create_model(m.name, pretrained=m.pretrained and fresh and not weights, checkpoint_path=weights,
                             num_classes=self.num_classes, drop_path_rate=m.drop_path_rate, **m.kwargs)
        model.to(env.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model
        self.env = env
        data = build_data(config, model.pretrained_cfg, self.train_source, self.val_source, env.rank,
                          env.world_size, pin_memory=env.device.type == 'cuda')
        self.train_data, self.val_loader = data.train, data.val
        self.mixup = None if self.evaluate_only else build_mixup(config, self.num_classes)
        self.distill = None
        if config.distill.type != 'none' and not self.evaluate_only:
            self.distill = self._distillation_loss(build_teacher(config.distill, self.num_classes).to(env.device))

    def _distillation_loss(self, teacher: nn.Module) -> DistillationLoss:
        student_cfg, teacher_cfg = self.model.pretrained_cfg, getattr(teacher, 'pretrained_cfg', None) or {}
        renorm = Renormalize(student_cfg['mean'], student_cfg['std'], teacher_cfg.get('mean', student_cfg['mean']),
                             teacher_cfg.get('std', student_cfg['std'])).to(self.env.device)
        d = self.config.distill
        return DistillationLoss(self.label_loss, teacher, d.type, d.alpha, d.tau, renormalize=renorm)

    def label_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy; Mixup's soft targets already carry the label smoothing."""
        smoothing = self.config.augment.smoothing if targets.ndim == 1 else 0.0
        return F.cross_entropy(logits.float(), targets, label_smoothing=smoothing)

    def _to_device(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = images.to(self.env.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, targets.to(self.env.device, non_blocking=True)

    def training_loss(self, model: nn.Module, batch) -> torch.Tensor:
        images, targets = self._to_device(batch.images, batch.targets)  # (B, 3, H, W), (B,)
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)  # targets become (B, classes)
        logits = model(images)
        return self.distill(images, logits, targets) if self.distill else self.label_loss(logits, targets)

    def eval_batches(self):
        return self.val_loader

    def evaluate(self, model: nn.Module, batches) -> dict[str, float]:
        totals = torch.zeros(4, dtype=torch.float64)  # correct@1, correct@5, loss sum, count
        for batch in batches:
            if not len(batch.targets):
                continue
            images, targets = self._to_device(batch.images, batch.targets)
            logits = model(images).float()
            hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == targets[:, None]
            totals += torch.tensor([hits[:, 0].sum().item(), hits.any(dim=1).sum().item(),
                                    F.cross_entropy(logits, targets, reduction='sum').item(), len(targets)],
                                   dtype=torch.float64)
        all_reduce_sum(totals, self.env)
        count = max(totals[3].item(), 1)
        return dict(loss=totals[2].item() / count, top1=100 * totals[0].item() / count,
                    top5=100 * totals[1].item() / count, count=int(totals[3].item()))

    def summary(self, metrics: dict) -> str:
        skipped = f", {metrics['skipped']} unreadable skipped" if metrics.get('skipped') else ''
        return (f"top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  loss {metrics['loss']:.4f}  "
                f"({metrics['count']} images{skipped})")

    def describe(self) -> str:
        sizes = f'{len(self.train_source)} train / ' if self.train_source else ''
        return f'{self.config.model.name}, {self.num_classes} classes, {sizes}{len(self.val_source)} val images'

    def state_dict(self) -> dict:
        # not needed to resume, but what `xcit predict` reads to name the classes and rebuild the model
        return dict(classes=self.classes, architecture=self.config.model.name)
