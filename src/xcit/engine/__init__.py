"""Training, evaluation and distillation."""
from .trainer import RunResult, TrainingDiverged, evaluate, run

__all__ = ['RunResult', 'TrainingDiverged', 'evaluate', 'run']
