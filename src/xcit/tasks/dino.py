"""`task: dino`: self-supervised pretraining (facebookresearch/dino's main_dino.py) on the shared engine.

The engine trains `DINOModel` (student and teacher in one module, so a checkpoint holds both);
this task supplies the multi-crop batches, the loss with its teacher-temperature schedule,
the frozen last layer of the first epoch(s) and the teacher's EMA after each step. Its
evaluation is label-efficient: the teacher backbone's weighted k-NN top-1 (and optionally
a linear probe) on the labelled train/val splits of the same data; the first evaluation
also scores the network at its initialisation and the raw pixels, which a pretraining has
to beat.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..config import Config
from ..data import build_data, build_eval_loader, build_source, input_spec
from ..data.multicrop import MultiCropTransform
from ..engine.distributed import DistEnv, all_gather_cat, all_reduce_sum, average_batchnorm_buffers
from ..engine.task import Task
from ..factory import create_model
from ..ssl import DINOHead, DINOLoss, DINOModel, MultiCrop, cosine_ramp, teacher_temperature
from ..ssl.knn import extract_features, knn_accuracy, linear_probe_accuracy, with_data_statistics


class _Flatten(nn.Module):
    """The raw-pixel baseline's 'backbone'."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)  # (B, 3 * H * W)


class DinoTask(Task):
    best_metric = 'knn_top1'
    higher_is_better = True

    def __init__(self, config: Config, load: str | None = None, evaluate_only: bool = False):
        self.config, self.evaluate_only = config, evaluate_only
        self.weights = load or config.model.checkpoint
        d = config.dino
        self.train_source = build_source(config, 'train')  # labelled for the k-NN: one view per sample
        self.pretrain_source = (build_source(config, 'train', d.renders_per_sample) if d.renders_per_sample > 1
                                else self.train_source)  # the same samples, without their labels
        self.val_source = build_source(config, 'val')
        self.crops = 2 + d.local_crops_number
        self.step, self.baselines = 0, {}
        self.entropy_sum, self.entropy_steps = 0.0, 0  # the teacher's target entropy since the last evaluation

    def _backbone(self, drop_path_rate: float | None = None, weights: str | None = None, pretrained: bool = False
                  ) -> nn.Module:
        m = self.config.model
        return create_model(m.name, num_classes=0, drop_path_rate=drop_path_rate, checkpoint_path=weights,
                            pretrained=pretrained and not weights, **m.kwargs)

    def _multicrop(self, backbone: nn.Module, norm_last_layer: bool) -> MultiCrop:
        d = self.config.dino
        head = DINOHead(backbone.num_features, d.out_dim, d.hidden_dim, d.bottleneck_dim, d.head_layers,
                        d.use_bn_in_head, norm_last_layer)
        return MultiCrop(backbone, head)

    def setup(self, env: DistEnv, fresh: bool) -> None:
        config, d = self.config, self.config.dino
        weights = self.weights if fresh else None
        backbone = self._backbone(config.model.drop_path_rate, weights, config.model.pretrained and fresh)
        student = self._multicrop(backbone, d.norm_last_layer)
        teacher = self._multicrop(self._backbone(), True)  # no drop path, DINO's head; its weights: the student's
        self.model = DINOModel(student, teacher).to(env.device)
        self.env = env
        self.loss = DINOLoss(d.out_dim, self.crops, student_temp=d.student_temp,
                             center_momentum=d.center_momentum).to(env.device)
        model_cfg = student.backbone.pretrained_cfg
        pin = env.device.type == 'cuda'
        transform = None if self.evaluate_only else self._transform(model_cfg)
        data = build_data(config, model_cfg, None if self.evaluate_only else self.pretrain_source, self.val_source,
                          env.rank, env.world_size, pin_memory=pin, train_transform=transform)
        self.train_data, self.val_loader = data.train, data.val
        self.train_features_loader = build_eval_loader(config, model_cfg, self.train_source, env.rank,
                                                       env.world_size, pin)
        if fresh:  # what pretraining must beat: where it starts from, and the pixels themselves
            self.baselines = dict(pixels=self._scores(_Flatten(), probe=False))
            if not self.evaluate_only:  # its BatchNorm statistics measured on the train images, as training would
                init = with_data_statistics(self.model.teacher.backbone, self.train_features_loader, env.device)
                average_batchnorm_buffers(init, env)
                self.baselines['init'] = self._scores(init)

    def _transform(self, model_cfg: dict) -> MultiCropTransform:
        d, spec = self.config.dino, input_spec(self.config, model_cfg)
        return MultiCropTransform(spec['size'], d.local_crops_size, d.local_crops_number, d.global_crops_scale,
                                  d.local_crops_scale, mean=spec['mean'], std=spec['std'],
                                  hflip=self.config.augment.hflip, blur_radius=d.blur_radius)

    @property
    def steps_per_epoch(self) -> int:
        return max(len(self.train_data) // self.config.optim.accum_steps, 1)

    def training_loss(self, model: nn.Module, batch) -> torch.Tensor:
        d = self.config.dino
        crops = [c.to(self.env.device, non_blocking=True) for c in batch.images]  # crops x (B, 3, S, S)
        student_out, teacher_out = model(crops)  # (crops x B, K), (2 x B, K)
        temp = teacher_temperature(self.step // self.steps_per_epoch, d.warmup_teacher_temp, d.teacher_temp,
                                   d.warmup_teacher_temp_epochs)
        loss = self.loss(student_out, teacher_out, temp)
        self.entropy_sum, self.entropy_steps = self.entropy_sum + self.loss.teacher_entropy, self.entropy_steps + 1
        return loss

    def adjust_gradients(self, step: int) -> None:
        if step // self.steps_per_epoch < self.config.dino.freeze_last_layer:
            for p in self.model.student.head.last_layer.parameters():
                p.grad = None  # not zero: AdamW then neither moves nor decays it

    def after_step(self, step: int) -> None:
        total = self.config.schedule.epochs * self.steps_per_epoch
        self.model.update_teacher(cosine_ramp(self.config.dino.momentum_teacher, 1.0, step - 1, total))
        self.step = step

    def eval_batches(self):
        return self.val_loader

    def _scores(self, backbone: nn.Module, val_batches=None, probe: bool = True) -> dict[str, float]:
        d, device = self.config.dino, self.env.device
        train = [all_gather_cat(t, self.env) for t in extract_features(backbone, self.train_features_loader, device)]
        val = [all_gather_cat(t, self.env)
               for t in extract_features(backbone, val_batches or self.val_loader, device)]
        scores = dict(knn_top1=knn_accuracy(*train, *val, k=d.knn_k, temperature=d.knn_temperature),
                      count=len(val[1]))
        if probe and d.probe_epochs:
            scores['probe_top1'] = linear_probe_accuracy(*train, *val, epochs=d.probe_epochs, seed=self.config.seed)
        return scores

    def evaluate(self, model: nn.Module, batches) -> dict[str, float]:
        scores = self._scores(model.teacher.backbone, batches)
        if self.entropy_steps:  # collapse shows as ln(out_dim) here, before the k-NN falls
            mean = torch.stack([torch.as_tensor(self.entropy_sum, dtype=torch.float32).cpu(),
                                torch.tensor(float(self.entropy_steps))])
            total, steps = all_reduce_sum(mean, self.env).tolist()
            scores['teacher_entropy'] = total / steps
            self.entropy_sum, self.entropy_steps = 0.0, 0
        for name, baseline in self.baselines.items():
            for key in ('knn_top1', 'probe_top1'):
                if key in baseline:
                    scores[f'{name}_{key}'] = baseline[key]
        return scores

    def summary(self, metrics: dict) -> str:
        these = 'pretrained' if 'init_knn_top1' in metrics else 'these weights'  # `xcit eval` has no init
        line = f"k-NN top-1: {these} {metrics['knn_top1']:.1f}%"
        if 'init_knn_top1' in metrics:
            line += f", random init {metrics['init_knn_top1']:.1f}%"
        if 'pixels_knn_top1' in metrics:
            line += f", raw pixels {metrics['pixels_knn_top1']:.1f}%"
        if 'probe_top1' in metrics:
            line += f"; linear probe: {these} {metrics['probe_top1']:.1f}%"
            if 'init_probe_top1' in metrics:
                line += f", random init {metrics['init_probe_top1']:.1f}%"
        return line + f" ({metrics['count']} val images)"

    def describe(self) -> str:
        d = self.config.dino
        draws = f' from {d.renders_per_sample} draws of each' if d.renders_per_sample > 1 else ''
        return (f'DINO on {self.config.model.name}, {len(self.train_source)} unlabelled train / '
                f'{len(self.val_source)} val images, 2 global + {d.local_crops_number} local crops{draws}, '
                f'{d.out_dim}-d head')

    def state_dict(self) -> dict:
        return dict(center=self.loss.center.cpu(), step=self.step, baselines=self.baselines,
                    architecture=self.config.model.name, task='dino')

    def load_state_dict(self, state: dict) -> None:
        if 'center' in state:
            self.loss.center.copy_(state['center'])
        self.step = state.get('step', 0)
        self.baselines = state.get('baselines', {})
