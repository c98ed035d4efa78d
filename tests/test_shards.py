"""WebDataset shards: `xcit data pack`, the stream's split across ranks and workers, corrupt records, and training
from shards, on one process, on two ranks and on two torchrun nodes."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import cli, free_port, tiny_run_config
from xcit.config import load_config
from xcit.data.datasets import SampleSource
from xcit.data.shards import ShardStream, pack_split, shard_set

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, 'src')


class NumberedImages(SampleSource):
    """`count` 2x2 grey images whose pixel value is their index: a batch tells which samples it holds."""

    def __init__(self, count: int):
        self.targets = [i % 10 for i in range(count)]
        self.classes = [str(i) for i in range(10)]

    def load(self, index):
        return Image.fromarray(np.full((2, 2, 3), index, dtype=np.uint8))


def _indices(batch) -> list[int]:
    return (batch.images[:, 0, 0, 0] * 255).round().long().tolist()


def _to_tensor(image):
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)


def test_pack_writes_counted_shards_and_refuses_to_overwrite(tmp_path):
    entry, unreadable = pack_split(NumberedImages(25), tmp_path, 'train', shard_size=10)
    assert entry == dict(filenames=['train-000000.tar', 'train-000001.tar', 'train-000002.tar'],
                         shard_lengths=[10, 10, 5], num_samples=25) and unreadable == []
    info = json.loads((tmp_path / 'info.json').read_text())
    assert info['classes'] == [str(i) for i in range(10)] and info['splits']['train'] == entry
    shards = shard_set(tmp_path, 'train-{000000..000001}.tar')  # a brace pattern: counts from info.json
    assert len(shards) == 20 and shards.urls == [str(tmp_path / f'train-00000{i}.tar') for i in range(2)]
    stream = ShardStream(shard_set(tmp_path, 'train'), _to_tensor, batch_size=10, training=False)
    batches = list(stream)
    assert [i for b in batches for i in _indices(b)] == list(range(25))  # evaluation: written order, all once
    assert [t for b in batches for t in b.targets.tolist()] == [i % 10 for i in range(25)]
    with pytest.raises(ValueError, match='train-000000.tar exists'):
        pack_split(NumberedImages(5), tmp_path, 'train', shard_size=10)
    other = NumberedImages(5)
    other.classes = ['cat', 'dog']
    with pytest.raises(ValueError, match='other classes'):
        pack_split(other, tmp_path, 'val', shard_size=10)
    assert not list(tmp_path.glob('val-*'))


def test_two_ranks_read_disjoint_shards_covering_the_set_each_epoch(tmp_path):
    pack_split(NumberedImages(96), tmp_path, 'train', shard_size=12)  # 8 shards, 4 per rank
    shards = shard_set(tmp_path, 'train')
    streams = [ShardStream(shards, _to_tensor, batch_size=8, training=True, rank=r, world_size=2, seed=3,
                           shuffle_buffer=20) for r in range(2)]
    assert all(len(s.shards) == 96 and s.batches == 6 for s in streams)
    orders = []
    for epoch in range(2):
        seen = []
        for stream in streams:
            stream.set_epoch(epoch)
            batches = list(stream)
            assert len(batches) == 6 and all(len(b.targets) == 8 for b in batches)
            seen.append([i for b in batches for i in _indices(b)])
        assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == list(range(96))
        assert sorted(streams[0].rank_shards(epoch) + streams[1].rank_shards(epoch)) == sorted(shards.urls)
        orders.append(seen[0])
    assert orders[0] != orders[1]  # shards and samples reshuffled per epoch

    # a resumed epoch: the batches after the resume point, the same samples augmented the same way
    stream = ShardStream(shards, lambda image: _to_tensor(image) + torch.rand(1), batch_size=8, training=True,
                         rank=1, world_size=2, seed=3, shuffle_buffer=20)
    stream.set_epoch(1)
    whole = [b.images for b in stream]
    stream.set_epoch(1, start_batch=4)
    resumed = [b.images for b in stream]
    assert len(resumed) == 2 and all(torch.equal(a, b) for a, b in zip(resumed, whole[4:]))


def test_loader_workers_do_not_change_the_batches(tmp_path):
    from xcit.data.shards import StreamLoader
    pack_split(NumberedImages(60), tmp_path, 'train', shard_size=10)
    stream = ShardStream(shard_set(tmp_path, 'train'), _to_tensor, batch_size=6, training=True, seed=1,
                         shuffle_buffer=15)
    stream.set_epoch(2)
    alone = [_indices(b) for b in stream]
    loader = StreamLoader(stream, num_workers=2)
    loader.set_epoch(2)
    assert len(loader) == 10 and [_indices(b) for b in loader] == alone


def _digit_folder(root, count=39, corrupt='7/broken.jpg'):
    """An image folder of `count` digits (16 px PNGs) and one file that is no image."""
    from xcit.data.datasets import DigitsSource
    digits = DigitsSource('val', size=16)
    for i in range(count):
        path = root / str(digits.targets[i]) / f'{i:03d}.png'
        path.parent.mkdir(parents=True, exist_ok=True)
        digits.load(i).save(path)
    (root / corrupt).parent.mkdir(parents=True, exist_ok=True)
    (root / corrupt).write_bytes(b'\xff\xd8\xff\xe0 not a JPEG after all')
    return root


@pytest.mark.slow
def test_a_corrupt_record_is_skipped_counted_and_reported(tmp_path, capsys):
    from xcit.data.datasets import image_folder
    folder = _digit_folder(tmp_path / 'train')
    shards = tmp_path / 'shards'
    for split in ('train', 'val'):
        code, out, err = cli(capsys, 'data', 'pack', folder, shards, '--shard-size', '16', '--split', split)
        assert code == 0 and err == [] and out[0].startswith(f'{split}: 40 samples in 3 shards'), (out, err)
    # 40 records, 5 batches of 8: the training epoch reads every record, the corrupt one too
    config = tiny_run_config(tmp_path, **{'data.dataset': 'webdataset', 'data.root': str(shards),
                                          'data.batch_size': 8, 'schedule.epochs': 1})
    from xcit.tasks import run
    result = run(load_config(config))
    assert result.metrics['count'] == 39 and result.metrics['skipped'] == 1
    assert result.history[0]['skipped_images'] == 2  # the record of the training shards and its copy in val's
    index = image_folder(folder).paths.index(str(folder / '7' / 'broken.jpg'))
    assert (result.run_dir / 'unreadable.txt').read_text().splitlines() == [
        f'{shards}/{split}-{index // 16:06d}.tar:{index:08d}' for split in ('train', 'val')]


def _train_overrides(tmp_path, dataset: list[str]) -> list[str]:
    return [f'output_dir={tmp_path / "runs"}', 'data.digits_size=16', 'data.image_size=16', 'model.kwargs.depth=2',
            'schedule.epochs=4', 'train.progress=False', *dataset]


@pytest.mark.slow
def test_the_digits_demo_trains_from_packed_shards_as_from_the_built_in_set(tmp_path, capsys):
    """The same run apart from the source: the stream's order differs (shards and a shuffle buffer against a
    permutation of indices), so the accuracies are compared, to within a point (3.6 images of 359)."""
    shards = tmp_path / 'shards'
    code, out, err = cli(capsys, 'data', 'pack', 'digits', shards, '--shard-size', '300', '--digits-size', '16')
    assert code == 0 and out[0].startswith('train: 1438 samples in 5 shards') and err == [], (out, err)
    from xcit.tasks import run
    demo = os.path.join(ROOT, 'configs', 'demo', 'digits_xcit.yaml')
    built_in = run(load_config(demo, _train_overrides(tmp_path, ['experiment=built_in'])))
    packed = run(load_config(demo, _train_overrides(tmp_path, ['experiment=packed', 'data.dataset=webdataset',
                                                               f'data.root={shards}'])))
    assert packed.metrics['count'] == built_in.metrics['count'] == 359
    assert len(packed.history) == 4 and packed.history[-1]['lr'] == pytest.approx(built_in.history[-1]['lr'])
    assert built_in.metrics['top1'] > 90
    assert abs(packed.metrics['top1'] - built_in.metrics['top1']) <= 1.0, (packed.metrics, built_in.metrics)



NODE_SCRIPT = '''
import os, sys
import torch
from xcit.config import load_config
from xcit.tasks import run
result = run(load_config(sys.argv[1]))
torch.save(result.model.state_dict(), os.path.join(sys.argv[2], 'node%s.pt' % os.environ['GROUP_RANK']))
'''


@pytest.mark.slow
def test_two_torchrun_nodes_train_alike_from_shards(tmp_path, capsys):
    """Two agents meet at a c10d rendezvous on the loopback, one gloo process each, as two machines would."""
    shards = tmp_path / 'shards'
    assert cli(capsys, 'data', 'pack', 'digits', shards, '--shard-size', '200', '--digits-size', '16')[0] == 0
    config = tiny_run_config(tmp_path, **{'data.dataset': 'webdataset', 'data.root': str(shards),
                                          'schedule.epochs': 1, 'data.batch_size': 16})
    script = tmp_path / 'node.py'
    script.write_text(NODE_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=os.pathsep.join([SRC, os.environ.get('PYTHONPATH', '')]))
    endpoint = f'127.0.0.1:{free_port()}'
    agents = [subprocess.Popen(
        [sys.executable, '-m', 'torch.distributed.run', '--nnodes', '2', '--nproc-per-node', '1',
         '--rdzv-backend', 'c10d', '--rdzv-endpoint', endpoint, '--rdzv-id', 'two-nodes', str(script), str(config),
         str(tmp_path)], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)]
    logs = [agent.communicate(timeout=300)[0] for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], logs
    nodes = [torch.load(tmp_path / f'node{n}.pt', weights_only=True) for n in range(2)]
    for key in nodes[0]:
        assert torch.equal(nodes[0][key], nodes[1][key]), key
    runs = sorted(p.name for p in (tmp_path / 'runs').iterdir())
    assert runs == ['tiny']  # one run folder: only the first process writes
    checkpoint = torch.load(tmp_path / 'runs' / 'tiny' / 'last.pth', weights_only=True)
    for key in nodes[0]:
        assert torch.equal(checkpoint['model'][key], nodes[0][key]), key
    rows = (tmp_path / 'runs' / 'tiny' / 'metrics.jsonl').read_text().splitlines()
    assert len(rows) == 1 and json.loads(rows[0])['eval_count'] == 359


def test_the_slurm_script_starts_one_agent_per_node_at_the_first_nodes_rendezvous(tmp_path):
    """scontrol and srun stand-ins: the script must hand torchrun the job's node count, its first node and
    its id, and `xcit train` the arguments it was given."""
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    (bin_dir / 'scontrol').write_text('#!/bin/sh\nprintf "gpu-017\\ngpu-018\\ngpu-019\\n"\n')
    (bin_dir / 'srun').write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$ARGS_OUT"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = dict(os.environ, PATH=f'{bin_dir}{os.pathsep}{os.environ["PATH"]}', ARGS_OUT=str(tmp_path / 'args'),
               SLURM_JOB_NODELIST='gpu-[017-019]', SLURM_JOB_NUM_NODES='3', SLURM_GPUS_ON_NODE='4',
               SLURM_JOB_ID='4242')
    proc = subprocess.run(['bash', os.path.join(ROOT, 'scripts', 'slurm_train.sh'), '-c', 'my config.yaml',
                           '-o', 'data.root=/data/shards'], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    args = (tmp_path / 'args').read_text().splitlines()
    launch = args[args.index('torchrun') + 1:]
    assert launch == ['--nnodes', '3', '--nproc-per-node', '4', '--rdzv-backend', 'c10d',
                      '--rdzv-endpoint', 'gpu-017:29500', '--rdzv-id', '4242', '-m', 'xcit.cli.main', 'train',
                      '-c', 'my config.yaml', '-o', 'data.root=/data/shards']


@pytest.mark.slow
def test_a_run_from_shards_stopped_mid_epoch_resumes_bit_exactly(tmp_path, capsys, monkeypatch):
    """Stopped just after its mid-epoch checkpoint in the second epoch, resumed from it: the same final
    weights as the run that was never stopped."""
    from xcit.engine import loop
    from xcit.tasks import run
    shards = tmp_path / 'shards'
    assert cli(capsys, 'data', 'pack', 'digits', shards, '--shard-size', '300', '--digits-size', '16')[0] == 0
    config = tiny_run_config(tmp_path, **{'data.dataset': 'webdataset', 'data.root': str(shards),
                                          'data.shuffle_buffer': 200, 'train.checkpoint_interval': 5})
    reference = run(load_config(config, ['experiment=reference']))
    assert reference.history[-1]['epoch'] == 1

    stop_after = 50  # 44 steps an epoch: the checkpoint at step 50 is 6 batches into the second epoch
    step = loop._Trainer.optimizer_step

    def stopping_step(self):
        if self.step == stop_after:
            raise KeyboardInterrupt
        return step(self)
    monkeypatch.setattr(loop._Trainer, 'optimizer_step', stopping_step)
    with pytest.raises(KeyboardInterrupt):
        run(load_config(config, ['experiment=stopped']))
    monkeypatch.setattr(loop._Trainer, 'optimizer_step', step)
    last = tmp_path / 'runs' / 'stopped' / 'last.pth'
    state = torch.load(last, weights_only=True)
    assert (state['epoch'], state['step'], state['batch_in_epoch']) == (1, 50, 6)

    resumed = run(load_config(config), resume=last)
    expected = reference.model.state_dict()
    for key, value in resumed.model.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_a_shard_cut_short_or_not_a_tar_is_reported_with_what_it_lacks(tmp_path):
    pack_split(NumberedImages(25), tmp_path, 'val', shard_size=10)
    cut = tmp_path / 'val-000001.tar'
    cut.write_bytes(cut.read_bytes()[:cut.stat().st_size * 2 // 5])
    (tmp_path / 'val-000002.tar').write_bytes(b'no tar file at all' * 100)
    batches = list(ShardStream(shard_set(tmp_path, 'val'), _to_tensor, batch_size=10, training=False))
    seen = [i for b in batches if len(b.targets) for i in _indices(b)]
    assert seen[:10] == list(range(10)) and 0 < len(seen) - 10 < 10 and set(seen[10:]) < set(range(10, 20))
    reports = [name for b in batches for name in b.unreadable]
    assert reports == [f'{cut}:{10 - (len(seen) - 10)} of 10 samples missing (cut short?)',
                       f"{tmp_path / 'val-000002.tar'}:5 of 5 samples missing (ReadError: invalid header)"]


def test_shards_of_other_tools_with_json_labels_and_webp_images(tmp_path):
    """timm's and webdataset's other conventions: a `json` label entry, WebP and JPEG images, any key."""
    import io
    import webdataset as wds

    def encoded(value, kind):
        buffer = io.BytesIO()
        Image.fromarray(np.full((4, 4, 3), value, dtype=np.uint8)).save(buffer, format=kind)
        return buffer.getvalue()
    with wds.TarWriter(str(tmp_path / 'part-a.tar')) as tar:
        tar.write({'__key__': 'img_one', 'webp': encoded(40, 'WEBP'), 'json': b'{"label": 2, "caption": "x"}'})
        tar.write({'__key__': 'img_two', 'jpeg': encoded(200, 'JPEG'), 'json': b'{"cls": 1}'})
        tar.write({'__key__': 'img_three', 'png': encoded(7, 'PNG')})  # no label: unreadable
    (tmp_path / 'info.json').write_text(json.dumps({
        'classes': ['a', 'b', 'c'], 'splits': {'all': {'filenames': ['part-a.tar'], 'shard_lengths': [3]}}}))
    shards = shard_set(tmp_path, 'part-{a..a}.tar')
    assert shards.classes == ['a', 'b', 'c'] and len(shards) == 3
    (batch,) = ShardStream(shards, _to_tensor, batch_size=4, training=False)
    assert batch.targets.tolist() == [2, 1]
    assert [round(v) for v in (batch.images[:, 0, 0, 0] * 255).tolist()] == pytest.approx([40, 200], abs=3)
    assert batch.unreadable == [f"{tmp_path / 'part-a.tar'}:img_three"]
