"""Knowledge distillation from a frozen teacher: DeiT's hard and soft losses, PASSL's DML.

XCiT distils without a distillation token: the student's single head meets
both the labels and the teacher. The teacher runs in eval mode, without
gradients, on the same (mixed) batch, re-normalised to its own mean/std.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import DistillConfig


class Renormalize(nn.Module):
    """Maps inputs normalised with the student's mean/std to the teacher's."""

    def __init__(self, student_mean, student_std, teacher_mean, teacher_std):
        super().__init__()
        as_buffer = lambda v: torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1)  # noqa: E731
        self.register_buffer('scale', as_buffer(student_std) / as_buffer(teacher_std), persistent=False)
        self.register_buffer('shift', (as_buffer(student_mean) - as_buffer(teacher_mean)) / as_buffer(teacher_std),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.to(x.dtype) + self.shift.to(x.dtype)


def build_teacher(config: DistillConfig, num_classes: int) -> nn.Module:
    """A registered model, else a timm model, frozen and in eval mode, with its weights if given (any
    format a model of that family is read from; a distillation checkpoint gives its Teacher; PASSL's
    RegNet teacher file loads into timm's regnety_*)."""
    from ..checkpoints.load import load_into, read_state_dict
    from ..factory import create_model
    from ..registry import is_model
    if is_model(config.teacher):
        teacher = create_model(config.teacher, num_classes=num_classes, pretrained=config.teacher_pretrained,
                               **config.teacher_kwargs)
    else:
        import timm
        if not timm.is_model(config.teacher):
            raise ValueError(f'distill.teacher {config.teacher!r} is neither an xcit nor a timm model')
        teacher = timm.create_model(config.teacher, num_classes=num_classes, pretrained=config.teacher_pretrained,
                                    **config.teacher_kwargs)
    if config.teacher_weights:
        state_dict, label = read_state_dict(config.teacher_weights, part='Teacher')
        load_into(teacher, state_dict, source=label)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) from log-probabilities, summed over classes and averaged over the batch."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=1).mean()


class DistillationLoss(nn.Module):
    """(1 - alpha) * task loss + alpha * distillation term.

    hard: cross-entropy against the teacher's argmax (DeiT).
    soft: tau^2 * KL(teacher || student) at temperature tau, summed and divided by
          batch x classes as DeiT does (about num_classes times smaller than a
          batch-mean KL; DeiT's recipes are tuned for that scale).
    dml:  the symmetric KL of PASSL's DistillationWrapper, (KL(t||s) + KL(s||t)) / 2,
          batch-mean, no temperature; PASSL weighs it 0.5 / 0.5 with the task loss.
    """

    def __init__(self, task_loss: Callable, teacher: nn.Module, kind: str, alpha: float = 0.5, tau: float = 1.0,
                 renormalize: nn.Module | None = None):
        super().__init__()
        if kind not in ('hard', 'soft', 'dml'):
            raise ValueError(f"distill.type must be 'hard', 'soft' or 'dml', not {kind!r}")
        self.task_loss = task_loss
        self.teacher = teacher
        self.kind, self.alpha, self.tau = kind, alpha, tau
        self.renormalize = renormalize or nn.Identity()

    def forward(self, inputs: torch.Tensor, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        task = self.task_loss(outputs, targets)
        with torch.no_grad():
            teacher_logits = self.teacher(self.renormalize(inputs)).float()
        outputs = outputs.float()
        if self.kind == 'hard':
            distill = F.cross_entropy(outputs, teacher_logits.argmax(dim=1))
        elif self.kind == 'soft':
            T = self.tau
            distill = F.kl_div(F.log_softmax(outputs / T, dim=1), F.log_softmax(teacher_logits / T, dim=1),
                               reduction='sum', log_target=True) * (T * T) / outputs.numel()
        else:
            log_s, log_t = F.log_softmax(outputs, dim=1), F.log_softmax(teacher_logits, dim=1)
            distill = (_kl(log_t, log_s) + _kl(log_s, log_t)) / 2
        return (1 - self.alpha) * task + self.alpha * distill

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the teacher never leaves eval mode: its BatchNorm statistics stay as loaded
        return self
