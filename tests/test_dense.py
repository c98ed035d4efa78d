"""features_only: the official detection/segmentation backbone."""
import math

import pytest
import torch

import xcit
from conftest import perturb_


@pytest.mark.parametrize('name,taps', [
    ('xcit_nano_12_p16_224', [3, 5, 7, 11]),
    ('xcit_nano_12_p8_224', [3, 5, 7, 11]),
    ('xcit_tiny_24_p16_224', [7, 11, 15, 23]),
    ('xcit_tiny_24_p8_384', [7, 11, 15, 23]),
])
def test_pyramid_shapes_and_strides(name, taps):
    model = xcit.create_model(name, features_only=True).eval()
    assert isinstance(model, xcit.XCiTDense) and model.out_indices == taps
    H, W = 128, 96
    with torch.no_grad():
        maps = model(torch.randn(2, 3, H, W))
    D = model.embed_dim
    assert [m.shape for m in maps] == [(2, D, H // s, W // s) for s in (4, 8, 16, 32)]
    assert [f['reduction'] for f in model.feature_info] == [4, 8, 16, 32]
    assert all(f['num_chs'] == D for f in model.feature_info)


def test_pyramid_for_sizes_that_are_not_multiples():
    model = xcit.create_model('xcit_nano_12_p16_224', features_only=True).eval()
    with torch.no_grad():
        maps = model(torch.randn(1, 3, 200, 90))
    grid = (math.ceil(200 / 16), math.ceil(90 / 16))  # 13 x 6
    assert [tuple(m.shape[-2:]) for m in maps] == [(grid[0] * 4, grid[1] * 4), (grid[0] * 2, grid[1] * 2), grid,
                                                  (grid[0] // 2, grid[1] // 2)]


@pytest.mark.parametrize('patch', [16, 8])
def test_official_adapter_names(patch):
    keys = set(xcit.create_model(f'xcit_nano_12_p{patch}_224', features_only=True).state_dict())
    adapters = {k for k in keys if k.startswith('fpn')}
    if patch == 16:
        assert adapters == {'fpn1.0.weight', 'fpn1.0.bias', 'fpn1.1.weight', 'fpn1.1.bias', 'fpn1.1.running_mean',
                            'fpn1.1.running_var', 'fpn1.1.num_batches_tracked', 'fpn1.3.weight', 'fpn1.3.bias',
                            'fpn2.0.weight', 'fpn2.0.bias'}
    else:
        assert adapters == {'fpn1.0.weight', 'fpn1.0.bias'}
    assert not any(k.startswith(('cls_token', 'cls_attn_blocks', 'norm.', 'head')) for k in keys)


def test_classification_weights_load_into_the_backbone(tmp_path):
    torch.manual_seed(0)
    classifier = perturb_(xcit.create_model('xcit_nano_12_p8_224')).eval()
    path = tmp_path / 'cls.pth'
    torch.save({'model': classifier.state_dict()}, path)
    dense = xcit.create_model('xcit_nano_12_p8_224', features_only=True, checkpoint_path=path).eval()
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        taps = classifier.forward_intermediates(x, indices=[3, 5, 7, 11], intermediates_only=True)
        maps = dense(x)
    assert torch.allclose(maps[1], taps[1], atol=1e-5)  # p8: the stride-8 level is the block output itself
    assert torch.allclose(maps[2], torch.nn.functional.max_pool2d(taps[2], 2), atol=1e-5)


def test_custom_taps_and_bad_taps():
    model = xcit.create_model('xcit_nano_12_p16_224', features_only=True, out_indices=(1, 2, 3, -1))
    assert model.out_indices == [1, 2, 3, 11]
    with pytest.raises(ValueError, match='4 distinct'):
        xcit.create_model('xcit_nano_12_p16_224', features_only=True, out_indices=(1, 2, 3))
    with pytest.raises(ValueError, match='out of range'):
        xcit.create_model('xcit_nano_12_p16_224', features_only=True, out_indices=(1, 2, 3, 12))
    with pytest.raises(ValueError, match='features_only'):
        xcit.create_model('xcit_nano_12_p16_224', out_indices=(1, 2, 3, 4))
