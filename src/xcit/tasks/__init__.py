"""Tasks the engine trains, by the name a config's `task:` key gives, and `run`, which ties them to a config.

A task is a subclass of `xcit.engine.Task` registered here with `register_task`;
`run` builds it from the config and hands it to `xcit.engine.fit`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..allocator import keep_freed_memory
from ..config import Config, ConfigError
from ..engine import FitResult, Task, distributed_session, evaluate_task, fit, free_run_dir
from .classification import ClassificationTask
from .detection import DetectionTask
from .dino import DinoTask
from .segmentation import SegmentationTask

# name -> builder(config, load, evaluate_only) -> Task
TASKS: dict[str, Callable[..., Task]] = {}


def register_task(name: str, builder: Callable[..., Task]) -> None:
    if name in TASKS:
        raise ValueError(f'task {name!r} is already registered')
    TASKS[name] = builder


register_task('classification', ClassificationTask)
register_task('detection', DetectionTask)
register_task('segmentation', SegmentationTask)
register_task('dino', DinoTask)


def build_task(config: Config, load: str | Path | None = None, evaluate_only: bool = False) -> Task:
    if config.task not in TASKS:
        raise ConfigError(f"task: unknown task {config.task!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[config.task](config, load=load, evaluate_only=evaluate_only)


def run(config: Config, resume: str | Path | None = None, load: str | Path | None = None,
        evaluate_only: bool = False) -> FitResult:
    """Train (or only evaluate) as `config` says; `torchrun` processes share the work. The process keeps
    the memory its steps free (`xcit.allocator`), so that steps after the first do not page-fault."""
    keep_freed_memory()
    task = build_task(config, load, evaluate_only)  # bad data paths fail here, before any process group
    with distributed_session(config.train.device) as env:
        if evaluate_only:
            return evaluate_task(task, env, config.seed, config.train.amp)
        run_dir = None
        if env.is_primary and resume is None:
            run_dir = free_run_dir(config.output_dir, config.experiment)
        return fit(task, env, config.train, config.optim, config.schedule, config.seed, run_dir,
                   record=config.to_dict(), resume=resume)


__all__ = ['ClassificationTask', 'DetectionTask', 'DinoTask', 'SegmentationTask', 'TASKS', 'build_task', 'register_task', 'run']
