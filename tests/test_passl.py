"""PaddlePaddle PASSL weights: golden files written by PASSL, and the layout we write for it."""
import pickle
import pickletools

import numpy as np
import pytest
import torch

import xcit
from conftest import cli, perturb_
from xcit.checkpoints.paddle import _WeightsOnlyUnpickler, read_paddle_pickle


def _logits_error(model, fixtures_dir, name):
    x = torch.from_numpy(np.load(fixtures_dir / f'passl_{name}.input.npy'))
    expected = torch.from_numpy(np.load(fixtures_dir / f'passl_{name}.logits.npy'))
    with torch.no_grad():
        return (model.eval()(x) - expected).abs().max().item()


def _raw_arrays(path):
    with open(path, 'rb') as f:
        return _WeightsOnlyUnpickler(f, encoding='latin1').load()


@pytest.mark.parametrize('name', ['xcit_nano_12_p16_224', 'xcit_nano_12_p8_224'])
def test_passl_pdparams_reproduce_reference_logits(fixtures_dir, name):
    model = xcit.create_model(name, checkpoint_path=fixtures_dir / f'passl_{name}.pdparams')
    assert _logits_error(model, fixtures_dir, name) < 1e-4


def test_distillation_checkpoint_loads_its_student(fixtures_dir):
    model = xcit.create_model('xcit_nano_12_p8_224')
    xcit.load_checkpoint(model, fixtures_dir / 'passl_dist_checkpoint_epoch_3.pd')
    assert _logits_error(model, fixtures_dir, 'xcit_nano_12_p8_224') < 1e-4


@pytest.mark.parametrize('spelling', ['--remove_prefix', '--remove-prefix'])
def test_extract_student_weights_like_passl(fixtures_dir, tmp_path, spelling, capsys):
    out = tmp_path / 's.pdparams'
    code, _, err = cli(capsys, 'extract-weights', fixtures_dir / 'passl_dist_checkpoint_epoch_3.pd', '--prefix',
                       'Student', spelling, '--output', out)
    assert code == 0, err
    arrays = _raw_arrays(out)
    assert all(k.startswith(('backbone.', 'head.fc_cls.')) for k in arrays)  # what PASSL's --load expects
    assert all(isinstance(v, np.ndarray) for v in arrays.values())
    model = xcit.create_model('xcit_nano_12_p8_224', checkpoint_path=out)
    assert _logits_error(model, fixtures_dir, 'xcit_nano_12_p8_224') < 1e-4


def test_extract_to_our_layout_and_bare_backbone(fixtures_dir, tmp_path, capsys):
    src = fixtures_dir / 'passl_dist_checkpoint_epoch_3.pd'
    ours = tmp_path / 'student.pth'
    assert cli(capsys, 'extract-weights', src, '--prefix', 'Student', '--remove_prefix', '--output', ours)[0] == 0
    state = torch.load(ours, weights_only=True)['model']
    assert 'head.weight' in state and 'patch_embed.proj.0.1.running_mean' in state
    assert state['blocks.0.attn.qkv.weight'].shape == (384, 128)  # PyTorch's [out, in]
    bare = tmp_path / 'backbone.pdparams'
    assert cli(capsys, 'extract-weights', src, '--prefix', 'Student.backbone', '--remove_prefix', '--output', bare)[0] == 0
    assert 'cls_token' in _raw_arrays(bare) and not any(k.startswith('head') for k in _raw_arrays(bare))
    features = xcit.create_model('xcit_nano_12_p8_224', num_classes=0, checkpoint_path=bare)
    assert torch.equal(features.cls_token, torch.from_numpy(_raw_arrays(bare)['cls_token']))


def test_extract_with_a_prefix_that_matches_nothing_fails_clearly(fixtures_dir, tmp_path, capsys):
    out = tmp_path / 'none.pdparams'
    code, _, err = cli(capsys, 'extract-weights', fixtures_dir / 'passl_dist_checkpoint_epoch_3.pd', '--prefix',
                       'Stduent', '--remove_prefix', '--output', out)
    assert code == 2 and not out.exists() and len(err) == 1, err
    assert "no entry starts with 'Stduent'" in err[0] and 'Student, Teacher' in err[0]


def test_our_passl_export_has_passls_exact_layout(fixtures_dir, tmp_path):
    """Re-exporting PASSL's own file gives back its keys, shapes, dtypes and values."""
    name = 'xcit_nano_12_p16_224'
    reference = _raw_arrays(fixtures_dir / f'passl_{name}.pdparams')
    reference.pop('StructuredToParameterName@@')
    model = xcit.create_model(name, checkpoint_path=fixtures_dir / f'passl_{name}.pdparams')
    out = tmp_path / 'again.pdparams'
    xcit.checkpoints.save_state_dict(model.state_dict(), out, 'passl')
    exported = _raw_arrays(out)
    assert exported.keys() == reference.keys()
    for key, array in reference.items():
        assert exported[key].dtype == array.dtype and np.array_equal(exported[key], array), key
    assert exported['head.fc_cls.weight'].shape == (128, 1000)  # Paddle's [in, out]
    globals_used = {arg for op, arg, _ in pickletools.genops(out.read_bytes()) if op.name == 'SHORT_BINUNICODE'
                    and arg.startswith('numpy')}
    assert globals_used <= {'numpy', 'numpy._core.multiarray', 'numpy.core.multiarray'}


def test_numpy1_module_paths_are_read(tmp_path):
    """Files written under NumPy 1 name `numpy.core.multiarray`; NumPy 2 renamed it `numpy._core`."""
    data = pickle.dumps({'backbone.w': np.arange(6, dtype=np.float32).reshape(2, 3)}, protocol=2)
    data = data.replace(b'numpy._core.multiarray', b'numpy.core.multiarray')
    path = tmp_path / 'np1.pdparams'
    path.write_bytes(data)
    assert torch.equal(read_paddle_pickle(path)['backbone.w'], torch.arange(6.0).reshape(2, 3))


def test_paddle_tuple_pairs_and_name_table_are_handled(tmp_path):
    arr = np.ones((2, 2), dtype=np.float32)
    path = tmp_path / 'nested.pd'
    with open(path, 'wb') as f:
        pickle.dump({'state_dict': {'a': ('linear_0.w_0', arr), 'StructuredToParameterName@@': {'a': 'linear_0.w_0'}},
                     'epoch': 2}, f, protocol=4)
    obj = read_paddle_pickle(path)
    assert obj['epoch'] == 2 and list(obj['state_dict']) == ['a'] and torch.equal(obj['state_dict']['a'], torch.ones(2, 2))


def test_passl_checkpoint_for_another_model_says_which(fixtures_dir):
    with pytest.raises(xcit.CheckpointError) as err:
        xcit.create_model('xcit_tiny_12_p16_224', checkpoint_path=fixtures_dir / 'passl_xcit_nano_12_p8_224.pdparams')
    message = str(err.value)
    assert 'looks like xcit_nano_12_p8_224 (embed_dim 128, depth 12, 4 heads, patch 8, 1000 classes)' in message
    assert 'you asked for xcit_tiny_12_p16_224 (embed_dim 192' in message


def test_perturbed_model_survives_passl_export(tmp_path):
    torch.manual_seed(0)
    model = perturb_(xcit.create_model('xcit_tiny_12_p8_224')).eval()
    path = tmp_path / 'm.pdparams'
    xcit.checkpoints.save_state_dict(model.state_dict(), path, 'passl')
    again = xcit.create_model('xcit_tiny_12_p8_224', checkpoint_path=path).eval()
    x = torch.randn(1, 3, 48, 40)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


def test_pretrained_passl_tag_downloads_and_converts(fixtures_dir, tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    name = 'xcit_nano_12_p16_224'
    url = (fixtures_dir / f'passl_{name}.pdparams').resolve().as_uri()
    model = xcit.create_model(f'{name}.passl_in1k', pretrained=True, pretrained_cfg_overlay=dict(url=url))
    assert model.pretrained_cfg['tag'] == 'passl_in1k'
    assert _logits_error(model, fixtures_dir, name) < 1e-4


PADDLE_FAMILIES = ['xcit_nano_12_p16_224', 'cvt_13_224', 'fcvit_tiny']


@pytest.mark.parametrize('fmt', ['passl', 'paddle'])
@pytest.mark.parametrize('name', PADDLE_FAMILIES)
def test_paddle_layouts_round_trip_bitwise(name, fmt, tmp_path):
    """xcit convert --to passl / --to paddle and back: every weight and statistic comes back bit for bit
    (PASSL ships no FCViT: its wrapper layout is refused with the alternative)."""
    from xcit.checkpoints import convert_checkpoint, save_state_dict
    torch.manual_seed(0)
    model = perturb_(xcit.create_model(name))
    src = tmp_path / 'src.safetensors'
    save_state_dict(model.state_dict(), src, 'safetensors', model_name=name)
    out = tmp_path / 'w.pdparams'
    if fmt == 'passl' and name.startswith('fcvit'):
        with pytest.raises(ValueError, match='PASSL has no port of fcvit_tiny; --to paddle'):
            convert_checkpoint(src, out, to=fmt)
        assert not out.exists()
        return
    assert convert_checkpoint(src, out, to=fmt) == (name, fmt)  # the model recognised from either layout
    again = xcit.create_model(name, checkpoint_path=out).state_dict()
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            assert torch.equal(again[key], value), key


@pytest.mark.parametrize('name', PADDLE_FAMILIES)
def test_flat_paddle_layout_is_our_module_tree_in_paddles_conventions(name, tmp_path):
    from xcit.checkpoints import save_state_dict
    model = xcit.create_model(name)
    path = tmp_path / 'flat.pdparams'
    save_state_dict(model.state_dict(), path, 'paddle')
    arrays = _raw_arrays(path)
    modules = dict(model.named_modules())
    linears = [n for n, m in modules.items() if isinstance(m, torch.nn.Linear)]
    norms = [n for n, m in modules.items() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert linears and norms
    for n in linears:  # Paddle's Linear weight is [in, out]
        assert arrays[f'{n}.weight'].shape == (modules[n].in_features, modules[n].out_features), n
    for n in norms:
        assert arrays[f'{n}._mean'].shape == arrays[f'{n}._variance'].shape == (modules[n].num_features,), n
    assert not any(k.endswith(('running_mean', 'running_var', 'num_batches_tracked')) or k.startswith('backbone.')
                   for k in arrays)
    expected = {k for k in model.state_dict() if not k.endswith('num_batches_tracked')}
    renamed = {k.replace('._mean', '.running_mean').replace('._variance', '.running_var') for k in arrays}
    assert renamed == expected


def test_passl_cvt_layout_uses_the_names_of_passls_port(tmp_path):
    """PASSL's CvT builds each convolutional projection as Sequential(conv, BatchNorm): `.0.` / `.1.`."""
    from xcit.checkpoints import save_state_dict
    from xcit.models.cvt import passl_state_dict
    model = xcit.create_model('cvt_13_224')
    path = tmp_path / 'cvt.pdparams'
    save_state_dict(model.state_dict(), path, 'passl', passl_fn=passl_state_dict)
    arrays = _raw_arrays(path)
    assert arrays['backbone.stage0.blocks.0.attn.conv_proj_q.0.weight'].shape == (64, 1, 3, 3)
    assert 'backbone.stage2.blocks.0.attn.conv_proj_v.1._variance' in arrays
    assert arrays['head.fc_cls.weight'].shape == (384, 1000)
    assert not any('.conv.' in k or '.bn.' in k for k in arrays)
