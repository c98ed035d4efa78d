import fnmatch

import pytest
import torch

import xcit

SIZES = ['nano_12', 'tiny_12', 'tiny_24', 'small_12', 'small_24', 'medium_24', 'large_24']
ALL_NAMES = [f'xcit_{s}_p{p}_{r}' for s in SIZES for p in (16, 8) for r in (224, 384)]

# trainable parameters with a 1000-class head (p16, p8), from the module definitions; rounded, the published table
PARAMS = {
    'nano_12': (3_053_224, 3_049_016),
    'tiny_12': (6_716_272, 6_706_504),
    'tiny_24': (12_116_896, 12_107_128),
    'small_12': (26_253_304, 26_213_032),
    'small_24': (47_671_384, 47_631_112),
    'medium_24': (84_395_752, 84_323_624),
    'large_24': (189_096_136, 188_932_648),
}
PUBLISHED_M = {  # millions, as published by the official README / PASSL / timm
    'nano_12': (3.05, 3.05), 'tiny_12': (6.72, 6.71), 'tiny_24': (12.12, 12.11), 'small_12': (26.25, 26.21),
    'small_24': (47.67, 47.63), 'medium_24': (84.40, 84.32), 'large_24': (189.10, 188.93),
}


def test_every_published_variant_is_registered():
    assert sorted(xcit.list_models('xcit_*')) == sorted(ALL_NAMES)
    assert len(ALL_NAMES) == 28


def test_list_models_wildcards_like_timm():
    assert sorted(xcit.list_models('xcit_*_p8_384')) == sorted(n for n in ALL_NAMES if n.endswith('_p8_384'))
    assert xcit.list_models(['xcit_nano*', 'xcit_large_24_p16_224']) == [
        'xcit_nano_12_p16_224', 'xcit_nano_12_p16_384', 'xcit_nano_12_p8_224', 'xcit_nano_12_p8_384',
        'xcit_large_24_p16_224']
    assert 'xcit_nano_12_p8_224' not in xcit.list_models('xcit_nano*', exclude_filters='*_p8_*')
    assert xcit.list_models('no_such_*') == []


def test_pretrained_listing_names_each_weight_file():
    weights = xcit.list_models('xcit_*', pretrained=True)
    assert len([w for w in weights if '.fb_' in w]) == 42  # 14 in1k + 28 distilled files
    assert len([w for w in weights if '.passl_' in w]) == 15  # 14 + PASSL's own distilled nano p8
    assert 'xcit_nano_12_p8_224.passl_dist_in1k' in weights
    assert not any(w.endswith('_384.fb_in1k') for w in weights)  # no undistilled 384 models were released


@pytest.mark.parametrize('size', SIZES)
@pytest.mark.parametrize('patch', [16, 8])
def test_parameter_counts_match_published(size, patch):
    with torch.device('meta'):
        model = xcit.create_model(f'xcit_{size}_p{patch}_224')
        headless = xcit.create_model(f'xcit_{size}_p{patch}_224', num_classes=0)
    count = sum(p.numel() for p in model.parameters())
    expected = PARAMS[size][patch == 8]
    assert count == expected
    assert round(count / 1e6, 2) == PUBLISHED_M[size][patch == 8]
    dim = model.embed_dim
    assert sum(p.numel() for p in headless.parameters()) == expected - (dim * 1000 + 1000)


@pytest.mark.parametrize('name', ['xcit_nano_12_p16_224', 'xcit_large_24_p8_384'])
def test_pretrained_cfg(name):
    model = xcit.create_model(name) if 'nano' in name else None
    cfg = model.pretrained_cfg if model is not None else xcit.get_pretrained_cfg(name)
    res = int(name[-3:])
    assert cfg['input_size'] == (3, res, res)
    assert cfg['crop_pct'] == 1.0 and cfg['interpolation'] == 'bicubic'
    assert cfg['mean'] == (0.485, 0.456, 0.406) and cfg['std'] == (0.229, 0.224, 0.225)
    assert cfg['classifier'] == 'head' and cfg['first_conv'] == 'patch_embed.proj.0.0'
    assert cfg['architecture'] == name
    assert cfg['url'].startswith('https://dl.fbaipublicfiles.com/xcit/')
    if model is not None:
        assert model.default_cfg is model.pretrained_cfg
        first_conv = model.get_submodule(cfg['first_conv'])
        assert isinstance(first_conv, torch.nn.Conv2d) and first_conv.in_channels == 3
        assert model.get_submodule(cfg['classifier']) is model.get_classifier()


def test_tags_select_weight_sources():
    assert xcit.get_pretrained_cfg('xcit_small_12_p8_224')['tag'] == 'fb_in1k'  # first tag is the default
    assert xcit.get_pretrained_cfg('xcit_small_12_p8_384')['tag'] == 'fb_dist_in1k'
    dist = xcit.get_pretrained_cfg('xcit_small_12_p8_224.fb_dist_in1k')
    assert dist['url'] == 'https://dl.fbaipublicfiles.com/xcit/xcit_small_12_p8_224_dist.pth'
    passl = xcit.get_pretrained_cfg('xcit_nano_12_p8_224.passl_dist_in1k')
    assert passl['url'] == 'https://passl.bj.bcebos.com/vision_transformers/xcit/xcit_nano_12_p8_224_dist.pdparams'
    # the names timm used before tags existed still resolve
    assert xcit.get_pretrained_cfg('xcit_tiny_24_p16_384_dist')['url'].endswith('xcit_tiny_24_p16_384_dist.pth')


def test_unknown_names_are_explained():
    with pytest.raises(ValueError, match='Unknown model'):
        xcit.create_model('xcit_huge_48_p16_224')
    with pytest.raises(ValueError, match="no pretrained tag 'in22k'.*fb_dist_in1k"):
        xcit.create_model('xcit_nano_12_p16_384.in22k')
    assert xcit.is_model('xcit_nano_12_p16_224.fb_in1k') and not xcit.is_model('resnet50')


def test_model_kwargs_reach_the_model():
    model = xcit.create_model('xcit_nano_12_p16_224', num_classes=7, in_chans=1, drop_path_rate=0.1)
    assert model.head.out_features == 7
    assert model.patch_embed.proj[0][0].in_channels == 1
    assert {b.drop_path.drop_prob for b in model.blocks} == {0.1}
    assert fnmatch.fnmatch(model.pretrained_cfg['architecture'], 'xcit_nano_12_p16_224')
