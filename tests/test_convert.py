"""Round trips between every layout, and the convert command's handling of bad files."""
from pathlib import Path

import pytest
import torch

import xcit
from conftest import Payload, assert_same_weights, cli, perturb_, run_cli
from xcit.checkpoints.convert import convert_checkpoint, format_for_path, save_state_dict
from xcit.models.xcit import timm_state_dict

NAME = 'xcit_nano_12_p8_224'


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    return perturb_(xcit.create_model(NAME)).eval()


@pytest.mark.parametrize('fmt,filename', [('passl', 'w.pdparams'), ('timm', 'w.pth'), ('timm', 'w.safetensors'),
                                          ('official', 'w.pth'), ('safetensors', 'w.safetensors')])
def test_round_trip_is_exact(tmp_path, model, fmt, filename):
    path = tmp_path / filename
    save_state_dict(model.state_dict(), path, fmt, model_name=NAME, timm_fn=timm_state_dict)
    again = xcit.create_model(NAME, checkpoint_path=path)
    assert_same_weights(model, again)


def test_safetensors_metadata(tmp_path, model):
    from safetensors import safe_open
    path = tmp_path / 'w.safetensors'
    save_state_dict(model.state_dict(), path, 'safetensors', model_name=NAME)
    with safe_open(str(path), 'pt') as f:
        meta = f.metadata()
    assert meta['model'] == NAME and meta['format'] == 'xcit' and meta['format_version'] == '1'
    assert meta['layout'] == 'xcit'


def test_timm_loads_our_timm_export(tmp_path, model):
    timm = pytest.importorskip('timm')
    path = tmp_path / 'for_timm.pth'
    convert_checkpoint(_official_file(tmp_path, model), path, to='timm')
    reference = timm.create_model(NAME, checkpoint_path=str(path)).eval()
    st = tmp_path / 'for_timm.safetensors'
    convert_checkpoint(path, st, to='timm')
    from safetensors.torch import load_file
    reference_st = timm.create_model(NAME).eval()
    reference_st.load_state_dict(load_file(str(st)))
    x = torch.randn(2, 3, 64, 56)
    with torch.no_grad():
        expected = model(x)
        assert (reference(x) - expected).abs().max() < 1e-5
        assert (reference_st(x) - expected).abs().max() < 1e-5


def _official_file(tmp_path, model) -> Path:
    path = tmp_path / 'official.pth'
    torch.save({'model': model.state_dict()}, path)
    return path


def test_convert_recognises_the_model_and_chains_formats(tmp_path, model):
    src = _official_file(tmp_path, model)
    chain = [tmp_path / 'a.pdparams', tmp_path / 'b.safetensors', tmp_path / 'c.pth']
    previous = src
    for dst in chain:
        name, _ = convert_checkpoint(previous, dst)
        assert name == NAME
        previous = dst
    assert_same_weights(model, xcit.create_model(NAME, checkpoint_path=chain[-1]))


def test_convert_keeps_a_fine_tuned_class_count(tmp_path):
    tuned = xcit.create_model(NAME, num_classes=10)
    src = tmp_path / 'tuned.pth'
    torch.save(tuned.state_dict(), src)
    convert_checkpoint(src, tmp_path / 'tuned.pdparams')
    assert xcit.create_model(NAME, num_classes=10, checkpoint_path=tmp_path / 'tuned.pdparams').head.out_features == 10


def test_convert_refuses_weights_that_do_not_fit_the_named_model(tmp_path, model):
    with pytest.raises(xcit.CheckpointError, match='looks like xcit_nano_12_p8_224'):
        convert_checkpoint(_official_file(tmp_path, model), tmp_path / 'x.pdparams', model_name='xcit_small_12_p8_224')
    assert not (tmp_path / 'x.pdparams').exists()
    unknown = tmp_path / 'resnet.pth'
    torch.save({'conv1.weight': torch.zeros(8, 3, 7, 7)}, unknown)
    with pytest.raises(xcit.CheckpointError, match='cannot tell which model'):
        convert_checkpoint(unknown, tmp_path / 'y.pdparams')


def test_output_format_from_the_extension():
    assert format_for_path('a.pdparams') == 'passl' and format_for_path('a.pd') == 'passl'
    assert format_for_path('a.safetensors') == 'safetensors' and format_for_path('a.pth') == 'official'
    assert format_for_path('a.pth', 'timm') == 'timm'
    with pytest.raises(ValueError, match='--to'):
        format_for_path('weights.xyz')
    with pytest.raises(ValueError, match='.pdparams'):
        format_for_path('a.pth', 'passl')


def test_cli_reports_bad_files_in_one_line(tmp_path, model, capsys):
    good = _official_file(tmp_path, model)
    data = good.read_bytes()
    cases = {
        'empty.pth': b'',
        'truncated.pth': data[: len(data) // 3],
        'truncated.pdparams': b'\x80\x04\x95' + b'\x00' * 40,
        'picture.pth': b'\x89PNG\r\n\x1a\n' + b'\x00' * 100,
    }
    for filename, content in cases.items():
        src = tmp_path / filename
        src.write_bytes(content)
        code, _, err = cli(capsys, 'convert', src, tmp_path / 'out.pdparams')
        assert code == 2 and len(err) == 1 and str(src) in err[0], (filename, err)
    assert not (tmp_path / 'out.pdparams').exists()


@pytest.mark.parametrize('filename', ['evil.pth', 'evil.pdparams'])
def test_cli_refuses_checkpoints_that_run_code(tmp_path, filename):
    import pickle
    marker = tmp_path / 'pwned'
    src = tmp_path / filename
    if filename.endswith('.pth'):
        torch.save({'model': {'w': torch.ones(1)}, 'hook': Payload(marker)}, src)
    else:
        src.write_bytes(pickle.dumps({'backbone.w': Payload(marker)}, protocol=4))
    proc = run_cli('convert', src, tmp_path / 'out.safetensors')
    assert proc.returncode == 2 and 'refused' in proc.stderr and 'Traceback' not in proc.stderr
    assert not marker.exists()


def test_the_payload_really_runs_when_unpickled_unsafely(tmp_path):
    """Guards the two tests above: their payload is live, so 'no marker' means 'not executed'."""
    import pickle
    marker = tmp_path / 'pwned'
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()
