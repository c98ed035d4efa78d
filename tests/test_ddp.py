"""Two gloo processes on the CPU: the same model on every rank, and the same model as one process."""
import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from conftest import free_port, tiny_run_config
from xcit.config import load_config

pytestmark = pytest.mark.slow

# BatchNorm keeps its running statistics (eval mode): per-rank batch statistics would legitimately differ
_EXACT = ['train.freeze_bn=True', 'augment.smoothing=0.0', 'schedule.epochs=1', 'optim.eps=1e-6']



def _train_rank(rank, world_size, port, config_path, overrides, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR='127.0.0.1',
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from xcit.tasks import run
    result = run(load_config(config_path, overrides))
    torch.save(result.model.state_dict(), os.path.join(out_dir, f'rank{rank}.pt'))
    torch.save(result.metrics, os.path.join(out_dir, f'metrics{rank}.pt'))


def test_two_ranks_match_each_other_and_one_process(tmp_path):
    config = tiny_run_config(tmp_path)
    mp.spawn(_train_rank, args=(2, free_port(), str(config), _EXACT + ['data.batch_size=16'], str(tmp_path)),
             nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in range(2))
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key  # DDP keeps replicas bit-identical

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from xcit.tasks import run
        single = run(load_config(config, _EXACT + ['data.batch_size=32', 'experiment=single']))
    finally:
        torch.set_num_threads(threads)
    reference = single.model.state_dict()
    worst = max((rank0[k].float() - reference[k].float()).abs().max().item() for k in reference
                if reference[k].is_floating_point())
    assert worst < 1e-4, f'2 x 16 images per step differ from 1 x 32 by up to {worst}'
    metrics = torch.load(tmp_path / 'metrics0.pt', weights_only=True)
    assert metrics['count'] == 359  # evaluation shards count every image exactly once
    assert abs(metrics['top1'] - single.metrics['top1']) < 0.6  # at most two images differ


@pytest.mark.parametrize('name,kwargs', [('xcit_nano_12_p8_224', {'depth': 1}), ('cvt_13_224', {'depths': [1, 1, 1]}),
                                         ('fcvit_tiny', {'depths': [1, 1, 1, 1]})])
def test_gradients_come_out_in_their_parameters_strides(name, kwargs):
    """What DDP's buckets are laid out by: a gradient in other strides is copied, with a warning, every step."""
    import xcit
    model = xcit.create_model(name, num_classes=10, **kwargs).train()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    differ = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.stride() != p.stride()]
    assert differ == []


def test_torchrun_launch_writes_one_run_folder(tmp_path):
    config = tiny_run_config(tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', '-m', 'xcit.cli.main',
         'train', '-c', str(config), '-o', 'schedule.epochs=1', '-o', 'data.batch_size=16'],
        capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'Warning' not in proc.stderr, proc.stderr[-2000:]  # e.g. DDP's "Grad strides do not match bucket view"
    assert proc.stdout.count('final evaluation') == 1
    assert [p.name for p in (tmp_path / 'runs').iterdir()] == ['tiny']
    assert (tmp_path / 'runs' / 'tiny' / 'last.pth').exists()
