"""The registered dense models: every XCiT size and patch under Mask R-CNN, Semantic FPN and UperNet, with the
official recipe's class counts and constant drop-path rates, listed by `xcit models`."""
import torch

import xcit
from xcit.models.layers import DropPath


def _drop_rates(backbone):
    return {m.drop_prob for m in backbone.modules() if isinstance(m, DropPath)}


def test_every_xcit_backbone_has_the_three_dense_models():
    backbones = xcit.list_models('xcit_*_224')
    for head in ('maskrcnn', 'semfpn', 'upernet'):
        names = xcit.list_models(f'{head}_*')
        assert len(names) == len(backbones) == 14
        assert f'{head}_xcit_small_12_p16' in names and f'{head}_xcit_tiny_12_p8' in names


def test_the_official_class_counts_and_drop_path_rates():
    with torch.device('meta'):
        detector = xcit.create_model('maskrcnn_xcit_small_12_p16')
        segmenter = xcit.create_model('semfpn_xcit_medium_24_p16')
        upernet = xcit.create_model('upernet_xcit_medium_24_p16')
    assert detector.roi_heads.box_predictor.cls_score.out_features == 81
    assert segmenter.classifier.out_channels == 150
    assert _drop_rates(detector.backbone.body) == {0.05}  # constant over the blocks, not a ramp
    assert _drop_rates(segmenter.backbone) == {0.2} and _drop_rates(upernet.backbone) == {0.15}


def test_xcit_models_lists_them(capsys):
    from xcit.cli.main import main
    assert main(['models', 'upernet_xcit_nano*']) == 0
    out = capsys.readouterr().out
    assert 'upernet_xcit_nano_12_p16' in out and 'upernet' in out.splitlines()[1]
