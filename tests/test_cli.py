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
    assert families == {'xcit', 'cvt', 'fcvit', 'maskrcnn', 'semfpn', 'upernet'}


def test_models_pretrained_lists_urls(capsys):
    assert main(['models', 'xcit_tiny_12_p8_384', '--pretrained']) == 0
    out = capsys.readouterr().out
    assert 'xcit_tiny_12_p8_384.fb_dist_in1k' in out and 'xcit_tiny_12_p8_384_dist.pth' in out


def test_models_pretrained_shows_published_top1_and_hub_repo(capsys):
    from xcit.registry import get_pretrained_cfg, list_models
    assert main(['models', 'xcit_small_12_p16_224', 'cvt_13_384', '--pretrained']) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:4] == ['weights', 'input', 'top-1', 'hub']
    rows = {line.split()[0]: line.split() for line in out[1:-1]}
    assert set(rows) == set(list_models(['xcit_small_12_p16_224', 'cvt_13_384'], pretrained=True))
    for name, row in rows.items():
        cfg = get_pretrained_cfg(name)
        assert 50 < cfg['top1'] < 100 and cfg['top1_source'], name  # a percentage, with the table it comes from
        assert row[2] == f"{cfg['top1']:.2f}" and row[3] == (cfg.get('hf_hub_id') or '-') and row[4] == cfg['url']
    assert rows['xcit_small_12_p16_224.fb_dist_in1k'][3] == 'timm/xcit_small_12_p16_224.fb_dist_in1k'
    # distillation and fine-tuning at 384 were published as gains
    assert float(rows['xcit_small_12_p16_224.fb_in1k'][2]) < float(rows['xcit_small_12_p16_224.fb_dist_in1k'][2])
    assert 'facebookresearch/xcit README' in out[-1] and 'microsoft/CvT README' in out[-1]


def test_every_published_weight_file_has_its_top1(capsys):
    from xcit.registry import get_pretrained_cfg, list_models
    for name in list_models(pretrained=True):
        cfg = get_pretrained_cfg(name)
        if name.split('.')[0].startswith(('xcit_', 'cvt_')):
            assert 50 < cfg.get('top1', 0) < 100 and cfg.get('top1_source'), name


def test_bad_input_is_one_line_and_exit_code_2(capsys):
    assert main(['models', 'nothing_like_this*']) == 2
    assert main(['bench', '--model', 'xcit_gigantic', '--resolutions', '64']) == 2
    assert main(['bench', '--impls', 'pytorch']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith('xcit ') for line in err)
    assert 'xcit_gigantic' in err[1]


@pytest.mark.slow
def test_bench_resolution_sweep_writes_json_and_plot(tmp_path):
    out, plot = tmp_path / 'sweep.json', tmp_path / 'sweep.png'
    proc = run_cli('bench', '--model', 'xcit_nano_12_p16_224', '--resolutions', '64,128', '--iters', '1', '--rounds', '1',
                   '--baseline', 'vit_tiny_patch16_224', '--no-memory', '--json', out, '--plot', plot)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())['results']
    ours = [r for r in results if r['impl'] == 'xcit']
    assert [r['img_size'] for r in ours] == [64, 128] and [r['tokens'] for r in ours] == [16, 64]
    assert ours[1]['gmacs'] > 3 * ours[0]['gmacs']  # 4x the tokens, ~4x the work
    assert {r['model'] for r in results} == {'xcit_nano_12_p16_224', 'vit_tiny_patch16_224'}
    assert all(r['step_time_ms'] > 0 and r['peak_mb'] is None for r in results)  # memory: the compare test's
    assert plot.stat().st_size > 10_000 and 'tokens x' in proc.stdout


@pytest.mark.slow
def test_bench_compare_with_timm_writes_timm_columns(tmp_path):
    out, table = tmp_path / 'compare.json', tmp_path / 'compare.csv'
    proc = run_cli('bench', '-m', 'xcit_nano_12_p16_224', '-b', '2', '--img-size', '64', '--compare', 'timm',
                   '--rounds', '2', '--iters', '1', '--warmup', '1', '--json', out, '--csv', table)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert {(r['impl'], r['mode']) for r in data['results']} == {('xcit', 'infer'), ('xcit', 'train'),
                                                                 ('timm', 'infer'), ('timm', 'train')}
    assert {r['mode'] for r in data['ratios']} == {'infer', 'train'} and all(r['speedup'] > 0 for r in data['ratios'])
    assert data['environment']['torch'] and data['environment']['mac_counter']
    header = table.read_text().splitlines()[0].split(',')
    assert {'infer_samples_per_sec', 'infer_step_time', 'param_count', 'infer_gmacs', 'train_samples_per_sec',
            'infer_peak_mb'} <= set(header)
