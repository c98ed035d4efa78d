import math
import re

import pytest
import torch
import torch.nn as nn

import xcit
from conftest import perturb_


@pytest.fixture(scope='module')
def nano():
    torch.manual_seed(0)
    return perturb_(xcit.create_model('xcit_nano_12_p16_224', num_classes=10)).eval()


@pytest.mark.parametrize('patch', [16, 8])
@pytest.mark.parametrize('hw', [(72, 104), (225, 225), (33, 17), (224, 160)])
def test_any_input_size_runs_without_interpolation(patch, hw):
    model = xcit.create_model(f'xcit_nano_12_p{patch}_224', num_classes=5).eval()
    x = torch.randn(1, 3, *hw)
    with torch.no_grad():
        tokens = model.forward_features(x)
        maps = model.forward_intermediates(x, indices=1, intermediates_only=True)
    grid = [math.ceil(s / patch) for s in hw]  # every stem stage maps L to ceil(L / 2)
    assert tokens.shape == (1, 1 + grid[0] * grid[1], model.embed_dim)
    assert maps[0].shape == (1, model.embed_dim, *grid)
    assert model(x).shape == (1, 5)


def test_training_forward_returns_logits_not_a_tuple(nano):
    nano.train()
    try:
        out = nano(torch.randn(2, 3, 64, 64))
    finally:
        nano.eval()
    assert isinstance(out, torch.Tensor) and out.shape == (2, 10)


def test_forward_head_and_pooling(nano):
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        feats = nano.forward_features(x)
        pre = nano.forward_head(feats, pre_logits=True)
        assert torch.equal(pre, feats[:, 0])
        assert torch.allclose(nano.forward_head(feats), nano.head(pre))
        assert torch.allclose(nano(x), nano.head(pre))
    avg = xcit.create_model('xcit_nano_12_p16_224', num_classes=10, global_pool='avg').eval()
    avg.load_state_dict(nano.state_dict())
    with torch.no_grad():
        assert torch.allclose(avg.forward_head(feats, pre_logits=True), feats[:, 1:].mean(1))
    with pytest.raises(ValueError, match='global_pool'):
        xcit.create_model('xcit_nano_12_p16_224', global_pool='max')


def test_reset_classifier():
    model = xcit.create_model('xcit_nano_12_p16_224')
    model.reset_classifier(3)
    assert model.get_classifier().out_features == 3 and model.num_classes == 3
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    model.reset_classifier(0, global_pool='avg')
    assert isinstance(model.get_classifier(), nn.Identity)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, model.num_features)


def test_no_weight_decay_names_real_parameters(nano):
    names = dict(nano.named_parameters())
    assert nano.no_weight_decay() == {'cls_token'}
    assert all(n in names for n in nano.no_weight_decay())


@pytest.mark.parametrize('coarse', [False, True])
def test_group_matcher_covers_every_parameter(nano, coarse):
    matcher = nano.group_matcher(coarse=coarse)
    patterns = []
    for spec in matcher.values():
        if isinstance(spec, str):
            patterns.append(spec)
        else:
            patterns.extend(p for p, _ in spec)
    unmatched = [n for n, _ in nano.named_parameters() if not any(re.match(p, n) for p in patterns)]
    assert unmatched == ['head.weight', 'head.bias']  # timm puts what no group claims, the classifier, last
    block_ids = {re.match(r'^blocks\.(\d+)', n).group(1) for n, _ in nano.named_parameters() if n.startswith('blocks.')}
    assert len(block_ids) == 12


def test_forward_intermediates(nano):
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        final, maps = nano.forward_intermediates(x)
        assert len(maps) == 12 and maps[0].shape == (2, 128, 4, 5)
        assert torch.allclose(final, nano.forward_features(x), atol=1e-6)
        tokens = nano.forward_intermediates(x, indices=[2, -1], output_fmt='NLC', intermediates_only=True)
        assert [t.shape for t in tokens] == [(2, 20, 128)] * 2
        assert torch.allclose(tokens[0].transpose(1, 2).reshape(2, 128, 4, 5), maps[2])
        assert torch.allclose(tokens[1].transpose(1, 2).reshape(2, 128, 4, 5), maps[11])
        last3 = nano.forward_intermediates(x, indices=3, stop_early=True, intermediates_only=True)
        assert all(torch.allclose(a, b) for a, b in zip(last3, maps[9:]))
        normed = nano.forward_intermediates(x, indices=[0], norm=True, output_fmt='NLC', intermediates_only=True)
        assert torch.allclose(normed[0], nano.norm(maps[0].flatten(2).transpose(1, 2)))
    with pytest.raises(ValueError, match='out of range'):
        nano.forward_intermediates(x, indices=[12])
    with pytest.raises(ValueError, match='output_fmt'):
        nano.forward_intermediates(x, output_fmt='NHWC')


def test_feature_info(nano):
    assert len(nano.feature_info) == 12
    assert all(f == dict(num_chs=128, reduction=16, module=f'blocks.{i}') for i, f in enumerate(nano.feature_info))
    assert nano.num_features == nano.head_hidden_size == 128


def test_drop_path_is_constant_and_only_in_training():
    model = xcit.create_model('xcit_nano_12_p16_224', drop_path_rate=0.3)
    assert [b.drop_path.drop_prob for b in model.blocks] == [0.3] * 12
    assert not any(isinstance(m, xcit.models.layers.DropPath) for m in model.cls_attn_blocks.modules())
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(1)
    with torch.no_grad():
        assert not torch.allclose(model(x), model(x))


def test_batchnorm_is_plain_and_sync_conversion_is_explicit():
    model = xcit.create_model('xcit_nano_12_p8_224')
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == 3 + 12 and all(type(m) is nn.BatchNorm2d for m in bns)
    if torch.cuda.is_available():
        synced = xcit.convert_sync_batchnorm(model)
        assert all(type(m) is nn.SyncBatchNorm for m in synced.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    else:
        with pytest.raises(RuntimeError, match='CUDA'):
            xcit.convert_sync_batchnorm(model)


def test_official_state_dict_names(nano):
    keys = set(nano.state_dict())
    for key in ['pos_embeder.token_projection.weight', 'blocks.0.local_mp.conv1.weight', 'blocks.0.local_mp.bn.running_var',
                'blocks.11.norm3.weight', 'blocks.11.gamma3', 'blocks.0.attn.temperature',
                'cls_attn_blocks.1.attn.qkv.weight', 'patch_embed.proj.6.1.running_mean', 'head.weight', 'cls_token']:
        assert key in keys, key
    assert nano.blocks[0].attn.temperature.shape == (4, 1, 1)


def test_unsupported_patch_size_is_a_clear_error():
    with pytest.raises(ValueError, match='patch sizes 8 and 16'):
        xcit.XCiT(patch_size=4, embed_dim=64, depth=1, num_heads=2)
