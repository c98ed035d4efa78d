"""The training engine: one loop (`fit`) that any `Task` plugs into, and what it is made of."""
from .distributed import DistEnv, distributed_session
from .loop import FitResult, TrainingDiverged, evaluate, evaluate_task, fit, free_run_dir
from .task import Task, TrainData

__all__ = ['DistEnv', 'FitResult', 'Task', 'TrainData', 'TrainingDiverged', 'distributed_session', 'evaluate',
           'evaluate_task', 'fit', 'free_run_dir']
