"""torchvision's Mask R-CNN over our backbones: torchvision's calling convention, any input size, and the same
backbone features as features_only."""
import pytest
import torch

import xcit
from xcit.data.scenes import DigitScenes
from xcit.dense import build_detector


@pytest.fixture(scope='module')
def detector():
    torch.manual_seed(0)
    return build_detector('xcit_nano_12_p16_224', num_classes=11, min_size=256, max_size=512)


def test_training_takes_images_and_targets_and_returns_torchvisions_losses(detector):
    scenes = DigitScenes('train', length=2)
    images, targets = zip(*[scenes[i] for i in range(2)])
    targets = [dict(boxes=t['boxes'], labels=t['labels'], masks=t['masks']) for t in targets]
    detector.train()
    losses = detector(list(images), targets)
    assert set(losses) == {'loss_classifier', 'loss_box_reg', 'loss_mask', 'loss_objectness', 'loss_rpn_box_reg'}
    assert all(torch.isfinite(v) for v in losses.values())
    detector.zero_grad()
    sum(losses.values()).backward()
    assert detector.backbone.body.blocks[0].attn.qkv.weight.grad.abs().sum() > 0  # the backbone learns too


@pytest.mark.parametrize('size', [(97, 131), (512, 512), (800, 1333)])
def test_inference_at_any_size_returns_one_dict_per_image(detector, size):
    detector.eval()
    with torch.no_grad():
        out = detector([torch.rand(3, *size), torch.rand(3, 64, 80)])
    assert len(out) == 2 and set(out[0]) == {'boxes', 'labels', 'scores', 'masks'}
    boxes, masks = out[0]['boxes'], out[0]['masks']
    assert masks.shape[-2:] == size  # masks come back at the input's size
    assert (boxes[:, 2] <= size[1] + 1e-3).all() and (boxes[:, 3] <= size[0] + 1e-3).all()


def test_backbone_features_match_features_only_with_the_same_weights():
    torch.manual_seed(1)
    reference = xcit.create_model('xcit_nano_12_p8_224', features_only=True).eval()
    detector = build_detector('xcit_nano_12_p8_224', num_classes=3, masks=False).eval()
    detector.backbone.body.load_state_dict(reference.state_dict())
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        for ours, theirs in zip(detector.backbone.body(x), reference(x)):
            assert (ours - theirs).abs().max() < 1e-6
        pyramid = detector.backbone(x)
    assert list(pyramid) == ['0', '1', '2', '3', 'pool'] and all(f.shape[1] == 256 for f in pyramid.values())
    assert [f.shape[-1] for f in pyramid.values()] == [32, 16, 8, 4, 2]  # strides 4, 8, 16, 32 and the pooled 64


@pytest.mark.parametrize('name, levels', [('cvt_13_224', 3), ('fcvit_tiny', 4)])
def test_other_families_are_backbones_too(name, levels):
    detector = build_detector(name, num_classes=5, masks=False, min_size=128, max_size=160).eval()
    assert len(detector.backbone.strides) == levels
    with torch.no_grad():
        out = detector([torch.rand(3, 120, 150)])
    assert out[0]['boxes'].shape[1] == 4
