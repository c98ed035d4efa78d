"""CvT: the official golden checkpoint, Hugging Face imports, the model API and the registry."""
import json
import re

import numpy as np
import pytest
import torch
import torch.nn as nn

import xcit
from conftest import assert_same_weights, perturb_
from xcit.checkpoints import CheckpointError
from xcit.models import CvT, CvTFeatures, cvt_from_spec
from xcit.registry import guess_architecture

# the official MODEL.SPEC layout, scaled down (same structure as the golden fixture's)
SMALL_SPEC = {
    'NUM_STAGES': 3, 'PATCH_SIZE': [7, 3, 3], 'PATCH_STRIDE': [4, 2, 2], 'PATCH_PADDING': [2, 1, 1],
    'DIM_EMBED': [16, 32, 48], 'NUM_HEADS': [1, 2, 3], 'DEPTH': [1, 1, 2], 'MLP_RATIO': [4.0, 4.0, 4.0],
    'ATTN_DROP_RATE': [0.0, 0.0, 0.0], 'DROP_RATE': [0.0, 0.0, 0.0], 'DROP_PATH_RATE': [0.0, 0.0, 0.1],
    'QKV_BIAS': [True, True, True], 'CLS_TOKEN': [False, False, True], 'POS_EMBED': [False, False, False],
    'QKV_PROJ_METHOD': ['dw_bn', 'dw_bn', 'dw_bn'], 'KERNEL_QKV': [3, 3, 3], 'PADDING_KV': [1, 1, 1],
    'STRIDE_KV': [2, 2, 2], 'PADDING_Q': [1, 1, 1], 'STRIDE_Q': [1, 1, 1],
}
NAMES = ['cvt_13_224', 'cvt_13_384', 'cvt_21_224', 'cvt_21_384', 'cvt_w24_384']
PARAMS = {'13': 19_997_480, '21': 31_622_696, 'w24': 277_196_392}  # the reference model definition's exact counts


@pytest.fixture(scope='module')
def small():
    torch.manual_seed(0)
    return perturb_(cvt_from_spec(SMALL_SPEC, num_classes=10)).eval()


def _load_fixture(fixtures_dir, name):
    x = torch.from_numpy(np.load(fixtures_dir / f'{name}.input.npy'))
    expected = torch.from_numpy(np.load(fixtures_dir / f'{name}.logits.npy'))
    return x, expected


# --- numerical parity ------------------------------------------------------------------------------

def test_official_checkpoint_reproduces_reference_logits(fixtures_dir):
    name = 'official_cvt_small_spec'
    spec = json.loads((fixtures_dir / f'{name}.json').read_text())['spec']
    model = cvt_from_spec(spec).eval()
    result = xcit.load_checkpoint(model, fixtures_dir / f'{name}.pth')
    assert result.missing == result.unexpected == result.mismatched == []
    x, expected = _load_fixture(fixtures_dir, name)
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == expected.shape == (2, 1000)
    assert (logits - expected).abs().max() < 1e-4
    # the comparison can fail: a fresh model, or exact GELU in place of QuickGELU, is far off
    fresh = cvt_from_spec(spec).eval()
    exact_gelu = cvt_from_spec(spec, act_layer=nn.GELU).eval()
    exact_gelu.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert (fresh(x) - expected).abs().max() > 1e-2
        assert (exact_gelu(x) - expected).abs().max() > 1e-3


class _QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


def test_hugging_face_state_dict_imports_and_matches_with_quick_gelu():
    transformers = pytest.importorskip('transformers')
    from transformers.models.cvt.modeling_cvt import CvtIntermediate

    torch.manual_seed(0)
    # HF indexes stage drop-path rates by stage number, so stage i needs more than i blocks
    config = transformers.CvtConfig(embed_dim=[16, 32, 48], num_heads=[1, 2, 3], depth=[1, 2, 3], num_labels=10)
    hf = perturb_(transformers.CvtForImageClassification(config), scale=0.05).eval()
    ours = CvT(num_classes=10, embed_dims=(16, 32, 48), num_heads=(1, 2, 3), depths=(1, 2, 3)).eval()
    state_dict = hf.state_dict()
    assert any(k.startswith('cvt.encoder.stages.2.layers.') for k in state_dict)
    result = xcit.load_checkpoint(ours, state_dict)  # strict: every key maps onto ours
    assert result.missing == result.unexpected == result.mismatched == []
    assert guess_architecture(state_dict).description.startswith('embed_dims 16/32/48, depths 1/2/3')

    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        gelu_logits = hf(pixel_values=x).logits
        logits = ours(x)
        for module in hf.modules():  # HF's MLP uses exact GELU; the released weights were trained with QuickGELU
            if isinstance(module, CvtIntermediate):
                module.activation = _QuickGELU()
        quick_logits = hf(pixel_values=x).logits
    assert (gelu_logits - logits).abs().max() > 1e-3
    assert (quick_logits - logits).abs().max() < 1e-5


# --- architecture --------------------------------------------------------------------------------

@pytest.mark.parametrize('name', NAMES)
def test_parameter_counts(name):
    with torch.device('meta'):
        model = xcit.create_model(name)
        headless = xcit.create_model(name, num_classes=0)
    count = sum(p.numel() for p in model.parameters())
    assert count == PARAMS[name.split('_')[1]]
    assert sum(p.numel() for p in headless.parameters()) == count - (model.num_features * 1000 + 1000)


def test_official_key_layout():
    with torch.device('meta'):
        keys = list(xcit.create_model('cvt_13_224').state_dict())
    assert len(keys) == 459  # 13 blocks x 34 + 3 patch embeds x 4 + cls token + norm + head
    block = 'stage1.blocks.1.'
    expected = {f'{block}norm1.weight', f'{block}norm2.bias', f'{block}mlp.fc1.weight', f'{block}mlp.fc2.bias',
                f'{block}attn.proj.weight', 'stage2.cls_token', 'norm.weight', 'head.bias',
                'stage0.patch_embed.proj.bias', 'stage0.patch_embed.norm.weight'}
    for p in 'qkv':
        expected |= {f'{block}attn.conv_proj_{p}.conv.weight', f'{block}attn.conv_proj_{p}.bn.running_var',
                     f'{block}attn.conv_proj_{p}.bn.num_batches_tracked', f'{block}attn.proj_{p}.bias'}
    assert expected <= set(keys)
    assert not any(k.startswith(('stage0.cls_token', 'stage1.cls_token')) or 'pos_embed' in k for k in keys)
    assert not any(k.endswith('conv.bias') for k in keys)  # the depthwise projections have no bias


def test_quirks_the_released_weights_need():
    with torch.device('meta'):
        model = xcit.create_model('cvt_21_224')
    assert model.stage0.patch_embed.proj.padding == (2, 2)  # not 7 // 2
    assert [(s.patch_embed.proj.kernel_size[0], s.patch_embed.proj.stride[0]) for s in model.stages] == [
        (7, 4), (3, 2), (3, 2)]
    attn = model.stage2.blocks[0].attn
    assert attn.scale == 384 ** -0.5 and attn.num_heads == 6  # the full width, not the head width
    assert attn.conv_proj_q.conv.stride == (1, 1) and attn.conv_proj_k.conv.stride == (2, 2)
    assert isinstance(model.stage2.blocks[0].mlp.act, xcit.models.cvt.QuickGELU)
    assert model.norm.eps == 1e-5
    assert [s.cls_token is not None for s in model.stages] == [False, False, True]


def test_drop_path_ramps_within_each_stage():
    with torch.device('meta'):
        model = xcit.create_model('cvt_13_224', drop_path_rate=0.1)  # one float: the last stage's rate
        per_stage = xcit.create_model('cvt_13_224', drop_path_rate=[0.0, 0.2, 0.1])
    rates = [[b.drop_path.drop_prob for b in s.blocks] for s in model.stages]
    assert rates[0] == [0.0] and rates[1] == [0.0, 0.0]
    assert rates[2] == pytest.approx([0.1 * j / 9 for j in range(10)])
    assert [b.drop_path.drop_prob for b in per_stage.stage1.blocks] == [0.0, 0.2]
    spec_model = cvt_from_spec(SMALL_SPEC)  # the spec's DROP_PATH_RATE [0, 0, 0.1]
    assert [b.drop_path.drop_prob for b in spec_model.stage2.blocks] == [0.0, 0.1]


@pytest.mark.parametrize('method', ['dw_bn', 'avg', 'linear'])
def test_every_projection_method_runs_forward_and_backward_at_batch_1(method):
    torch.manual_seed(0)
    model = cvt_from_spec(SMALL_SPEC, num_classes=4, qkv_proj_method=method).train()
    x = torch.randn(1, 3, 72, 104)  # batch 1, non-square
    logits = model(x)
    assert logits.shape == (1, 4)
    logits.square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    attn = model.stage0.blocks[0].attn
    kv_side = attn.conv_proj_k(torch.zeros(1, 16, 56, 56)).shape[-1]
    assert kv_side == (56 if method == 'linear' else 28)  # avg pools to the conv projection's grid
    q_side = attn.conv_proj_q(torch.zeros(1, 16, 56, 56)).shape[-1]
    assert q_side == 56


def test_mixed_projection_methods_and_no_class_token():
    spec = dict(SMALL_SPEC, QKV_PROJ_METHOD=['linear', 'avg', 'dw_bn'], CLS_TOKEN=[False, False, False])
    model = cvt_from_spec(spec, num_classes=3).eval()
    assert model.global_pool == 'avg' and model.no_weight_decay() == set()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 16, 48)
        assert torch.allclose(model.forward_head(feats, pre_logits=True), feats.mean(1))
    with pytest.raises(ValueError, match='class token'):
        cvt_from_spec(spec, global_pool='token')


def test_batch_1_training_forward_keeps_the_batch_dimension():
    """The reference squeezes the class token to (C,) at batch 1; BatchNorm in the projections still trains."""
    model = cvt_from_spec(SMALL_SPEC, num_classes=7).train()
    bn = model.stage2.blocks[0].attn.conv_proj_k.bn
    before = bn.running_mean.clone()
    x = torch.randn(1, 3, 64, 64)  # the last stage's keys are 2 x 2: BatchNorm needs more than one value
    logits = model(x)
    assert logits.shape == (1, 7)
    assert not torch.equal(bn.running_mean, before)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (1, 48)


@pytest.mark.parametrize('hw', [(64, 64), (72, 104), (33, 47), (224, 160)])
def test_any_input_size(small, hw):
    with torch.no_grad():
        maps = small.forward_intermediates(torch.randn(1, 3, *hw), intermediates_only=True)
    side = [(s + 4 - 7) // 4 + 1 for s in hw]  # the 7/4/2 stem
    expected = []
    for _ in range(3):
        expected.append(tuple(side))
        side = [(s + 2 - 3) // 2 + 1 for s in side]  # 3/2/1 downsampling
    assert [tuple(m.shape[-2:]) for m in maps] == expected


def test_spec_is_checked():
    with pytest.raises(ValueError, match='POS_EMBED'):
        cvt_from_spec(dict(SMALL_SPEC, POS_EMBED=[False, False, True]))
    with pytest.raises(ValueError, match='unknown CvT spec keys'):
        cvt_from_spec(dict(SMALL_SPEC, DIM_EMBEDS=[1, 2, 3]))
    with pytest.raises(ValueError, match='one value per stage'):
        cvt_from_spec(dict(SMALL_SPEC, DEPTH=[1, 1]))
    with pytest.raises(ValueError, match='projection method'):
        cvt_from_spec(dict(SMALL_SPEC, QKV_PROJ_METHOD=['dw_bn', 'conv', 'dw_bn']))
    assert cvt_from_spec(SMALL_SPEC, num_classes=0).head.__class__ is nn.Identity


# --- model API -----------------------------------------------------------------------------------

def test_forward_head_and_reset_classifier(small):
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        feats = small.forward_features(x)
        assert feats.shape == (2, 1 + 4 * 6, 48)  # class token first
        pre = small.forward_head(feats, pre_logits=True)
        assert torch.equal(pre, feats[:, 0])
        assert torch.allclose(small(x), small.head(pre))
    model = cvt_from_spec(SMALL_SPEC)
    model.reset_classifier(3)
    assert model.get_classifier().out_features == 3 and model.num_classes == 3
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    model.reset_classifier(0, global_pool='avg')
    assert isinstance(model.get_classifier(), nn.Identity)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, model.num_features)
    with pytest.raises(ValueError, match='global_pool'):
        model.reset_classifier(3, global_pool='max')


def test_forward_intermediates(small):
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        final, maps = small.forward_intermediates(x)
        assert [m.shape for m in maps] == [(2, 16, 16, 20), (2, 32, 8, 10), (2, 48, 4, 5)]
        assert torch.allclose(final, small.forward_features(x), atol=1e-6)
        tokens = small.forward_intermediates(x, indices=[0, -1], output_fmt='NLC', intermediates_only=True)
        assert torch.allclose(tokens[0].transpose(1, 2).reshape(2, 16, 16, 20), maps[0])
        assert torch.allclose(tokens[1].transpose(1, 2).reshape(2, 48, 4, 5), maps[2])
        first = small.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
        assert len(first) == 1 and torch.allclose(first[0], maps[1])
        normed = small.forward_intermediates(x, indices=1, norm=True, output_fmt='NLC', intermediates_only=True)
        assert torch.allclose(normed[0], final[:, 1:], atol=1e-6)  # the final norm, on the patch tokens
    with pytest.raises(ValueError, match='out of range'):
        small.forward_intermediates(x, indices=[3])
    with pytest.raises(ValueError, match='output_fmt'):
        small.forward_intermediates(x, output_fmt='NHWC')


def test_features_only(tmp_path, small):
    with torch.device('meta'):  # shapes only: no memory, no initialisation
        model = xcit.create_model('cvt_13_224', features_only=True)
        maps = model(torch.empty(2, 3, 128, 96))
        two = xcit.create_model('cvt_13_224', features_only=True, out_indices=(1, 2))
    assert isinstance(model, CvTFeatures)
    assert [m.shape for m in maps] == [(2, 64, 32, 24), (2, 192, 16, 12), (2, 384, 8, 6)]
    assert model.feature_info == [dict(num_chs=c, reduction=r, module=f'stage{i}')
                                  for i, (c, r) in enumerate([(64, 4), (192, 8), (384, 16)])]
    assert [f['reduction'] for f in two.feature_info] == [8, 16]
    assert not any(k.startswith(('norm.', 'head.')) for k in model.state_dict())
    # a classifier's checkpoint loads into the backbone (norm and head are dropped)
    torch.save(small.state_dict(), tmp_path / 'small.pth')
    backbone = CvTFeatures(embed_dims=(16, 32, 48), num_heads=(1, 2, 3), depths=(1, 1, 2)).eval()
    xcit.load_checkpoint(backbone, tmp_path / 'small.pth')
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        for a, b in zip(backbone(x), small.forward_intermediates(x, intermediates_only=True)):
            assert torch.allclose(a, b)
    with pytest.raises(ValueError, match='features_only'):
        xcit.create_model('cvt_13_224', out_indices=(0, 1))


def test_training_helpers(small):
    assert small.no_weight_decay() == {'stage2.cls_token'}
    assert small.num_features == small.head_hidden_size == 48 and small.num_classes == 10
    for coarse in (False, True):
        patterns = []
        for spec in small.group_matcher(coarse=coarse).values():
            patterns.extend([spec] if isinstance(spec, str) else [p for p, _ in spec])
        unmatched = [n for n, _ in small.named_parameters() if not any(re.match(p, n) for p in patterns)]
        assert unmatched == ['head.weight', 'head.bias']  # timm puts what no group claims, the classifier, last


# --- registry and checkpoints --------------------------------------------------------------------

def test_registry_names_and_tags():
    assert xcit.list_models('cvt_*') == NAMES
    assert xcit.list_models(family='cvt') == NAMES
    weights = xcit.list_models('cvt_*', pretrained=True)
    assert len(weights) == 7
    assert 'cvt_21_384.ms_in22k_ft_in1k' in weights and 'cvt_w24_384.ms_in1k' not in weights
    assert xcit.get_pretrained_cfg('cvt_13_384')['tag'] == 'ms_in22k_ft_in1k'  # the best weights are the default
    assert xcit.get_pretrained_cfg('cvt_13_384.ms_in1k')['file_name'] == 'CvT-13-384x384-IN-1k.pth'


@pytest.mark.parametrize('name', ['cvt_13_224', 'cvt_w24_384'])
def test_pretrained_cfg(name):
    cfg = xcit.get_pretrained_cfg(name)
    res = int(name[-3:])
    assert cfg['input_size'] == (3, res, res) and cfg['interpolation'] == 'bicubic'
    # official evaluation: 224 resizes to 256 and center-crops; 384 warps to 384 x 384
    assert (cfg['crop_pct'], cfg['crop_mode']) == ((0.875, 'center') if res == 224 else (1.0, 'squash'))
    assert cfg['mean'] == (0.485, 0.456, 0.406) and cfg['std'] == (0.229, 0.224, 0.225)
    assert cfg['url'].startswith('https://huggingface.co/microsoft/cvt-') and cfg['num_classes'] == 1000
    with torch.device('meta'):
        model = xcit.create_model(name)
    assert model.pretrained_cfg['architecture'] == name
    assert isinstance(model.get_submodule(cfg['first_conv']), nn.Conv2d)
    assert model.get_submodule(cfg['classifier']) is model.get_classifier()


def test_official_layouts_load(tmp_path, small):
    sd = small.state_dict()
    for i, obj in enumerate([sd, {'model': sd, 'epoch': 3}, {f'module.{k}': v for k, v in sd.items()}]):
        torch.save(obj, tmp_path / f'{i}.pth')
        model = cvt_from_spec(SMALL_SPEC, num_classes=10)
        xcit.load_checkpoint(model, tmp_path / f'{i}.pth')
        assert_same_weights(model, small)


def test_checkpoint_of_another_size_says_what_it_looks_like(tmp_path):
    with torch.device('meta'):
        cvt_13 = xcit.create_model('cvt_13_224')
        cvt_21 = xcit.create_model('cvt_21_224')
    torch.save(cvt_13.to_empty(device='cpu').state_dict(), tmp_path / 'cvt13.pth')  # only shapes matter here
    with pytest.raises(CheckpointError) as err:
        xcit.load_checkpoint(cvt_21, tmp_path / 'cvt13.pth')
    message = str(err.value)
    assert 'does not fit cvt_21_224' in message
    assert ('looks like cvt_13_224 (embed_dims 64/192/384, depths 1/2/10, class token in stage 2, 1000 classes); '
            'you asked for cvt_21_224 (embed_dims 64/192/384, depths 1/4/16') in message


def test_guesses_do_not_claim_other_families():
    cvt_sd = cvt_from_spec(SMALL_SPEC).state_dict()
    with torch.device('meta'):
        xcit_sd = xcit.create_model('xcit_nano_12_p16_224').to_empty(device='cpu').state_dict()  # shapes only
    assert xcit.models.xcit.guess_weights(cvt_sd) is None
    assert xcit.models.fcvit.guess_weights(cvt_sd) is None
    assert xcit.models.cvt.guess_weights(xcit_sd) is None
    guess = guess_architecture(cvt_sd)
    assert guess.architecture is None and guess.num_classes == 1000  # a size no variant has
    assert guess.description == 'embed_dims 16/32/48, depths 1/1/2, class token in stage 2, 1000 classes'
    with pytest.raises(CheckpointError, match='looks like xcit_nano_12_p16_224'):
        xcit.load_checkpoint(cvt_from_spec(SMALL_SPEC), xcit_sd)
