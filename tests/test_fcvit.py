"""FCViT: the official golden checkpoint, timm training checkpoints, the model API and the registry."""
import argparse
import re

import numpy as np
import pytest
import torch
import torch.nn as nn

import xcit
from conftest import assert_same_weights, perturb_
from xcit.checkpoints import CheckpointError
from xcit.models import FCViT, FCViTFeatures
from xcit.models.fcvit import GlobalContext
from xcit.registry import guess_architecture

NAMES = ['fcvit_tiny', 'fcvit_b12', 'fcvit_b24', 'fcvit_b48']
# the reference model definition's exact counts (the README's "M" are units of 2**20)
PARAMS = {'fcvit_tiny': 4_784_752, 'fcvit_b12': 14_701_832, 'fcvit_b24': 26_960_232, 'fcvit_b48': 51_477_032}
README_M = {'fcvit_tiny': 4.6, 'fcvit_b12': 14.0, 'fcvit_b24': 25.7, 'fcvit_b48': 49.1}


@pytest.fixture(scope='module')
def tiny():
    torch.manual_seed(0)
    return perturb_(xcit.create_model('fcvit_tiny', num_classes=10)).eval()


# --- numerical parity ------------------------------------------------------------------------------

def test_official_checkpoint_reproduces_reference_logits(fixtures_dir):
    name = 'official_fcvit_tiny'
    model = xcit.create_model('fcvit_tiny', checkpoint_path=fixtures_dir / f'{name}.pth').eval()
    x = torch.from_numpy(np.load(fixtures_dir / f'{name}.input.npy'))
    expected = torch.from_numpy(np.load(fixtures_dir / f'{name}.logits.npy'))
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == expected.shape == (2, 1000)
    assert (logits - expected).abs().max() < 1e-4
    # the comparison can fail: a fresh model is far off
    fresh = xcit.create_model('fcvit_tiny').eval()
    with torch.no_grad():
        assert (fresh(x) - expected).abs().max() > 1e-2


def test_timm_training_checkpoint_loads(tmp_path, tiny):
    """What timm's CheckpointSaver writes: weights under state_dict (and an EMA copy), argparse args beside them."""
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in tiny.state_dict().items()}
    saved = {'epoch': 3, 'arch': 'fcvit_tiny', 'state_dict': tiny.state_dict(), 'state_dict_ema': ema,
             'optimizer': {}, 'args': argparse.Namespace(model='fcvit_tiny', drop_path=0.1)}
    path = tmp_path / 'fcvit_tiny.pth.tar'
    torch.save(saved, path)
    model = xcit.create_model('fcvit_tiny', num_classes=10, checkpoint_path=path)
    assert_same_weights(model, tiny)
    xcit.load_checkpoint(model, path, use_ema=True)
    assert torch.equal(model.norm.weight, tiny.norm.weight + 1)


# --- architecture --------------------------------------------------------------------------------

@pytest.mark.parametrize('name', NAMES)
def test_parameter_counts(name):
    with torch.device('meta'):
        model = xcit.create_model(name)
    count = sum(p.numel() for p in model.parameters())
    assert count == PARAMS[name]
    assert round(count / 2 ** 20, 1) == README_M[name]


def test_official_key_layout():
    with torch.device('meta'):
        keys = list(xcit.create_model('fcvit_b12').state_dict())
    assert len(keys) == 464  # 12 blocks x 36 + stem 7 + 3 downsamplers x 7 + norm 2 + head 2
    block = 'network.4.5.'
    expected = {'patch_embed.proj.weight', 'patch_embed.norm.running_var', 'network.5.proj.bias',
                'network.5.norm.num_batches_tracked', 'norm.weight', 'head.bias',
                f'{block}layer_scale_1', f'{block}layer_scale_2', f'{block}norm1.weight', f'{block}norm2.bias',
                f'{block}channel_mixer.fc1.weight', f'{block}channel_mixer.dwconv.bias',
                f'{block}channel_mixer.fc2.bias'}
    for i in (1, 2):
        expected |= {f'{block}token_mixer.gc{i}.rescale_weight', f'{block}token_mixer.gc{i}.rescale_bias',
                     f'{block}token_mixer.gc{i}.fc1.weight', f'{block}token_mixer.gc{i}.fc2.bias',
                     f'{block}token_mixer.dw{i}.weight', f'{block}token_mixer.fc{i}.0.weight',
                     f'{block}token_mixer.fc{i}.2.bias'}
    assert expected <= set(keys)
    assert not any('spatial_att' in k or 'channel_att' in k for k in keys)  # disabled in every released model


def test_released_settings():
    with torch.device('meta'):
        model = xcit.create_model('fcvit_b24', drop_path_rate=0.1)
    assert model.patch_embed.proj.padding == (3, 3)  # CvT's stem uses 2
    assert isinstance(model.patch_embed.norm, nn.BatchNorm2d) and isinstance(model.network[1].norm, nn.BatchNorm2d)
    block = model.network[4][0]
    assert isinstance(block.norm1, nn.GroupNorm) and block.norm1.num_groups == 1 and block.norm1.eps == 1e-5
    assert isinstance(model.norm, nn.GroupNorm) and model.norm.num_groups == 1
    mixer = block.token_mixer
    assert mixer.dw1.kernel_size == mixer.dw2.kernel_size == (11, 11) and mixer.dw1.groups == 320
    assert mixer.fc1[0].out_channels == 40  # max(C // 8, 16)
    assert mixer.gc1.num_heads == 8 and mixer.gc1.fc1.out_features == 80 and mixer.gc1.fc2.in_features == 40
    assert block.channel_mixer.fc1.out_channels == 4 * 320
    # one linear drop-path ramp over all 24 blocks
    rates = [b.drop_path.drop_prob for i in (0, 2, 4, 6) for b in model.network[i]]
    assert rates == pytest.approx([0.1 * i / 23 for i in range(24)])


def test_global_context_on_a_small_map():
    """At 224 px the standardisation spans ~25k values and a biased std would pass the fixture; here it cannot."""
    torch.manual_seed(0)
    gc = perturb_(GlobalContext(16, num_heads=8, reduction=8), scale=0.3)
    x = torch.randn(2, 16, 2, 3)
    expected = torch.empty_like(x)
    with torch.no_grad():
        for b in range(2):
            tokens = x[b].reshape(8, 2, 6)  # head, channel within the head, position
            mean = tokens.mean(-1, keepdim=True)
            sim = (tokens * mean).sum(1) / 2 ** 0.5  # (8, 6), no softmax
            sim = (sim - sim.mean()) / (sim.std(correction=1) + 1e-5)  # jointly over heads and positions
            sim = sim * gc.rescale_weight[:, None] + gc.rescale_bias[:, None]
            hidden = gc.fc1(mean.reshape(16))
            context = gc.fc2(torch.maximum(hidden[:2], hidden[2:]))  # the two halves compete
            expected[b] = (context.reshape(8, 2, 1) * sim[:, None, :]).reshape(16, 2, 3)
        assert torch.allclose(gc(x), expected, atol=1e-5)


def test_layer_scale_and_rescale_init():
    fresh = FCViT(embed_dims=(32, 64, 160, 320), depths=(1, 1, 1, 1))
    assert torch.all(fresh.network[6][0].layer_scale_2 == 1e-5)
    assert torch.all(fresh.network[0][0].token_mixer.gc1.rescale_weight == 1)


@pytest.mark.parametrize('hw', [(64, 64), (72, 104), (33, 47)])
def test_batch_1_and_any_input_size_forward_and_backward(hw):
    torch.manual_seed(0)
    model = FCViT(num_classes=4, embed_dims=(16, 32, 40, 64), depths=(1, 1, 2, 1), drop_path_rate=0.1).train()
    logits = model(torch.randn(1, 3, *hw))
    assert logits.shape == (1, 4)
    logits.square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


# --- model API -----------------------------------------------------------------------------------

def test_forward_head_and_reset_classifier(tiny):
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        feats = tiny.forward_features(x)
        assert feats.shape == (2, 320, 2, 3)
        pre = tiny.forward_head(feats, pre_logits=True)
        assert torch.allclose(pre, feats.mean((2, 3)))
        assert torch.allclose(tiny(x), tiny.head(pre))
    model = xcit.create_model('fcvit_tiny')
    model.reset_classifier(3)
    assert model.get_classifier().out_features == 3 and model.num_classes == 3
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    model.reset_classifier(0)
    assert isinstance(model.get_classifier(), nn.Identity)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 320)
    model.reset_classifier(5, global_pool='')
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 2, 2, 5)  # per-position logits
    with pytest.raises(ValueError, match='global_pool'):
        model.reset_classifier(5, global_pool='token')


def test_forward_intermediates(tiny):
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        final, maps = tiny.forward_intermediates(x)
        assert [m.shape for m in maps] == [(2, 32, 16, 24), (2, 64, 8, 12), (2, 160, 4, 6), (2, 320, 2, 3)]
        assert torch.allclose(final, tiny.forward_features(x), atol=1e-6)
        tokens = tiny.forward_intermediates(x, indices=[1], output_fmt='NLC', intermediates_only=True)
        assert torch.allclose(tokens[0], maps[1].flatten(2).transpose(1, 2))
        first2 = tiny.forward_intermediates(x, indices=[0, 1], stop_early=True, intermediates_only=True)
        assert all(torch.allclose(a, b) for a, b in zip(first2, maps[:2]))
        normed = tiny.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)
        assert torch.allclose(normed[0], final, atol=1e-6)
    with pytest.raises(ValueError, match='out of range'):
        tiny.forward_intermediates(x, indices=[4])


def test_features_only(tmp_path, tiny):
    model = xcit.create_model('fcvit_tiny', features_only=True).eval()
    assert isinstance(model, FCViTFeatures)
    x = torch.randn(2, 3, 128, 96)
    with torch.no_grad():
        maps = model(x)
    assert [m.shape for m in maps] == [(2, 32, 32, 24), (2, 64, 16, 12), (2, 160, 8, 6), (2, 320, 4, 3)]
    assert model.feature_info == [dict(num_chs=c, reduction=r, module=f'network.{2 * i}')
                                  for i, (c, r) in enumerate([(32, 4), (64, 8), (160, 16), (320, 32)])]
    # a classifier's checkpoint loads into the backbone (norm and head are dropped)
    torch.save({'state_dict': tiny.state_dict()}, tmp_path / 'tiny.pth.tar')
    backbone = xcit.create_model('fcvit_tiny', features_only=True, out_indices=(1, 3),
                                 checkpoint_path=tmp_path / 'tiny.pth.tar').eval()
    assert [f['reduction'] for f in backbone.feature_info] == [8, 32]
    with torch.no_grad():
        for a, b in zip(backbone(x), tiny.forward_intermediates(x, indices=(1, 3), intermediates_only=True)):
            assert torch.allclose(a, b)


def test_training_helpers(tiny):
    assert tiny.no_weight_decay() == set()
    assert tiny.num_features == tiny.head_hidden_size == 320 and tiny.num_classes == 10
    for coarse in (False, True):
        patterns = []
        for spec in tiny.group_matcher(coarse=coarse).values():
            patterns.extend([spec] if isinstance(spec, str) else [p for p, _ in spec])
        unmatched = [n for n, _ in tiny.named_parameters() if not any(re.match(p, n) for p in patterns)]
        assert unmatched == ['head.weight', 'head.bias']


# --- registry and checkpoints --------------------------------------------------------------------

def test_registry_and_pretrained_cfg():
    assert xcit.list_models('fcvit_*') == NAMES and xcit.list_models(family='fcvit') == NAMES
    assert xcit.list_models('fcvit_*', pretrained=True) == []  # Google Drive folders: no direct file URL
    for name, crop_pct in zip(NAMES, (0.9, 0.9, 0.95, 0.95)):
        cfg = xcit.get_pretrained_cfg(name)
        assert cfg['tag'] == 'in1k' and cfg['crop_pct'] == crop_pct and cfg['input_size'] == (3, 224, 224)
        assert cfg['interpolation'] == 'bicubic' and cfg['mean'] == (0.485, 0.456, 0.406)
        assert cfg['download_page'].startswith('https://drive.google.com/')
    with torch.device('meta'):
        model = xcit.create_model('fcvit_b12')
    cfg = model.pretrained_cfg
    assert isinstance(model.get_submodule(cfg['first_conv']), nn.Conv2d)
    assert model.get_submodule(cfg['classifier']) is model.get_classifier()
    with pytest.raises(ValueError, match='no published weights'):
        xcit.create_model('fcvit_tiny', pretrained=True)


def test_checkpoint_of_another_size_says_what_it_looks_like(tmp_path, tiny):
    torch.save(tiny.state_dict(), tmp_path / 'tiny.pth')
    with torch.device('meta'):
        b12 = xcit.create_model('fcvit_b12', num_classes=10)
    with pytest.raises(CheckpointError) as err:
        xcit.load_checkpoint(b12, tmp_path / 'tiny.pth')
    assert ('looks like fcvit_tiny (embed_dims 32/64/160/320, depths 3/3/5/2, 10 classes); '
            'you asked for fcvit_b12 (embed_dims 64/128/320/512, depths 2/2/6/2, 10 classes)') in str(err.value)


def test_guesses_do_not_claim_other_families(tiny):
    sd = tiny.state_dict()
    assert xcit.models.xcit.guess_weights(sd) is None and xcit.models.cvt.guess_weights(sd) is None
    assert guess_architecture(sd).architecture == 'fcvit_tiny'
    with torch.device('meta'):
        xcit_sd = xcit.create_model('xcit_nano_12_p16_224').state_dict()
    assert xcit.models.fcvit.guess_weights(xcit_sd) is None
