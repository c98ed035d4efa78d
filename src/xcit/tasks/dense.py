"""What the dense tasks share: their datasets (images of any size, as lists), a registered dense model built
on the process's device, and the loaders; `DetectionTask` and `SegmentationTask` add their loss and metric."""
from __future__ import annotations

from ..config import Config
from ..data.dense import build_dense_loaders, build_dense_source, train_transforms
from ..engine.distributed import DistEnv
from ..engine.task import Task
from ..factory import create_model


class DenseTask(Task):
    higher_is_better = True
    name: str  # the `task:` it is registered as, stored in its checkpoints for `xcit predict`

    def __init__(self, config: Config, load: str | None = None, evaluate_only: bool = False):
        """`load`: weights to start from (or to evaluate), over `model.checkpoint`."""
        self.config = config
        self.weights = load or config.model.checkpoint
        self.evaluate_only = evaluate_only
        # everything that can be wrong with the data fails here, before any model is built
        self.train_set = None if evaluate_only else build_dense_source(config, 'train', train_transforms(config))
        self.val_set = build_dense_source(config, 'val')
        self.classes = list(self.val_set.classes)  # index 0 is the background
        self.num_classes = config.model.num_classes or len(self.classes)

    def setup(self, env: DistEnv, fresh: bool) -> None:
        m = self.config.model
        self.model = create_model(m.name, checkpoint_path=self.weights if fresh else None,
                                  num_classes=self.num_classes, drop_path_rate=m.drop_path_rate,
                                  **m.kwargs).to(env.device)
        self.env = env
        self.train_data, self.val_loader = build_dense_loaders(self.config, self.train_set, self.val_set,
                                                               env.rank, env.world_size)

    def eval_batches(self):
        return self.val_loader

    def describe(self) -> str:
        sizes = f'{len(self.train_set)} train / ' if self.train_set is not None else ''
        return f'{self.config.model.name}, {self.num_classes} classes, {sizes}{len(self.val_set)} val images'

    def state_dict(self) -> dict:
        return dict(classes=self.classes, architecture=self.config.model.name, task=self.name)
