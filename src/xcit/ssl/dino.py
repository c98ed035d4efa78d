"""DINO (Caron et al. 2021, facebookresearch/dino): a student matches an EMA teacher's sharpened, centred
output over crops of one image at several sizes, without labels.

Any backbone of the registry serves: its feature is the pre-logits vector (a model built with
`num_classes=0`). Crops of one size go through the backbone together, and XCiT, having no
fixed-size position embedding, takes the 96-pixel local crops as they are.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class WeightNormLinear(nn.Module):
    """A bias-free linear layer whose rows are `weight_g * weight_v / |weight_v|` (DINO's weight-normalised last
    layer, with its parameter names); with `norm_last_layer` the gains stay at 1 and only directions learn."""

    def __init__(self, in_features: int, out_features: int, fixed_gain: bool = True):
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))  # nn.Linear's default, as DINO leaves it
        self.weight_g = nn.Parameter(torch.ones(out_features, 1), requires_grad=not fixed_gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))
        return F.linear(x, weight)


class DINOHead(nn.Module):
    """MLP (Linear-GELU x2, then a linear bottleneck), L2 normalisation, weight-normalised projection to `out_dim`."""

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 num_layers: int = 3, use_bn: bool = False, norm_last_layer: bool = True):
        super().__init__()
        layers, dim = [], in_dim
        for _ in range(max(num_layers, 1) - 1):
            layers += [nn.Linear(dim, hidden_dim), *([nn.BatchNorm1d(hidden_dim)] if use_bn else []), nn.GELU()]
            dim = hidden_dim
        layers.append(nn.Linear(dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers) if len(layers) > 1 else layers[0]
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fixed_gain=norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)  # (B, bottleneck)
        return self.last_layer(F.normalize(x, dim=-1))  # (B, out_dim)


class MultiCrop(nn.Module):
    """A backbone and a head over a list of crops: each run of consecutive crops of one size goes through the
    backbone as one batch; the head sees all features at once. Rows come out crop-major (crop 0's batch first)."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, crops: list[torch.Tensor]) -> torch.Tensor:
        features, start = [], 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            features.append(self.backbone(torch.cat(crops[start:end])))  # (run x B, D)
            start = end
        return self.head(torch.cat(features))  # (crops x B, out_dim)


class DINOModel(nn.Module):
    """Student and teacher, one module so a checkpoint holds both; the teacher learns only through `update_teacher`.

    Both stay in training mode while training, as in DINO: the teacher's BatchNorm uses and tracks the
    statistics of its own batches, which the EMA does not touch.
    """

    def __init__(self, student: MultiCrop, teacher: MultiCrop, global_crops: int = 2):
        super().__init__()
        self.student, self.teacher, self.global_crops = student, teacher, global_crops
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)

    def forward(self, crops: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            teacher_out = self.teacher(crops[:self.global_crops])  # (global x B, out_dim): global crops only
        return self.student(crops), teacher_out  # (crops x B, out_dim)

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter (not the buffers)."""
        teacher = [p for p in self.teacher.parameters()]
        student = [p.detach() for p in self.student.parameters()]
        torch._foreach_mul_(teacher, momentum)
        torch._foreach_add_(teacher, student, alpha=1 - momentum)


class DINOLoss(nn.Module):
    """Cross-entropy between the teacher's centred, sharpened softmax of each global crop and the student's softmax
    of every other crop, averaged over the pairs; then the centre moves towards the batch mean of the teacher's
    raw outputs (all ranks together), so the next step's targets do not collapse onto one dimension.
    `teacher_entropy` keeps the last batch's mean entropy of the targets, which reads ln(out_dim) once the
    teacher has collapsed to uniform."""

    def __init__(self, out_dim: int, crops: int, global_crops: int = 2, student_temp: float = 0.1,
                 center_momentum: float = 0.9):
        super().__init__()
        self.crops, self.global_crops = crops, global_crops
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.register_buffer('center', torch.zeros(1, out_dim))
        self.teacher_entropy = torch.zeros(())

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        student = F.log_softmax(student_out.float() / self.student_temp, dim=-1).chunk(self.crops)  # crops x (B, K)
        teacher = F.softmax((teacher_out.float() - self.center) / teacher_temp, dim=-1).detach()
        # ln K when the targets are uniform: the collapse that centring without enough sharpening leads to
        self.teacher_entropy = -(teacher * teacher.clamp_min(1e-12).log()).sum(dim=-1).mean()
        teacher = teacher.chunk(self.global_crops)  # global x (B, K)
        total, pairs = 0.0, 0
        for t, q in enumerate(teacher):
            for v, log_p in enumerate(student):
                if v == t:
                    continue  # a crop is not matched with itself
                total = total + (-q * log_p).sum(dim=-1).mean()
                pairs += 1
        self.update_center(teacher_out)
        return total / pairs

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        batch_sum = teacher_out.float().sum(dim=0, keepdim=True)  # (1, K)
        rows = torch.tensor(float(len(teacher_out)), device=batch_sum.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_sum)
            dist.all_reduce(rows)
        self.center.mul_(self.center_momentum).add_(batch_sum / rows, alpha=1 - self.center_momentum)


def cosine_ramp(start: float, end: float, step: int, total_steps: int) -> float:
    """Half a cosine from `start` (step 0) to `end` (step `total_steps`): DINO's teacher momentum, 0.996 -> 1."""
    progress = min(step / max(total_steps, 1), 1.0)
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * progress))


def teacher_temperature(epoch: int, warmup_temp: float, temp: float, warmup_epochs: int) -> float:
    """Linear from `warmup_temp` at epoch 0 to `temp` at epoch `warmup_epochs - 1` (both ends included, as
    DINO's linspace), then `temp`."""
    if epoch >= warmup_epochs:
        return temp
    if warmup_epochs == 1:
        return warmup_temp
    return warmup_temp + (temp - warmup_temp) * epoch / (warmup_epochs - 1)
