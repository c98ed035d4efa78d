"""End-to-end training runs on the built-in digits data: outputs, exact resume, failures that stop cleanly."""
import hashlib
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import cli, run_cli, sigkill_then_resume, tiny_run_config
from xcit.config import load_config
from xcit.data.datasets import DigitsSource
from xcit.tasks import run

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('finished')
    config = tiny_run_config(tmp)
    return config, run(load_config(config))


def test_a_run_writes_its_folder_and_learns(finished):
    _, result = finished
    names = {p.name for p in result.run_dir.iterdir()}
    assert {'config.yaml', 'last.pth', 'best.pth', 'epoch_0002.pth', 'summary.csv', 'metrics.jsonl',
            'curves.png'} <= names
    assert 'epoch_0001.pth' not in names  # keep_last: 1
    rows = [json.loads(line) for line in (result.run_dir / 'metrics.jsonl').read_text().splitlines()]
    assert [r['epoch'] for r in rows] == [0, 1]
    assert rows[1]['train_loss'] < rows[0]['train_loss']
    assert result.metrics['top1'] > 60 and result.metrics['count'] == 359  # chance is 10 %
    header = (result.run_dir / 'summary.csv').read_text().splitlines()[0]
    assert header.startswith('epoch,lr,train_loss,eval_loss,eval_top1')
    state = torch.load(result.run_dir / 'last.pth', weights_only=True)
    assert {'model', 'optimizer', 'epoch', 'step', 'config', 'best', 'task'} <= set(state)
    assert state['best'] == dict(metric='top1', value=max(r['eval_top1'] for r in rows))
    assert state['epoch'] == 2 and state['batch_in_epoch'] == 0
    assert state['task']['classes'] == [str(i) for i in range(10)]


def test_eval_reports_the_top1_of_the_end_of_training(finished):
    config, result = finished
    proc = run_cli('eval', '-c', config, '--load', result.run_dir / 'last.pth')
    assert proc.returncode == 0, proc.stderr
    assert f"top-1 {result.metrics['top1']:.2f}%" in proc.stdout


def test_predict_names_the_class(finished, tmp_path):
    _, result = finished
    digits = DigitsSource('val', size=16)
    image = tmp_path / 'digit.png'
    digits.load(0).save(image)
    state = torch.load(result.run_dir / 'last.pth', weights_only=True)
    state['task']['classes'] = [f'digit-{i}' for i in range(10)]  # names the run's data would have given
    named = tmp_path / 'named.pth'
    torch.save(state, named)
    proc = run_cli('predict', '--model', 'xcit_nano_12_p8_224', '--checkpoint', named, image, '--topk', '3')
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    assert line.startswith(f'{image}: ') and len(line.split(', ')) == 3
    assert all(part.startswith('digit-') for part in line.split(': ', 1)[1].split(', '))  # labelled by name
    assert run_cli('predict', '--model', 'xcit_nano_12_p8_224', '--checkpoint', result.run_dir / 'last.pth',
                   tmp_path / 'missing.png').returncode == 2


def test_resume_after_sigkill_is_bit_exact(tmp_path, monkeypatch):
    # the reference run and the killed one take the same fast paths (the resumed one takes the checkpoint's)
    monkeypatch.setenv('XCIT_FAST_PATH_CACHE', str(tmp_path / 'fast_paths.json'))
    config = tiny_run_config(tmp_path, **{'schedule.epochs': 2, 'train.checkpoint_interval': 5})
    sigkill_then_resume(tmp_path, config)


def _copy_of_last(finished, tmp_path):
    """The finished run's last.pth in a folder of its own, for a resume to write into."""
    _, result = finished
    last = tmp_path / 'run' / 'last.pth'
    last.parent.mkdir()
    last.write_bytes((result.run_dir / 'last.pth').read_bytes())
    return last


def test_a_checkpoint_with_malformed_fast_paths_is_refused_in_one_line(finished, tmp_path):
    config, _ = finished
    state = torch.load(_copy_of_last(finished, tmp_path), weights_only=True)
    state['fast_paths'] = {'xca train cpu float32 B2': {'path': 'fastest', 'times_ms': {'reference': 1.0}}}
    bad = tmp_path / 'run' / 'bad.pth'
    torch.save(state, bad)
    proc = run_cli('train', '-c', config, '--resume', bad, '-o', 'schedule.epochs=3')
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    line, = proc.stderr.strip().splitlines()
    assert 'fast_paths' in line and "'fastest' is not among its candidates" in line


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(finished, tmp_path):
    config, _ = finished
    last = _copy_of_last(finished, tmp_path)
    digest = hashlib.sha256(last.read_bytes()).hexdigest()
    proc = run_cli('train', '-c', config, '--resume', last, '-o', 'schedule.epochs=3', '-o', 'optim.lr=1e30',
                   '-o', 'schedule.warmup_epochs=0')
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert 'the loss is nan' in lines[-1] and 'epoch 3' in lines[-1] and f'{last}, is intact' in lines[-1]
    assert 'Traceback' not in proc.stderr
    assert hashlib.sha256(last.read_bytes()).hexdigest() == digest


def _digit_folder(root, per_class=24):
    source = DigitsSource('train', size=16)
    counts = {}
    for i, target in enumerate(source.targets):
        if target > 2 or counts.get(target, 0) >= per_class:
            continue
        counts[target] = counts.get(target, 0) + 1
        folder = root / f'class_{target}'
        folder.mkdir(parents=True, exist_ok=True)
        source.load(i).save(folder / f'{i}.png')
    return root


def test_corrupt_images_are_skipped_and_reported_or_fatal(tmp_path):
    data = _digit_folder(tmp_path / 'data' / 'train')
    val = _digit_folder(tmp_path / 'data' / 'val', per_class=8)
    broken = [data / 'class_1' / 'broken.png', data / 'class_2' / 'empty.png', val / 'class_0' / 'broken.png']
    broken[0].write_bytes(b'\x89PNG\r\n\x1a\n' + os.urandom(64))
    broken[1].write_bytes(b'')
    broken[2].write_bytes(b'not an image')
    # 74 training files in batches of 2: every file is drawn every epoch, and each bad one counted once an epoch
    config = tiny_run_config(tmp_path, **{'data.dataset': 'imagefolder', 'data.root': str(tmp_path / 'data'),
                                          'data.batch_size': 2, 'schedule.epochs': 2})
    proc = run_cli('train', '-c', config)
    assert proc.returncode == 0, proc.stderr
    assert 'skipped 3 unreadable images' in proc.stderr
    run_dir = tmp_path / 'runs' / 'tiny'
    rows = [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]
    assert [r['skipped_images'] for r in rows] == [3, 3]
    assert (run_dir / 'unreadable.txt').read_text().splitlines() == sorted(map(str, broken))
    strict = run_cli('train', '-c', config, '-o', 'data.on_corrupt=error', '-o', 'experiment=strict')
    last_line = strict.stderr.strip().splitlines()[-1]
    assert strict.returncode == 1 and any(p.name in last_line for p in broken[:2])


def test_bad_configs_fail_before_training(tmp_path, capsys):
    config = tiny_run_config(tmp_path)
    code, _, err = cli(capsys, 'train', '-c', config, '-o', 'optim.weight_decy=0.1')
    assert code == 2 and len(err) == 1 and "did you mean 'optim.weight_decay'" in err[0]
    code, _, err = cli(capsys, 'train', '-c', config, '-o', 'schedule.epochs=many')
    assert code == 2 and len(err) == 1 and "'schedule.epochs'" in err[0]
    code, _, err = cli(capsys, 'train', '-c', config, '-o', 'data.dataset=imagefolder',
                       '-o', f'data.root={tmp_path}/nowhere')
    assert code == 2 and len(err) == 1 and f'{tmp_path}/nowhere/train' in err[0]
    assert not (tmp_path / 'runs').exists()  # nothing started


def test_every_switch_of_the_official_recipe_runs(tmp_path):
    overrides = ['train.ema=True', 'train.ema_decay=0.9', 'train.amp=bf16', 'train.channels_last=True',
                 'optim.accum_steps=2', 'optim.clip_grad=1.0', 'optim.scale_lr=True', 'augment.mixup=0.8',
                 'augment.cutmix=1.0', 'augment.repeated_aug=3', 'model.drop_path_rate=0.1',
                 'augment.auto_augment=rand-m9-mstd0.5-inc1', 'augment.reprob=0.25', 'optim.no_decay=passl']
    result = run(load_config(tiny_run_config(tmp_path), overrides))
    last = result.history[-1]
    assert last['ema_top1'] is not None and last['train_loss'] < result.history[0]['train_loss']
    assert result.metrics['top1'] > 20  # learning, despite heavy augmentation on two epochs


def test_torch_compile_switch(tmp_path, monkeypatch):
    """The switch sends the loss through torch.compile of the trained model (inductor's own numbers are
    test_fast_paths' concern; here aot_eager traces the same graphs without inductor's minute of C++ builds)."""
    compiled = []

    def compile_without_inductor(model):
        compiled.append(model)
        return torch.compile(model, backend='aot_eager', dynamic=False)

    monkeypatch.setattr('xcit.engine.loop.compile_static', compile_without_inductor)
    result = run(load_config(tiny_run_config(tmp_path), ['train.compile=True', 'schedule.epochs=1']))
    assert compiled == [result.model]
    assert result.metrics['top1'] > 30
    saved = torch.load(result.run_dir / 'last.pth', weights_only=True)['model']
    assert not any(k.startswith('_orig_mod') for k in saved)  # checkpoints hold the plain model


def test_tensorboard_without_the_package_is_a_clear_error(tmp_path, capsys):
    try:
        import torch.utils.tensorboard  # noqa: F401
        pytest.skip('tensorboard is installed')
    except ImportError:
        pass
    code, _, err = cli(capsys, 'train', '-c', tiny_run_config(tmp_path), '-o', 'train.tensorboard=True')
    assert code == 2 and len(err) == 1 and 'pip install tensorboard' in err[0], err


@pytest.mark.parametrize('name,kwargs', [('cvt_13_224', {'depths': [1, 1, 1]}),
                                         # a quarter of fcvit_tiny's widths: its 11x11 convolutions took 40 s
                                         ('fcvit_tiny', {'depths': [1, 1, 1, 1], 'embed_dims': [16, 32, 64, 64]})])
def test_cvt_and_fcvit_train_through_the_same_toolkit(tmp_path, name, kwargs):
    config = tiny_run_config(tmp_path, **{'model.name': name, 'model.kwargs': kwargs, 'data.digits_size': 32,
                                          'data.image_size': 32})
    result = run(load_config(config))
    assert result.history[-1]['train_loss'] < result.history[0]['train_loss']
    assert result.metrics['top1'] > 30  # chance is 10 %
