"""The training loop every task runs through: `fit(task, ...)` trains, evaluates and checkpoints it.

Every optimizer step runs in an RNG scope seeded from (seed, rank, step,
micro-batch), and every sample's augmentation in one seeded from (seed, epoch,
index), so a step is a pure function of the checkpointed state: a run resumed
from any checkpoint, even one written mid-epoch, continues bit for bit as if
never interrupted.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..checkpoints.errors import CheckpointError
from ..checkpoints.io import read_checkpoint
from ..config import OptimConfig, ScheduleConfig, TrainConfig
from ..models import compile_static
from ..models.fastpath import CHOOSER
from ..seeding import rng_scope, sample_seed
from .checkpoint import FORMAT, FORMAT_VERSION, CheckpointWriter
from .distributed import DistEnv, all_gather_union, all_reduce_sum, average_batchnorm_buffers
from .logbook import RunLog, epoch_line, plot_curves
from .optim import build_optimizer, build_schedule, peak_lr
from .task import Task

_logger = logging.getLogger('xcit.train')


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last checkpoint written before it is intact."""


@dataclass
class FitResult:
    model: nn.Module  # the task's (unwrapped) model, trained
    run_dir: Path | None
    metrics: dict = field(default_factory=dict)  # the last evaluation, with `skipped` unreadable samples
    history: list[dict] = field(default_factory=list)  # one row per epoch, as in metrics.jsonl
    summary: str = ''  # the task's one line on `metrics`, for people
    report: str = ''  # the task's table on `metrics`, for people (may be empty)


def autocast(amp: str, device: torch.device):
    """bf16 or fp16 autocast on `device`, or nothing for 'none'."""
    if amp == 'none':
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == 'bf16' else torch.float16)


def set_train_mode(model: nn.Module, freeze_bn: bool) -> None:
    model.train()
    if freeze_bn:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def free_run_dir(output_dir: str | Path, experiment: str | None) -> Path:
    """`output_dir/experiment`, or the first free `experiment-N` beside it (created once training starts)."""
    base = Path(output_dir) / (experiment or 'run')
    run_dir, n = base, 0
    while run_dir.exists() and any(run_dir.iterdir()):
        n += 1
        run_dir = base.with_name(f'{base.name}-{n}')
    return run_dir


def read_training_checkpoint(path: str | Path) -> dict:
    state = read_checkpoint(path)
    if not isinstance(state, dict) or state.get('format') != FORMAT:
        raise CheckpointError(f'{path}: not a training checkpoint written by xcit train (use --load for weights)')
    if state.get('format_version') != FORMAT_VERSION:
        raise CheckpointError(f"{path}: a training checkpoint of format version {state.get('format_version')}; "
                              f'this version resumes version {FORMAT_VERSION} only (use --load to start from its weights)')
    return state


class Unreadable:
    """The names of samples that could not be read, taken from the `unreadable` attribute of passing batches."""

    def __init__(self):
        self.names: set[str] = set()

    def watch(self, batches):
        for batch in batches:
            self.names.update(getattr(batch, 'unreadable', ()))
            yield batch


@torch.no_grad()
def evaluate(task: Task, model: nn.Module, env: DistEnv, amp: str = 'none') -> tuple[dict, set[str]]:
    """The task's metrics for `model` with `skipped`, the count of distinct unreadable samples, and their names."""
    unreadable = Unreadable()
    model.eval()
    with autocast(amp, env.device):
        metrics = task.evaluate(model, unreadable.watch(task.eval_batches()))
    names = all_gather_union(unreadable.names, env)
    return dict(metrics, skipped=len(names)), names


def evaluate_task(task: Task, env: DistEnv, seed: int, amp: str = 'none') -> FitResult:
    """Build the task's model and data (loading whatever weights it is given) and evaluate once."""
    with rng_scope(seed):
        task.setup(env, fresh=True)
    metrics = evaluate(task, task.model, env, amp)[0]
    return FitResult(task.model, None, metrics, summary=task.summary(metrics), report=task.report(metrics))


def fit(task: Task, env: DistEnv, train: TrainConfig, optim: OptimConfig, schedule: ScheduleConfig, seed: int,
        run_dir: Path | None, record: dict, resume: str | Path | None = None) -> FitResult:
    """Train `task` as the sections say; rank 0 writes `run_dir` (on resume: the checkpoint's folder).

    `record` (the run's whole config) is saved with every checkpoint and as config.yaml.
    """
    resume_state = read_training_checkpoint(resume) if resume else None
    with rng_scope(seed):  # the same initial weights on every rank
        task.setup(env, fresh=resume_state is None)
    if task.train_data is None:
        raise ValueError(f'{task.describe()}: the task built no training data')
    if resume_state is not None:
        run_dir = Path(resume).parent
    trainer = _Trainer(task, env, train, optim, schedule, seed, run_dir if env.is_primary else None, record)
    if resume_state is not None:
        trainer.load_state(resume_state)
    return trainer.fit()


class _Trainer:
    """The state of one fit, which a checkpoint holds, and the steps that change it."""

    def __init__(self, task: Task, env: DistEnv, train: TrainConfig, optim: OptimConfig, schedule: ScheduleConfig,
                 seed: int, run_dir: Path | None, record: dict):
        self.task, self.env, self.train, self.optim, self.seed, self.record = task, env, train, optim, seed, record
        model = task.model
        if train.sync_bn and env.distributed and env.device.type == 'cuda':
            model = task.model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model  # the user's model: what checkpoints hold
        self.ema = None
        if train.ema:
            from timm.utils import ModelEmaV3
            self.ema = ModelEmaV3(model, decay=train.ema_decay)
        self.wrapped_model = _wrap(model, env, train.compile)  # DDP and/or compiled: what the loss runs through

        data = task.train_data
        self.steps_per_epoch = len(data) // optim.accum_steps
        if self.steps_per_epoch == 0:
            raise ValueError(f'an epoch has {len(data)} batches, fewer than optim.accum_steps ({optim.accum_steps})')
        lr = peak_lr(optim, global_batch=data.batch_size * env.world_size * optim.accum_steps)
        self.optimizer = build_optimizer(model, optim, lr)
        self.schedule = build_schedule(schedule, lr, self.steps_per_epoch, optim)
        self.epochs = schedule.epochs
        self.scaler = torch.amp.GradScaler(env.device.type) if train.amp == 'fp16' else None
        self.epoch, self.step, self.start_batch, self.best = 0, 0, 0, None

        self.run_dir = run_dir
        if run_dir is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
        self.log = RunLog(run_dir, tensorboard=train.tensorboard) if run_dir else None
        self.writer = CheckpointWriter(run_dir, train.keep_last) if run_dir else None

    def load_state(self, state: dict) -> None:
        self.model.load_state_dict(state['model'])
        self.optimizer.load_state_dict(state['optimizer'])
        if self.scaler is not None and state.get('scaler'):
            self.scaler.load_state_dict(state['scaler'])
        if self.ema is not None and 'model_ema' in state:
            self.ema.module.load_state_dict(state['model_ema'])
        self.task.load_state_dict(state.get('task', {}))
        try:  # the paths the interrupted run took: timing afresh could pick others and end bit-exactness
            CHOOSER.load_state_dict(state.get('fast_paths') or {})
        except ValueError as e:
            raise CheckpointError(f'the checkpoint\'s fast_paths entry: {e}') from None
        self.epoch, self.step, self.start_batch = state['epoch'], state['step'], state['batch_in_epoch']
        self.best = state['best']['value']

    def state(self, batch_in_epoch: int) -> dict:
        state = dict(model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                     scaler=self.scaler.state_dict() if self.scaler else None, epoch=self.epoch, step=self.step,
                     batch_in_epoch=batch_in_epoch, best=dict(metric=self.task.best_metric, value=self.best),
                     task=self.task.state_dict(), config=self.record, fast_paths=CHOOSER.state_dict())
        if self.ema is not None:
            state['model_ema'] = self.ema.module.state_dict()
        return state

    def fit(self) -> FitResult:
        if self.log is not None:
            self.log.write_config(self.record)
            self.log.forget_from(self.epoch)
            _logger.info('run folder %s: %s, %d processes, %s', self.run_dir, self.task.describe(),
                         self.env.world_size, self.env.device)
        history, metrics = (self.log.rows() if self.log else []), {}
        while self.epoch < self.epochs:
            row, unreadable = self.train_epoch()
            if self.epoch == self.epochs - 1 or (self.epoch + 1) % self.train.eval_interval == 0:
                metrics, eval_unreadable = self.evaluate_epoch(row)
                unreadable |= eval_unreadable
            self.end_epoch(row, unreadable)
            history.append(row)
        if not metrics:  # resumed from a finished run: nothing trained, report where it stands
            metrics = evaluate(self.task, self.model, self.env, self.train.amp)[0]
        if self.log is not None:
            plot_curves(history, self.run_dir / 'curves.png', self.task.best_metric)
            self.log.close()
        return FitResult(self.model, self.run_dir, metrics, history, summary=self.task.summary(metrics),
                         report=self.task.report(metrics))

    def train_epoch(self) -> tuple[dict, set[str]]:
        """One epoch (its remainder, when resumed mid-epoch): its log row and the unreadable samples met."""
        data, accum = self.task.train_data, self.optim.accum_steps
        data.set_epoch(self.epoch, self.start_batch)
        set_train_mode(self.wrapped_model, self.train.freeze_bn)
        progress = _progress(data, len(data) - self.start_batch, self.epoch, self.epochs,
                             self.log is not None and self.train.progress)
        started, seen, losses, unreadable = time.perf_counter(), 0, [], Unreadable()
        self.optimizer.zero_grad(set_to_none=True)
        for batch_idx, batch in enumerate(unreadable.watch(progress), start=self.start_batch):
            micro = batch_idx % accum
            with rng_scope(sample_seed(self.seed, self.env.rank, self.step, micro)):
                losses.append(self.backward(batch, sync=micro == accum - 1))
            seen += data.batch_size * self.env.world_size
            if micro != accum - 1:
                continue
            lr = self.optimizer_step()
            if progress is not data and self.step % self.train.log_interval == 0:
                rate = seen / (time.perf_counter() - started)
                progress.set_postfix(loss=f'{sum(losses) / len(losses):.4f}', lr=f'{lr:.2e}', img_s=f'{rate:.0f}')
            interval = self.train.checkpoint_interval
            if self.writer and interval and self.step % interval == 0 and batch_idx + 1 < len(data):
                self.writer.save_last(self.state(batch_in_epoch=batch_idx + 1))
        self.start_batch = 0
        average_batchnorm_buffers(self.model, self.env)
        elapsed = time.perf_counter() - started
        row = dict(epoch=self.epoch, lr=self.schedule(max(self.step - 1, 0)),
                   train_loss=sum(losses) / max(len(losses), 1), epoch_time_s=round(elapsed, 2),
                   train_images_per_s=round(seen / max(elapsed, 1e-9), 1))
        return row, all_gather_union(unreadable.names, self.env)

    def backward(self, batch: Any, sync: bool) -> float:
        """One micro-batch: loss, the guard against a non-finite loss, and the scaled backward pass."""
        env, accum = self.env, self.optim.accum_steps
        no_sync = self.wrapped_model.no_sync() if env.distributed and not sync else contextlib.nullcontext()
        with no_sync:
            with autocast(self.train.amp, env.device):
                loss = self.task.training_loss(self.wrapped_model, batch)
            reported = all_reduce_sum(loss.detach().float().reshape(1), env) / env.world_size
            if not math.isfinite(reported.item()):
                last = self.writer.last if self.writer else None
                kept = f'; the last checkpoint, {last}, is intact' if last is not None and last.exists() else ''
                raise TrainingDiverged(f'the loss is {reported.item()} at epoch {self.epoch + 1}, step {self.step}{kept}')
            (self.scaler.scale(loss / accum) if self.scaler else loss / accum).backward()
        return reported.item()

    def optimizer_step(self) -> float:
        lr = self.schedule.apply(self.optimizer, self.step)
        if self.optim.clip_grad:
            if self.scaler:
                self.scaler.unscale_(self.optimizer)
            clip_gradients(self.model, self.optim.clip_grad, self.optim.clip_mode)
        self.task.adjust_gradients(self.step)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.model, step=self.step)
        self.task.after_step(self.step)
        return lr

    def evaluate_epoch(self, row: dict) -> tuple[dict, set[str]]:
        """Evaluate the model (and its EMA) into `row`; the model's metrics and the unreadable samples met."""
        metrics, unreadable = evaluate(self.task, self.model, self.env, self.train.amp)
        row.update({f'eval_{k}': v for k, v in metrics.items() if k != 'skipped'})
        if self.ema is not None:
            ema, _ = evaluate(self.task, self.ema.module, self.env, self.train.amp)
            row[f'ema_{self.task.best_metric}'] = ema[self.task.best_metric]
        return metrics, unreadable

    def end_epoch(self, row: dict, unreadable: set[str]) -> None:
        value = row.get(f'eval_{self.task.best_metric}')
        is_best = value is not None and (
            self.best is None or (value > self.best if self.task.higher_is_better else value < self.best))
        if is_best:
            self.best = value
        self.epoch += 1
        row['skipped_images'] = len(unreadable)
        if self.log is None:
            return
        self.writer.end_of_epoch(self.state(batch_in_epoch=0), self.epoch, is_best)
        self.log.log_epoch(row)
        _logger.info(epoch_line(row, self.epochs))
        if unreadable:
            listing = self.log.note_unreadable(unreadable)
            _logger.warning('epoch %d: skipped %d unreadable images (listed in %s)', self.epoch, len(unreadable),
                            listing)


def clip_gradients(model: nn.Module, max_norm: float, mode: str) -> None:
    """norm: scale all gradients together to a total norm of at most `max_norm` (timm's); per_parameter:
    each parameter's gradient on its own (DINO's `clip_gradients`)."""
    if mode == 'norm':
        nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        return
    for p in model.parameters():
        if p.grad is not None:
            nn.utils.clip_grad_norm_(p, max_norm)


def _wrap(model: nn.Module, env: DistEnv, compile: bool) -> nn.Module:
    """The module the training loss runs through: DDP across ranks, then one static compiled graph per shape."""
    wrapped = model
    if env.distributed:
        wrapped = nn.parallel.DistributedDataParallel(
            wrapped, device_ids=[env.device.index] if env.device.type == 'cuda' else None)
    return compile_static(wrapped) if compile else wrapped


def _progress(data, total: int, epoch: int, epochs: int, enabled: bool):
    if not enabled:
        return data
    from tqdm import tqdm
    return tqdm(data, total=total, desc=f'epoch {epoch + 1}/{epochs}', leave=False, dynamic_ncols=True, disable=None)  # off without a terminal
