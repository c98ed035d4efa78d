import json

import pytest

from conftest import run_cli
from xcit.cli.main import main


def test_models_table(capsys):
    assert main(['models', 'xcit_nano*']) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ['model', 'family', 'params']
    rows = {line.split()[0]: line.split() for line in out[1:]}
    assert set(rows) == {'xcit_nano_12_p16_224', 'xcit_nano_12_p16_384', 'xcit_nano_12_p8_224', 'xcit_nano_12_p8_384'}
    assert rows['xcit_nano_12_p8_224'][1:4] == ['xcit', '3.05', '224']


def test_models_table_lists_every_family(capsys):
    assert main(['models']) == 0
    families = {line.split()[1] for line in capsys.readouterr().out.splitlines()[1:]}
    assert families == {'xcit', 'cvt', 'fcvit'}


def test_models_pretrained_lists_urls(capsys):
    assert main(['models', 'xcit_tiny_12_p8_384', '--pretrained']) == 0
    out = capsys.readouterr().out
    assert 'xcit_tiny_12_p8_384.fb_dist_in1k' in out and 'xcit_tiny_12_p8_384_dist.pth' in out


def test_bad_input_is_one_line_and_exit_code_2(capsys):
    assert main(['models', 'nothing_like_this*']) == 2
    assert main(['bench', '--model', 'xcit_gigantic', '--resolutions', '64']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith('xcit ') for line in err)
    assert 'xcit_gigantic' in err[1]


@pytest.mark.slow
def test_bench_sweep_writes_json(tmp_path):
    out = tmp_path / 'sweep.json'
    proc = run_cli('bench', '--model', 'xcit_nano_12_p16_224', '--resolutions', '64,128', '--iters', '1', '--json', out)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    points = result['points']
    assert [p['resolution'] for p in points] == [64, 128]
    assert [p['tokens'] for p in points] == [16, 64]
    assert points[1]['gmacs'] > 3 * points[0]['gmacs']  # 4x the tokens, ~4x the work
    assert all(p['ms_per_batch'] > 0 and p['peak_mb'] >= 0 for p in points)
    assert result['environment']['torch']
    assert 'tokens x' in proc.stdout
