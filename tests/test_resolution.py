"""Other resolutions: the 384 fine-tuning overlays, and `xcit eval --image-sizes` on the digits demo."""
import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

import xcit
from conftest import cli
from xcit.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / 'configs'
DIGITS = CONFIGS / 'demo' / 'digits_xcit.yaml'
# every shipped ImageNet config at 224, with the overlay of its family
CONFIGS_224 = ([(p, CONFIGS / 'xcit' / 'recipes' / 'finetune_384.yaml') for p in sorted(CONFIGS.glob('xcit/*_224*.yaml'))]
               + [(p, CONFIGS / 'cvt' / 'recipes' / 'finetune_384.yaml') for p in sorted(CONFIGS.glob('cvt/*_224.yaml'))])
# a 2-block digits model keeps the end-to-end runs to seconds
SMALL = ['-o', 'model.kwargs={"depth": 2}', '-o', 'train.progress=False']


def test_every_224_config_is_covered():
    assert len(CONFIGS_224) == 30, [p.name for p, _ in CONFIGS_224]


@pytest.mark.parametrize('config,overlay', CONFIGS_224, ids=[p.stem for p, _ in CONFIGS_224])
def test_finetune_overlay_applies_to_every_224_config(config, overlay):
    base = load_config([config])
    tuned = load_config([config, overlay])
    assert tuned.model.name == base.model.name and base.data.image_size in (None, 224)
    assert tuned.model.pretrained  # starts from the variant's published 224 weights unless --load says otherwise
    assert tuned.data.image_size == 384 and tuned.data.crop_pct == 1.0
    assert tuned.optim.lr < base.optim.lr / 10 and tuned.optim.weight_decay < 1e-6
    assert tuned.schedule.warmup_epochs == 0 and tuned.schedule.epochs < base.schedule.epochs / 5
    # what the overlay leaves alone is the variant's recipe
    assert tuned.augment == base.augment and tuned.distill == base.distill


def _random_digits_weights(path: Path, seed: int) -> dict:
    torch.manual_seed(seed)
    model = xcit.create_model('xcit_nano_12_p8_224', num_classes=10, depth=2)
    torch.save({'model': model.state_dict()}, path)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_digits_model_finetunes_at_a_larger_size(tmp_path, capsys):
    """The demo's 32-pixel model fine-tuned at 48 pixels from a file of weights, with the XCiT overlay."""
    start = _random_digits_weights(tmp_path / 'start.pth', seed=123)
    code, out, err = cli(capsys, 'train', '-c', DIGITS, '-c', CONFIGS / 'xcit' / 'recipes' / 'finetune_384.yaml',
                         *SMALL, '-o', 'model.pretrained=False', '-o', 'data.image_size=48', '-o', 'schedule.epochs=1',
                         '-o', f'output_dir={tmp_path / "runs"}', '-o', 'experiment=ft', '--load', tmp_path / 'start.pth')
    assert code == 0, err
    run = tmp_path / 'runs' / 'ft'
    assert yaml.safe_load((run / 'config.yaml').read_text())['data']['image_size'] == 48
    row = json.loads((run / 'metrics.jsonl').read_text().splitlines()[-1])
    assert 0 < row['lr'] <= 5e-6 and row['eval_count'] > 0
    tuned = torch.load(run / 'last.pth', weights_only=True)['model']
    # parameters only: the stem's BatchNorm statistics follow the new data at any lr
    moved = max((tuned[k] - start[k]).abs().max().item() for k in start if start[k].is_floating_point()
                and 'running_' not in k)
    # trained, and from the file: a fresh initialisation would differ by the init's own scale (~0.02)
    assert 0 < moved < 2e-3


def test_eval_image_sizes_writes_one_row_per_size(tmp_path, capsys):
    _random_digits_weights(tmp_path / 'a.pth', seed=1)
    _random_digits_weights(tmp_path / 'b.pth', seed=2)
    out_dir = tmp_path / 'sweep'
    code, out, err = cli(capsys, 'eval', '-c', DIGITS, *SMALL, '--load', tmp_path / 'a.pth', '--image-sizes', '16,32,48',
                         '--compare-load', tmp_path / 'b.pth', '--out', out_dir)
    assert code == 0, err
    rows = json.loads((out_dir / 'resolution.json').read_text())
    labels = ('xcit_nano_12_p8_224 (a.pth)', 'xcit_nano_12_p8_224 (b.pth)')
    assert [(r['model'], r['image_size']) for r in rows] == [(m, s) for m in labels for s in (16, 32, 48)]
    for r in rows:
        assert 0 <= r['top5'] <= 100 and 0 <= r['top1'] <= r['top5'] and r['count'] == 359 and r['images_per_s'] > 0
    with open(out_dir / 'resolution.csv') as f:
        assert [(r['model'], int(r['image_size'])) for r in csv.DictReader(f)] == [(r['model'], r['image_size']) for r in rows]
    assert (out_dir / 'resolution.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    printed = [line for line in out if line.startswith(labels)]
    assert len(printed) == 6 and f"{rows[0]['top1']:.2f}" in printed[0]


def test_eval_image_sizes_match_a_plain_eval_at_that_size(tmp_path, capsys):
    """The sweep's transform at a size is the one `xcit eval -o data.image_size=SIZE` uses."""
    _random_digits_weights(tmp_path / 'a.pth', seed=1)
    code, out, err = cli(capsys, 'eval', '-c', DIGITS, *SMALL, '--load', tmp_path / 'a.pth', '--image-sizes', '24',
                         '--out', tmp_path)
    assert code == 0, err
    swept = json.loads((tmp_path / 'resolution.json').read_text())[0]
    code, out, err = cli(capsys, 'eval', '-c', DIGITS, *SMALL, '-o', 'data.image_size=24', '--load', tmp_path / 'a.pth')
    assert code == 0, err
    assert f"top-1 {swept['top1']:.2f}%" in out[-1]

