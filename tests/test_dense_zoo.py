"""The registered dense models: every XCiT size and patch under Mask R-CNN, Semantic FPN and UperNet, with the
official recipe's class counts and constant drop-path rates, listed by `xcit models`."""
import pytest
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


def _recipe(name):
    from pathlib import Path

    from xcit.config import load_config
    config = load_config(Path(__file__).resolve().parents[1] / 'configs' / 'dense' / name)
    kwargs = {k: v for k, v in config.model.kwargs.items() if k != 'backbone_checkpoint'}  # no weights here
    return config, kwargs


def test_the_mask_rcnn_recipes_build_the_official_settings():
    from xcit.engine.optim import build_optimizer, build_schedule
    config, kwargs = _recipe('maskrcnn_xcit_small_12_p16_3x_coco.yaml')
    model = xcit.create_model(config.model.name, **kwargs)
    assert tuple(model.transform.min_size) == tuple(range(480, 801, 32)) and model.transform.max_size == 1333
    assert model.roi_heads.box_roi_pool.sampling_ratio == 0 and model.rpn._post_nms_top_n['training'] == 1000
    assert _drop_rates(model.backbone.body) == {0.05}
    schedule = build_schedule(config.schedule, config.optim.lr, steps_per_epoch=7330)  # 117,266 images / 16
    assert schedule(0) == pytest.approx(1e-7) and schedule(500) == 1e-4
    assert schedule(27 * 7330 - 1) == 1e-4 and schedule(27 * 7330) == pytest.approx(1e-5)
    assert schedule(33 * 7330) == pytest.approx(1e-6)
    groups = build_optimizer(model, config.optim, config.optim.lr).param_groups
    exempt = {id(p) for g in groups if g['weight_decay'] == 0 for p in g['params']}
    layernorms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert exempt == {id(p) for m in layernorms for p in m.parameters()} and len(layernorms) == 36
    one_x, _ = _recipe('maskrcnn_xcit_small_12_p16_1x_coco.yaml')
    assert (one_x.schedule.epochs, one_x.schedule.milestones) == (12, [8, 11]) and one_x.optim == config.optim


@pytest.mark.parametrize('name, head, epochs', [('semfpn_xcit_small_12_p16_80k_ade20k.yaml', 'SemanticFPN', 64),
                                                ('upernet_xcit_small_12_p16_160k_ade20k.yaml', 'UperNet', 127)])
def test_the_ade20k_recipes_build_their_model_and_crop_to_512(name, head, epochs):
    from xcit.data.dense import train_transforms
    from xcit.data.scenes import DigitScenes
    config, kwargs = _recipe(name)
    model = xcit.create_model(config.model.name, num_classes=config.model.num_classes, **kwargs)
    assert type(model).__name__ == head and model.classifier.out_channels == 150
    assert config.schedule.epochs == epochs and config.schedule.decay == 'poly' and config.data.reduce_zero_label
    torch.manual_seed(0)
    image, target = DigitScenes('train', length=1, seed=0, min_side=96, max_side=96,
                                digit_sizes=(20, 40), transforms=train_transforms(config))[0]
    assert image.shape[-2:] == target['semantic'].shape == (512, 512)
    assert (target['semantic'] == 255).any() or image.shape[-2] >= 512  # a small scene is padded with the ignore label


@pytest.mark.parametrize('name', ['maskrcnn_xcit_nano_12_p16', 'semfpn_xcit_nano_12_p16'])
def test_registered_models_infer_at_detection_resolution(name):
    torch.manual_seed(0)
    model = xcit.create_model(name).eval()
    with torch.no_grad():
        if name.startswith('maskrcnn'):  # 1333 x 800 is its own scale: nothing is resized away
            out = model([torch.rand(3, 800, 1333)])
            assert out[0]['masks'].shape[-2:] == (800, 1333) and len(out[0]['boxes']) <= 100
            assert model.transform.min_size == (800,) and model.transform.max_size == 1333
        else:
            assert model(torch.rand(1, 3, 800, 1333)).shape == (1, 150, 800, 1333)
