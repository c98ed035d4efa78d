"""PASSL's RegNet teacher weights in timm's RegNet: the golden file PASSL wrote, the full RegNetY-160 key
set, the bias folding, and what a file that does not fit says."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import cli, run_cli
from xcit.checkpoints import CheckpointError, extract_state_dict, load_into, read_state_dict
from xcit.checkpoints.paddle import write_paddle_pickle
from xcit.checkpoints.regnet import guess_regnet, passl_regnet_to_timm, regnet_stages, timm_regnet_name
from xcit.config import DistillConfig
from xcit.tasks.distill import build_teacher

timm = pytest.importorskip('timm')


def passl_regnet_arrays(widths, depths, groups, num_classes=10, stem=32, se=True, seed=0):
    """A state dict as PASSL's RegNet + ClasHead saves it (Paddle layout: Linear weights [in, out],
    BatchNorm `_mean` / `_variance`, every conv with a bias), random values."""
    rng = np.random.default_rng(seed)
    arrays = {}

    def conv_bn(name, c_out, c_in, k):
        arrays[f'backbone.{name}._conv.weight'] = rng.normal(0, 0.2, (c_out, c_in, k, k))
        arrays[f'backbone.{name}._conv.bias'] = rng.normal(0, 0.2, c_out)
        arrays[f'backbone.{name}._batch_norm.weight'] = rng.uniform(0.5, 1.5, c_out)
        arrays[f'backbone.{name}._batch_norm.bias'] = rng.normal(0, 0.2, c_out)
        arrays[f'backbone.{name}._batch_norm._mean'] = rng.normal(0, 0.2, c_out)
        arrays[f'backbone.{name}._batch_norm._variance'] = rng.uniform(0.5, 1.5, c_out)

    conv_bn('conv', stem, 3, 3)
    c_in = stem
    for s, (w, d, g) in enumerate(zip(widths, depths, groups), start=1):
        for b in range(1, d + 1):
            name = f's{s}_b{b}'
            conv_bn(f'{name}.conv0', w, c_in, 1)
            conv_bn(f'{name}.conv1', w, g, 3)
            if se:
                w_se = int(round(c_in * 0.25))
                arrays[f'backbone.{name}.se_block.squeeze.weight'] = rng.normal(0, 0.2, (w, w_se))
                arrays[f'backbone.{name}.se_block.squeeze.bias'] = rng.normal(0, 0.2, w_se)
                arrays[f'backbone.{name}.se_block.excitation.weight'] = rng.normal(0, 0.2, (w_se, w))
                arrays[f'backbone.{name}.se_block.excitation.bias'] = rng.normal(0, 0.2, w)
            conv_bn(f'{name}.conv2', w, w, 1)
            if b == 1:
                conv_bn(f'{name}.short', w, c_in, 1)
            c_in = w
    arrays['head.fc_cls.weight'] = rng.normal(0, 0.2, (c_in, num_classes))
    arrays['head.fc_cls.bias'] = rng.normal(0, 0.2, num_classes)
    return {k: v.astype(np.float32) for k, v in arrays.items()}


def _as_torch(arrays):
    return extract_state_dict({k: torch.from_numpy(v) for k, v in arrays.items()})


def test_design_space_gives_passls_teacher_stages():
    # PASSL's XCiT distillation teacher, RegNetY-16GF: timm's regnety_160
    assert regnet_stages(106.23, 200, 2.48, 18, 112) == ((224, 448, 1232, 3024), (2, 4, 11, 1), (112,) * 4)
    assert timm_regnet_name(*regnet_stages(106.23, 200, 2.48, 18, 112), se=True) == 'regnety_160'
    assert regnet_stages(36.44, 24, 2.49, 13, 8) == ((24, 56, 152, 368), (1, 1, 4, 7), (8,) * 4)
    assert timm_regnet_name(*regnet_stages(36.44, 24, 2.49, 13, 8), se=True) == 'regnety_002'
    assert timm_regnet_name(*regnet_stages(36.44, 24, 2.49, 13, 8), se=False) == 'regnetx_002'


def test_regnety_160_key_set_maps_onto_timms_without_a_missing_or_unexpected_key():
    widths, depths, groups = regnet_stages(106.23, 200, 2.48, 18, 112)
    with torch.device('meta'):
        expected = timm.create_model('regnety_160').state_dict()
    arrays = passl_regnet_arrays(widths, depths, groups, num_classes=1000)
    for layout in (arrays,  # backbone. / head.fc_cls. prefixes
                   {'Teacher.' + k: v for k, v in arrays.items()},  # inside a distillation checkpoint
                   {k.removeprefix('backbone.').removeprefix('head.'): v for k, v in arrays.items()}):  # bare
        mapped = passl_regnet_to_timm(extract_state_dict({k: torch.from_numpy(v) for k, v in layout.items()},
                                                         part='Teacher'))
        assert set(mapped) == set(expected)
        assert all(mapped[k].shape == expected[k].shape for k in expected)
    assert guess_regnet(_as_torch(arrays)).architecture == 'regnety_160'


def test_conv_bias_folds_exactly_into_the_batchnorm_mean():
    """PASSL's ConvBNLayer, conv (with bias) then BatchNorm in eval mode, against the timm conv it becomes."""
    arrays = passl_regnet_arrays([8], [1], [8], num_classes=3)
    state = _as_torch(arrays)
    mapped = passl_regnet_to_timm(state)
    x = torch.randn(2, 3, 16, 16)
    conv = lambda t, w, b=None: F.conv2d(t, w, b, stride=2, padding=1)  # noqa: E731
    bn = lambda t, p: F.batch_norm(t, p['running_mean'], p['running_var'], p['weight'], p['bias'],  # noqa: E731
                                   training=False, eps=1e-5)
    passl_bn = {e: state[f'conv._batch_norm.{e}'] for e in ('running_mean', 'running_var', 'weight', 'bias')}
    timm_bn = {e: mapped[f'stem.bn.{e}'] for e in ('running_mean', 'running_var', 'weight', 'bias')}
    expected = bn(conv(x, state['conv._conv.weight'], state['conv._conv.bias']), passl_bn)
    folded = bn(conv(x, mapped['stem.conv.weight']), timm_bn)
    assert torch.allclose(folded, expected, atol=1e-5)
    assert not torch.allclose(bn(conv(x, mapped['stem.conv.weight']), passl_bn), expected, atol=1e-3)


def test_passl_regnet_file_is_a_distillation_teacher(tmp_path):
    """A small PASSL RegNet file, as the teacher_weights of a distillation run: loads into timm's RegNet
    without a missing key, and its SE Linear weights arrive transposed as timm's 1x1 convs."""
    widths, depths, groups = regnet_stages(36.44, 24, 2.49, 13, 8)
    arrays = passl_regnet_arrays(widths, depths, groups, num_classes=10)
    path = tmp_path / 'regnety_small.pdparams'
    write_paddle_pickle(arrays, path)
    teacher = build_teacher(DistillConfig(teacher='regnety_002', teacher_weights=str(path)), num_classes=10)
    squeeze = arrays['backbone.s2_b1.se_block.squeeze.weight']  # Paddle [in, out]
    assert torch.equal(teacher.s2.b1.se.fc1.weight[:, :, 0, 0], torch.from_numpy(squeeze).t())
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        assert teacher(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_fixture_converts_for_timm_and_reproduces_passls_logits(fixtures_dir, tmp_path):
    out = tmp_path / 'regnety_002.safetensors'
    done = run_cli('convert', fixtures_dir / 'passl_regnety_small.pdparams', out, '--to', 'timm',
                   '--model', 'regnety_002')
    assert done.returncode == 0, done.stderr
    from safetensors.torch import load_file
    model = timm.create_model('regnety_002').eval()
    model.load_state_dict(load_file(out))  # timm's own loader, strict: the file is in timm's layout
    x = torch.from_numpy(np.load(fixtures_dir / 'passl_regnety_small.input.npy'))
    expected = torch.from_numpy(np.load(fixtures_dir / 'passl_regnety_small.logits.npy'))
    with torch.no_grad():
        assert (model(x) - expected).abs().max() < 1e-4


def test_a_teacher_file_of_another_size_says_which_it_looks_like(tmp_path, capsys):
    widths, depths, groups = regnet_stages(36.44, 24, 2.49, 13, 8)
    path = tmp_path / 'small.pdparams'
    write_paddle_pickle(passl_regnet_arrays(widths, depths, groups, num_classes=1000), path)
    code, _, err = cli(capsys, 'convert', path, tmp_path / 'out.safetensors', '--to', 'timm', '--model', 'regnety_160')
    assert code == 2 and len(err) == 1, err
    assert 'looks like regnety_002' in err[0] and 'regnety_160' in err[0]
    assert not (tmp_path / 'out.safetensors').exists()


def test_an_unknown_entry_in_a_passl_regnet_file_is_named(tmp_path):
    arrays = passl_regnet_arrays([8], [1], [8], num_classes=3)
    arrays['backbone.s1_b1.extra._conv.weight'] = np.zeros((1,), np.float32)
    state, label = read_state_dict(_write(tmp_path, arrays))
    model = timm.create_model('regnety_002', num_classes=3)
    with pytest.raises(CheckpointError, match=r's1_b1\.extra'):
        load_into(model, state, source=label)


def _write(tmp_path, arrays):
    path = tmp_path / 'w.pdparams'
    write_paddle_pickle(arrays, path)
    return path
