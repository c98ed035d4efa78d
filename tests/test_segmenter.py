"""Semantic FPN and UperNet over our backbones: logits at the input's size for any size, mmseg's FPNHead
layout, cross-entropy with the ignore index fitting a digit scene, and whole-image and sliding-window
inference."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from xcit.data.scenes import NUM_CLASSES, DigitScenes
from xcit.dense import build_segmenter
from xcit.dense.segmentation import sliding_window_logits, whole_image_logits


@pytest.mark.parametrize('name', ['xcit_nano_12_p16_224', 'xcit_nano_12_p8_224', 'cvt_13_224'])
def test_logits_come_back_at_the_input_size(name):
    model = build_segmenter(name, num_classes=NUM_CLASSES).eval()
    with torch.no_grad():
        for size in ((97, 131), (128, 128)):
            assert model(torch.rand(2, 3, *size)).shape == (2, NUM_CLASSES, *size)


def test_each_level_gets_conv_units_until_stride_4():
    model = build_segmenter('xcit_nano_12_p16_224', num_classes=3)
    convs = [sum(isinstance(m, torch.nn.Conv2d) for m in head) for head in model.scale_heads]
    upsamples = [sum(isinstance(m, torch.nn.Upsample) for m in head) for head in model.scale_heads]
    assert model.strides == [4, 8, 16, 32] and convs == [1, 1, 2, 3] and upsamples == [0, 1, 2, 3]
    assert model.fpn.inner_blocks[0][0].out_channels == 128  # the official neck: as wide as the backbone


def test_cross_entropy_with_ignored_pixels_fits_a_scene():
    torch.manual_seed(0)
    image, target = DigitScenes('train', length=1, seed=2, min_side=96, max_side=128, digit_sizes=(32, 64))[0]
    label = target['semantic'].as_subclass(torch.Tensor).clone()
    label[:, :8] = 255  # ignored: never pulls the loss
    model = build_segmenter('xcit_nano_12_p16_224', num_classes=NUM_CLASSES, fpn_channels=32, channels=32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(12):
        loss = F.cross_entropy(model(image[None]), label[None], ignore_index=255)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_upernet_returns_logits_at_any_size_and_the_auxiliary_head_in_training():
    torch.manual_seed(0)
    model = build_segmenter('xcit_nano_12_p16_224', num_classes=NUM_CLASSES, head='upernet', channels=32,
                            aux_channels=16)
    assert [p[0].output_size for p in model.pools] == [1, 2, 3, 6]  # the pyramid pooling module
    assert model.aux_head[0].in_channels == model.backbone.feature_info[2]['num_chs']  # on the stride-16 map
    model.eval()
    with torch.no_grad():
        for size in ((97, 131), (64, 64)):
            assert model(torch.rand(1, 3, *size)).shape == (1, NUM_CLASSES, *size)
    model.train()
    out = model(torch.rand(2, 3, 96, 64))
    assert set(out) == {'out', 'aux'} and out['aux'].shape == out['out'].shape == (2, NUM_CLASSES, 96, 64)
    assert model.aux_weight == 0.4


def test_an_unknown_head_is_named():
    with pytest.raises(ValueError, match="head must be one of semfpn, upernet, not 'fcn'"):
        build_segmenter('xcit_nano_12_p16_224', num_classes=3, head='fcn')


class _PerPixel(nn.Module):
    """A 1x1 conv: each pixel's logits depend on that pixel alone, whatever window or padding it is seen in."""

    def __init__(self, num_classes=5):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, num_classes, 1)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize('size, crop, stride', [((97, 131), 64, 40), ((50, 70), 64, 40), ((128, 64), 64, 64)])
def test_sliding_windows_cover_every_pixel_once_averaged(size, crop, stride):
    model, image = _PerPixel(), torch.randn(3, *size)
    expected = model(image[None])[0]
    assert torch.allclose(sliding_window_logits(model, image, crop, stride), expected, atol=1e-6)
    assert torch.allclose(whole_image_logits(model, image), expected, atol=1e-6)


def test_sliding_windows_average_where_they_overlap():
    calls = []

    class Counter(nn.Module):
        def forward(self, x):
            calls.append(x.shape[-2:])
            return torch.ones(1, 1, *x.shape[-2:]) * len(calls)  # window k answers k everywhere

    logits = sliding_window_logits(Counter(), torch.zeros(3, 64, 96), crop=64, stride=32)
    assert len(calls) == 2 and logits[0, 0, 0] == 1 and logits[0, 0, 95] == 2 and logits[0, 0, 40] == 1.5


def test_whole_image_inference_resizes_to_the_short_side_and_back():
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(tuple(x.shape[-2:]))
            return torch.zeros(1, 3, *x.shape[-2:])

    logits = whole_image_logits(Probe(), torch.zeros(3, 100, 300), short_side=64, max_side=150)
    assert logits.shape == (3, 100, 300) and seen == [(64, 160)]  # 50 x 150 padded to multiples of 32
