"""The training loop: one function from a validated config to a trained, evaluated, checkpointed model.

Every optimizer step reseeds the random generators from (seed, rank, step) and
every sample's augmentation depends only on (seed, epoch, index), so a step is
a pure function of the checkpointed state: a run resumed from any checkpoint,
even one written mid-epoch, continues bit for bit as if never interrupted.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoints.io import read_checkpoint
from ..config import Config, ConfigError, save_config
from ..data import DataBundle, build_data, build_mixup, build_source
from ..data.datasets import sample_seed, seed_everything
from ..factory import create_model
from ..models import compile_static
from ..registry import get_pretrained_cfg
from .checkpoint import FORMAT, CheckpointWriter, restore_rng_state, rng_state
from .distill import DistillationLoss, Renormalize, build_teacher
from .distributed import DistEnv, all_reduce_sum, average_batchnorm_buffers, barrier, cleanup, init_distributed
from .logbook import RunLog, plot_curves
from .optim import build_optimizer, build_schedule, peak_lr

_logger = logging.getLogger('xcit.train')


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last checkpoint written before it is intact."""


@dataclass
class RunResult:
    model: nn.Module  # trained (unwrapped) model
    run_dir: Path | None
    metrics: dict = field(default_factory=dict)  # the last evaluation: top1, top5, loss, count, skipped
    history: list[dict] = field(default_factory=list)


def _autocast(config: Config, device: torch.device):
    if config.train.amp == 'none':
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if config.train.amp == 'bf16' else torch.float16)


def set_train_mode(model: nn.Module, freeze_bn: bool) -> None:
    model.train()
    if freeze_bn:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


@torch.no_grad()
def evaluate(model: nn.Module, loader, env: DistEnv, autocast_ctx, channels_last: bool = False) -> dict:
    """Top-1/top-5 and loss over the whole validation set, summed exactly over ranks."""
    model.eval()
    totals = torch.zeros(5, dtype=torch.float64)  # correct@1, correct@5, loss sum, count, skipped
    for images, targets, skipped in loader:
        totals[4] += len(skipped)
        if not len(targets):
            continue
        images, targets = images.to(env.device, non_blocking=True), targets.to(env.device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast_ctx:
            logits = model(images)
        logits = logits.float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top5 == targets[:, None]
        totals[0] += hits[:, 0].sum().item()
        totals[1] += hits.any(dim=1).sum().item()
        totals[2] += F.cross_entropy(logits, targets, reduction='sum').item()
        totals[3] += len(targets)
    all_reduce_sum(totals, env)
    count = max(totals[3].item(), 1)
    return dict(top1=100 * totals[0].item() / count, top5=100 * totals[1].item() / count,
                loss=totals[2].item() / count, count=int(totals[3].item()), skipped=int(totals[4].item()))


def _new_run_dir(config: Config) -> Path:
    base = Path(config.output_dir) / (config.experiment or 'run')
    run_dir, n = base, 0
    while run_dir.exists() and any(run_dir.iterdir()):
        n += 1
        run_dir = base.with_name(f'{base.name}-{n}')
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _load_resume_state(path: str | Path) -> dict:
    state = read_checkpoint(path)
    if not isinstance(state, dict) or state.get('format') != FORMAT:
        raise ConfigError(f'{path}: not a training checkpoint written by xcit train (use --load for weights)')
    return state


def run(config: Config, resume: str | Path | None = None, load: str | Path | None = None,
        evaluate_only: bool = False) -> RunResult:
    """Train (or only evaluate) as `config` says; `torchrun` processes share the work."""
    env = init_distributed(config.train.device)
    try:
        result = _run(config, env, resume, load, evaluate_only)
        # a gloo rank that tears its group down while rank 0 still writes checkpoints aborts the process
        barrier(env)
        return result
    finally:
        cleanup(env)


def _run(config: Config, env: DistEnv, resume, load, evaluate_only: bool) -> RunResult:
    primary = env.is_primary
    resume_state = _load_resume_state(resume) if resume else None

    # everything that can be wrong with the input fails here, before any training
    model_cfg = get_pretrained_cfg(config.model.name)
    train_source = None if evaluate_only else build_source(config, 'train')
    val_source = build_source(config, 'val')
    classes = (train_source or val_source).classes
    num_classes = config.model.num_classes or len(classes)

    seed_everything(config.seed)  # the same initial weights on every rank
    weights = None if resume_state is not None else (load or config.model.checkpoint)
    model = create_model(
        config.model.name, pretrained=config.model.pretrained and resume_state is None and not weights,
        checkpoint_path=weights, num_classes=num_classes, drop_path_rate=config.model.drop_path_rate,
        **config.model.kwargs)
    if resume_state is not None:
        model.load_state_dict(resume_state['model'])
    model.to(env.device)
    if config.train.channels_last:
        model.to(memory_format=torch.channels_last)
    autocast_ctx = _autocast(config, env.device)

    data = build_data(config, model.pretrained_cfg, train_source, val_source, env.rank, env.world_size,
                      pin_memory=env.device.type == 'cuda')
    if evaluate_only:
        return RunResult(model, None, evaluate(model, data.val, env, autocast_ctx, config.train.channels_last))

    mixup = build_mixup(config, num_classes)
    teacher_loss = None
    if config.distill.type != 'none':
        teacher = build_teacher(config.distill, num_classes).to(env.device)
        t_cfg = getattr(teacher, 'pretrained_cfg', None) or {}
        renorm = Renormalize(model.pretrained_cfg['mean'], model.pretrained_cfg['std'],
                             t_cfg.get('mean', model.pretrained_cfg['mean']),
                             t_cfg.get('std', model.pretrained_cfg['std'])).to(env.device)
        teacher_loss = (teacher, renorm)

    net = model  # the unwrapped model: what checkpoints hold
    if config.train.sync_bn and env.distributed and env.device.type == 'cuda':
        net = model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ema = None
    if config.train.ema:
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(net, decay=config.train.ema_decay)
        if resume_state is not None and 'model_ema' in resume_state:
            ema.module.load_state_dict(resume_state['model_ema'])
    if env.distributed:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device.index] if env.device.type == 'cuda' else None)
    if config.train.compile:
        model = compile_static(model)

    accum = config.optim.accum_steps
    steps_per_epoch = len(data.train) // accum
    if steps_per_epoch == 0:
        raise ConfigError(f'an epoch has {len(data.train)} batches, fewer than optim.accum_steps ({accum})')
    lr = peak_lr(config, env.world_size)
    optimizer = build_optimizer(net, config, lr)
    schedule = build_schedule(config, lr, steps_per_epoch)
    scaler = torch.amp.GradScaler(env.device.type) if config.train.amp == 'fp16' else None

    smoothing = config.augment.smoothing if mixup is None else 0.0  # Mixup already smooths its targets

    def task_loss(logits, targets):
        return F.cross_entropy(logits.float(), targets, label_smoothing=smoothing if targets.ndim == 1 else 0.0)

    criterion = (DistillationLoss(task_loss, teacher_loss[0], config.distill.type, config.distill.alpha,
                                  config.distill.tau, renormalize=teacher_loss[1])
                 if teacher_loss else None)

    start_epoch, step, skip_batches, best_top1 = 0, 0, 0, -1.0
    if resume_state is not None:
        optimizer.load_state_dict(resume_state['optimizer'])
        if scaler is not None and resume_state.get('scaler'):
            scaler.load_state_dict(resume_state['scaler'])
        start_epoch, step = resume_state['epoch'], resume_state['step']
        skip_batches, best_top1 = resume_state['batch_in_epoch'], resume_state['best_top1']
        restore_rng_state(resume_state['rng'])
        run_dir = Path(resume).parent
    else:
        run_dir = _new_run_dir(config) if primary else None

    log = RunLog(run_dir, tensorboard=config.train.tensorboard) if primary else None
    writer = CheckpointWriter(run_dir, config.train.keep_last) if primary else None
    if primary:
        save_config(config, run_dir / 'config.yaml')
        if resume_state is not None:
            log.forget_from(start_epoch)
        _logger.info('run folder %s: %s, %d classes, %d train / %d val images, %d processes, %s', run_dir,
                     config.model.name, num_classes, len(train_source), len(val_source), env.world_size, env.device)

    def state(epoch: int, batch_in_epoch: int) -> dict:
        s = dict(model=net.state_dict(), optimizer=optimizer.state_dict(), scheduler=dict(step=step),
                 scaler=scaler.state_dict() if scaler else None, epoch=epoch, step=step,
                 batch_in_epoch=batch_in_epoch, best_top1=best_top1, rng=rng_state(), config=config.to_dict(),
                 classes=list(classes), architecture=config.model.name)
        if ema is not None:
            s['model_ema'] = ema.module.state_dict()
        return s

    history, metrics = (log.rows() if log else []), {}
    epochs = config.schedule.epochs
    for epoch in range(start_epoch, epochs):
        data.set_epoch(epoch)
        if skip_batches:
            data.train_sampler.skip(skip_batches * config.data.batch_size)
        set_train_mode(model, config.train.freeze_bn)
        started, seen, loss_sum, loss_count, skipped = time.perf_counter(), 0, 0.0, 0, 0
        progress = _progress(data.train, epoch, epochs, primary and config.train.progress)
        optimizer.zero_grad(set_to_none=True)
        for batch_idx, (images, targets, bad) in enumerate(progress, start=skip_batches):
            skipped += len(bad)
            micro = batch_idx % accum
            seed_everything(sample_seed(config.seed, env.rank, step, micro))
            images, targets = images.to(env.device, non_blocking=True), targets.to(env.device, non_blocking=True)
            if config.train.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            if mixup is not None:
                images, targets = mixup(images, targets)
            sync = micro == accum - 1
            no_sync = model.no_sync() if env.distributed and not sync else contextlib.nullcontext()
            with no_sync:
                with autocast_ctx:
                    logits = model(images)
                    loss = criterion(images, logits, targets) if criterion else task_loss(logits, targets)
                reported = all_reduce_sum(loss.detach().float().reshape(1), env) / env.world_size
                if not math.isfinite(reported.item()):
                    where = f'epoch {epoch + 1}, step {step}'
                    last = f'; the last checkpoint, {writer.last}, is intact' if writer and writer.last.exists() else ''
                    raise TrainingDiverged(f'the loss is {reported.item()} at {where}{last}')
                (scaler.scale(loss / accum) if scaler else loss / accum).backward()
            loss_sum += reported.item()
            loss_count += 1
            seen += len(images) * env.world_size
            if not sync:
                continue
            current_lr = schedule.apply(optimizer, step)
            if config.optim.clip_grad:
                if scaler:
                    scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(net.parameters(), config.optim.clip_grad)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if ema is not None:
                ema.update(net, step=step)
            if primary and config.train.progress and step % config.train.log_interval == 0:
                rate = seen / (time.perf_counter() - started)
                progress.set_postfix(loss=f'{loss_sum / loss_count:.4f}', lr=f'{current_lr:.2e}',
                                     img_s=f'{rate:.0f}')
            interval = config.train.checkpoint_interval
            if primary and interval and step % interval == 0 and batch_idx + 1 < len(data.train):
                writer.save_last(state(epoch, batch_idx + 1))
        skip_batches = 0
        average_batchnorm_buffers(net, env)
        elapsed = time.perf_counter() - started
        row = dict(epoch=epoch, lr=schedule(max(step - 1, 0)), train_loss=loss_sum / max(loss_count, 1),
                   epoch_time_s=round(elapsed, 2), train_images_per_s=round(seen / max(elapsed, 1e-9), 1),
                   skipped_images=skipped)
        last_epoch = epoch == epochs - 1
        if last_epoch or (epoch + 1) % config.train.eval_interval == 0:
            metrics = evaluate(model, data.val, env, autocast_ctx, config.train.channels_last)
            row.update(eval_loss=metrics['loss'], eval_top1=metrics['top1'], eval_top5=metrics['top5'])
            row['skipped_images'] += metrics['skipped']
            if ema is not None:
                row['ema_top1'] = evaluate(ema.module, data.val, env, autocast_ctx, config.train.channels_last)['top1']
        is_best = 'eval_top1' in row and row['eval_top1'] > best_top1
        if is_best:
            best_top1 = row['eval_top1']
        if primary:
            writer.end_of_epoch(state(epoch + 1, 0), epoch + 1, is_best)
            log.log_epoch(row)
            history.append(row)
            _logger.info(_epoch_line(row, epochs))
            if row['skipped_images']:
                _logger.warning('epoch %d: skipped %d unreadable images', epoch + 1, row['skipped_images'])
    if not metrics:  # resumed from a finished run: nothing trained, report where it stands
        metrics = evaluate(model, data.val, env, autocast_ctx, config.train.channels_last)
    if primary:
        plot_curves(history, run_dir / 'curves.png')
        log.close()
    return RunResult(net, run_dir, metrics, history)


def _progress(loader, epoch: int, epochs: int, enabled: bool):
    if not enabled:
        return loader
    from tqdm import tqdm
    return tqdm(loader, desc=f'epoch {epoch + 1}/{epochs}', leave=False, dynamic_ncols=True, disable=None)  # off without a terminal


def _epoch_line(row: dict, epochs: int) -> str:
    text = f"epoch {row['epoch'] + 1}/{epochs}: train loss {row['train_loss']:.4f}"
    if row.get('eval_top1') is not None:
        text += f", eval loss {row['eval_loss']:.4f}, top-1 {row['eval_top1']:.2f}%, top-5 {row['eval_top5']:.2f}%"
    if row.get('ema_top1') is not None:
        text += f", EMA top-1 {row['ema_top1']:.2f}%"
    return text + f", {row['train_images_per_s']:.0f} img/s, {row['epoch_time_s']:.1f}s"
