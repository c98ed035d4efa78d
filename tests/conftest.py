import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch


def _share_the_cores_between_workers() -> None:
    """Under pytest-xdist (`make test` runs a worker per core) each worker, and each process it starts, gets its
    share of the cores: two workers of two threads each would fight over two cores."""
    workers = int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1'))
    if workers > 1:
        threads = max(1, len(os.sched_getaffinity(0)) // workers)
        os.environ['OMP_NUM_THREADS'] = str(threads)
        torch.set_num_threads(threads)


_share_the_cores_between_workers()

# golden files written by the reference implementations; a user's clone has none
FIXTURES = Path(os.environ.get('XCIT_FIXTURES', Path(__file__).resolve().parents[2] / 'shared' / 'fixtures'))


@pytest.fixture
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(f'reference fixtures not found at {FIXTURES} (set XCIT_FIXTURES to their folder)')
    return FIXTURES


def perturb_(model: torch.nn.Module, scale: float = 0.02, seed: int = 0) -> torch.nn.Module:
    """Move every parameter and BatchNorm statistic away from its initial value.

    Init values (unit gammas and temperatures, zero means) hide mistakes such as
    a swapped norm or a missing branch; perturbed ones do not.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.dtype.is_floating_point:
                continue
            t.add_(torch.randn(t.shape, generator=g) * scale)
            if name.endswith('running_var'):
                t.abs_().add_(0.5)
    return model


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """Bitwise equal state dicts: same keys, dtypes and values."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


class Payload:
    """Unpickling this creates the marker file: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return Path.touch, (Path(self.marker),)


def run_cli(*args, timeout: int = 300) -> subprocess.CompletedProcess:
    """`xcit ARGS...` in a fresh interpreter, as a user runs it."""
    return subprocess.run([sys.executable, '-m', 'xcit.cli.main', *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def cli(capsys, *argv) -> tuple[int, list[str], list[str]]:
    """`xcit ARGV...` in-process (no interpreter start-up): (exit code, stdout lines, stderr lines)."""
    from xcit.cli.main import main
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out.strip().splitlines(), err.strip().splitlines()


def free_port() -> int:
    """A TCP port on the loopback that nothing listens on now: a rendezvous for the 2-process tests."""
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def tiny_run_config(tmp_path: Path, **overrides) -> Path:
    """A training config that runs in seconds: a 2-block XCiT-nano on 16-pixel digits."""
    import yaml
    config = {
        'experiment': 'tiny', 'output_dir': str(tmp_path / 'runs'),
        'model': {'name': 'xcit_nano_12_p8_224', 'kwargs': {'depth': 2}},
        'data': {'dataset': 'digits', 'digits_size': 16, 'image_size': 16, 'batch_size': 32, 'num_workers': 0},
        'augment': {'scale': [0.6, 1.0], 'hflip': 0.0},
        'optim': {'lr': 2e-3},
        'schedule': {'epochs': 2, 'warmup_epochs': 0.2},
        'train': {'progress': False, 'keep_last': 1},
    }
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split('.')
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    path = tmp_path / 'tiny.yaml'
    path.write_text(yaml.safe_dump(config))
    return path


def sigkill_then_resume(tmp_path: Path, config: Path) -> tuple[dict, dict]:
    """Run `config` to the end ('reference'), run it again ('killed') and SIGKILL it early in its second
    and last epoch, resume that from its last.pth; assert the two end with the same model bit for bit and
    the interrupted epoch logged once. Returns both final checkpoints."""
    reference = run_cli('train', '-c', config, '-o', 'experiment=reference')
    assert reference.returncode == 0, reference.stderr
    cmd = [sys.executable, '-m', 'xcit.cli.main', 'train', '-c', str(config), '-o', 'experiment=killed']
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / 'runs' / 'killed' / 'last.pth'
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if last.exists():
                state = torch.load(last, weights_only=True)
                # early in the second (last) epoch: the end of the epoch (the next unconditional save) is far off
                if state['epoch'] == 1 and 0 < state['batch_in_epoch'] <= 25:
                    proc.send_signal(signal.SIGKILL)
                    break
            time.sleep(0.02)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, 'the run ended before it could be killed mid-epoch'
    interrupted = torch.load(last, weights_only=True)
    assert interrupted['epoch'] == 1 and interrupted['batch_in_epoch'] > 0
    assert interrupted['fast_paths'] and all(d['path'] in d['times_ms'] for d in interrupted['fast_paths'].values())

    resumed = run_cli('train', '-c', config, '--resume', last)
    assert resumed.returncode == 0, resumed.stderr
    expected = torch.load(tmp_path / 'runs' / 'reference' / 'last.pth', weights_only=True)
    actual = torch.load(last, weights_only=True)
    assert expected['model'].keys() == actual['model'].keys()
    for key in expected['model']:
        assert torch.equal(expected['model'][key], actual['model'][key]), key
    rows = [json.loads(line) for line in (last.parent / 'metrics.jsonl').read_text().splitlines()]
    assert [r['epoch'] for r in rows] == [0, 1]  # the interrupted epoch is logged once
    return expected, actual
