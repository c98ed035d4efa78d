"""`xcit bench --task dense`: the three backbones with their FPN, the records, the command and its bad inputs.

Nothing here depends on how fast anything runs."""
import json

import pytest
import torch

from xcit import bench_dense
from xcit.cli.main import main

FIELDS = {'model', 'img_size', 'input_size', 'pixels', 'tokens', 'step_time_ms', 'step_time_spread_ms', 'peak_mb',
          'param_count_m', 'levels', 'batch_size', 'device'}


@pytest.mark.parametrize('name', bench_dense.DEFAULT_MODELS)
def test_each_pyramid_is_five_256_channel_levels_at_strides_4_to_64(name):
    torch.manual_seed(0)
    model = bench_dense.build_pyramid(name)
    with torch.inference_mode():
        levels = model(bench_dense.padded_image(128))
    assert list(levels) == ['0', '1', '2', '3', 'pool']
    assert [tuple(f.shape) for f in levels.values()] == [(1, 256, 128 // s, 128 // s) for s in (4, 8, 16, 32, 64)]
    assert all(torch.isfinite(f).all() for f in levels.values())


def test_xcit_pyramid_is_the_registered_detectors_backbone():
    from xcit import create_model
    torch.manual_seed(0)
    detector = create_model('maskrcnn_xcit_small_12_p16')
    torch.manual_seed(0)
    pyramid = bench_dense.build_pyramid('xcit_small_12_p16')
    assert type(pyramid) is type(detector.backbone)
    assert pyramid.state_dict().keys() == detector.backbone.state_dict().keys()


def test_images_are_padded_to_the_coarsest_stride_and_the_same_for_every_model():
    image = bench_dense.padded_image(100)
    assert image.shape == (1, 3, 128, 128) and not image[..., 100:, :].any() and not image[..., :, 100:].any()
    assert torch.equal(image, bench_dense.padded_image(100))


def test_command_writes_one_record_per_model_and_size_and_the_plot(tmp_path, capsys):
    out, plot = tmp_path / 'dense.json', tmp_path / 'dense.png'
    assert main(['bench', '--task', 'dense', '--resolutions', '64,100', '--iters', '1', '--no-memory',
                 '--json', str(out), '--plot', str(plot)]) == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data['environment']['torch'] and data['environment']['processor'] and data['environment']['torch_threads']
    results = data['results']
    assert [(r['model'], r['img_size']) for r in results] == [(m, s) for s in (64, 100) for m in bench_dense.DEFAULT_MODELS]
    for r in results:
        assert set(r) == FIELDS and r['step_time_ms'] > 0 and r['param_count_m'] > 20 and r['batch_size'] == 1
        assert list(r['levels']) == ['0', '1', '2', '3', 'pool'] and all(c == 256 for c, _, _ in r['levels'].values())
        assert (r['tokens'] is not None) == r['model'].startswith('xcit')
    xcit = [r for r in results if r['model'] == 'xcit_small_12_p16']
    assert [(r['input_size'], r['pixels'], r['tokens']) for r in xcit] == [(64, 64 ** 2, 16), (128, 128 ** 2, 64)]
    assert plot.stat().st_size > 10_000
    assert 'swin_t' in printed and 'ms' in printed and 'MB' in printed


@pytest.mark.slow
def test_peak_memory_is_measured_in_a_fresh_process():
    [result] = bench_dense.dense_sweep(['resnet50'], [64], iters=1)
    assert result.peak_mb is not None and result.peak_mb > 0


@pytest.mark.parametrize('argv, needle', [
    (['--model', 'resnet51'], 'resnet51'),
    (['--model', 'xcit_small_12_p16,swin_b'], 'swin_b'),
    (['--resolutions', '0'], '0'),
    (['--resolutions=-512'], '-512'),
    (['--resolutions', '512,5000'], '5000'),
    (['--resolutions', '512,big'], 'big'),
    (['--iters', '0'], '--iters'),
])
def test_bad_input_is_one_error_line_and_exit_code_2(capsys, argv, needle):
    assert main(['bench', '--task', 'dense', *argv]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('xcit bench: error:') and needle in err[0], err
    assert 'Traceback' not in captured.err and not captured.out  # refused before anything is built or timed
