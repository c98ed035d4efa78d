"""What a task supplies to the training engine: its model, its data, its loss and its metric.

The engine (`engine.loop.fit`) owns everything tasks share: devices and
`torchrun`, mixed precision, accumulation, clipping, the schedule, EMA, DDP,
`torch.compile`, the non-finite-loss guard, checkpoints, resume, logs and
progress. A task owns what differs, behind the few methods below, so the loop
never asks which task it runs. Classification (`xcit.tasks.classification`) is
one; a new task is a new subclass, not a new branch in the loop.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator, Protocol

import torch
import torch.nn as nn

from .distributed import DistEnv


class TrainData(Protocol):
    """The training batches of one process, epoch by epoch, resumable mid-epoch."""

    batch_size: int  # samples per batch and process: for the global batch and throughput

    def __len__(self) -> int: ...  # batches per epoch

    def __iter__(self) -> Iterator[Any]: ...

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Prepare `epoch`'s batches, leaving out the first `start_batch` (already trained on)."""


class Task:
    """Subclass and fill in `setup`, `training_loss` and `evaluate`.

    Batches may carry an `unreadable` attribute (names of samples that could not
    be read); the engine counts them and lists them in the run folder.
    """

    best_metric: str = 'loss'  # the key of `evaluate`'s result that picks best.pth
    higher_is_better: bool = False

    model: nn.Module  # what is optimised, checkpointed and returned (never a DDP or compiled wrapper)
    train_data: TrainData | None = None  # None when only evaluating

    def setup(self, env: DistEnv, fresh: bool) -> None:
        """Build `model` (on `env.device`) and the data; `fresh` is False when a checkpoint will overwrite the weights."""
        raise NotImplementedError

    def training_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The loss of one (micro-)batch, computed with `model` (the user's model, or its DDP/compiled wrapper)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, batches: Iterable[Any]) -> dict[str, float]:
        """Metrics of `model` over `batches` (this rank's share), reduced over ranks; must hold `best_metric`."""
        raise NotImplementedError

    def eval_batches(self) -> Iterable[Any]:
        """This rank's evaluation batches."""
        raise NotImplementedError

    def adjust_gradients(self, step: int) -> None:
        """Called before optimizer step `step` (after clipping): e.g. DINO drops its last layer's gradients."""

    def after_step(self, step: int) -> None:
        """Called after each optimizer step (e.g. a teacher's EMA, a running centre)."""

    def summary(self, metrics: dict) -> str:
        """One line for people on an evaluation's `metrics` (what `xcit train` and `xcit eval` end with)."""
        return ', '.join(f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}' for k, v in metrics.items())

    def report(self, metrics: dict) -> str:
        """A table for people on `metrics` (the COCO table, per-class IoU), printed above the summary; or ''."""
        return ''

    def describe(self) -> str:
        """One line for the log: what is trained on what."""
        return type(self).__name__

    def state_dict(self) -> dict:
        """Task state a resumed run needs, beyond the model and optimizer (plain values and tensors only)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
