"""The engine knows no task: a toy regression task written here trains, checkpoints, resumes bit-exactly
and evaluates through `xcit.engine.fit` unchanged."""
import json
import random

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from xcit.config import OptimConfig, ScheduleConfig, TrainConfig
from xcit.engine import DistEnv, Task, fit
from xcit.seeding import rng_scope


class ShuffledBatches:
    """Fixed (x, y) pairs, reshuffled every epoch, resumable mid-epoch."""

    def __init__(self, x, y, batch_size):
        self.x, self.y, self.batch_size = x, y, batch_size
        self.order, self.start = torch.arange(len(x)), 0

    def set_epoch(self, epoch, start_batch=0):
        self.order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(epoch))
        self.start = start_batch

    def __len__(self):
        return len(self.x) // self.batch_size

    def __iter__(self):
        for i in range(self.start, len(self)):
            index = self.order[i * self.batch_size:(i + 1) * self.batch_size]
            yield self.x[index], self.y[index]


class Regression(Task):
    """y = x . w + noise, fitted by a small MLP with dropout (so steps draw random numbers)."""
    best_metric = 'mse'

    def __init__(self, fail_at_step=None):
        self.fail_at_step = fail_at_step

    def setup(self, env, fresh):
        self.model = nn.Sequential(nn.Linear(4, 16), nn.GELU(), nn.Dropout(0.2), nn.Linear(16, 1))
        g = torch.Generator().manual_seed(0)
        x = torch.randn(96, 4, generator=g)
        y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.05 * torch.randn(96, 1, generator=g)
        self.train_data = ShuffledBatches(x[:64], y[:64], batch_size=8)
        self.val = [(x[64:80], y[64:80]), (x[80:], y[80:])]
        self.steps = 0

    def training_loss(self, model, batch):
        self.steps += 1
        if self.steps == self.fail_at_step:
            raise KeyboardInterrupt  # the process dies mid-epoch
        x, y = batch
        return F.mse_loss(model(x), y)

    def eval_batches(self):
        return self.val

    def evaluate(self, model, batches):
        errors = torch.cat([(model(x) - y).pow(2).flatten() for x, y in batches])
        return dict(mse=errors.mean().item())


def _fit(tmp_path, task, resume=None, **train):
    return fit(task, DistEnv(), TrainConfig(progress=False, keep_last=1, **train), OptimConfig(lr=1e-2),
               ScheduleConfig(epochs=3, warmup_epochs=0.5), seed=0, run_dir=tmp_path / 'toy',
               record={'task': 'regression'}, resume=resume)


def test_a_toy_task_trains_checkpoints_and_evaluates(tmp_path):
    result = _fit(tmp_path, Regression())
    rows = [json.loads(line) for line in (tmp_path / 'toy' / 'metrics.jsonl').read_text().splitlines()]
    assert [r['epoch'] for r in rows] == [0, 1, 2]
    assert rows[-1]['eval_mse'] < rows[0]['eval_mse'] and result.metrics['mse'] == rows[-1]['eval_mse']
    best = torch.load(tmp_path / 'toy' / 'best.pth', weights_only=True)
    assert best['best'] == dict(metric='mse', value=min(r['eval_mse'] for r in rows))  # lower is better here
    assert 'eval_mse' in (tmp_path / 'toy' / 'summary.csv').read_text().splitlines()[0]


def test_a_toy_task_resumes_bit_exactly_from_mid_epoch(tmp_path):
    reference = _fit(tmp_path / 'reference', Regression(), checkpoint_interval=3).model.state_dict()
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path / 'killed', Regression(fail_at_step=13), checkpoint_interval=3)  # in epoch 2 (8 steps each)
    last = tmp_path / 'killed' / 'toy' / 'last.pth'
    state = torch.load(last, weights_only=True)
    assert (state['epoch'], state['batch_in_epoch']) == (1, 4)  # saved after step 12
    resumed = _fit(tmp_path / 'unused', Regression(), resume=last, checkpoint_interval=3).model.state_dict()
    for key in reference:
        assert torch.equal(reference[key], resumed[key]), key
    assert not (tmp_path / 'unused').exists()  # a resumed run writes into its checkpoint's folder


def test_a_non_finite_loss_stops_the_run(tmp_path):
    class Diverging(Regression):
        def training_loss(self, model, batch):
            return super().training_loss(model, batch) * float('nan')

    from xcit.engine import TrainingDiverged
    with pytest.raises(TrainingDiverged, match='the loss is nan at epoch 1, step 0'):
        _fit(tmp_path, Diverging())


def test_training_leaves_the_global_generators_alone(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    _fit(tmp_path, Regression())
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def test_an_rng_scope_is_a_function_of_its_seed_alone():
    with rng_scope(7):
        first = (random.random(), np.random.rand(), torch.rand(2))
    torch.rand(5), random.random()  # whatever happens in between
    with rng_scope(7):
        again = (random.random(), np.random.rand(), torch.rand(2))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])
