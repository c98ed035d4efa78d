"""Every registered name against timm's implementation (test-only reference), through our timm-layout loader."""
import pytest
import torch

import xcit
from conftest import perturb_
from test_registry import ALL_NAMES
from xcit.models.xcit import timm_state_dict

timm = pytest.importorskip('timm')


def _pair(name):
    torch.manual_seed(0)
    reference = perturb_(timm.create_model(name)).eval()
    ours = xcit.create_model(name).eval()
    xcit.load_checkpoint(ours, reference.state_dict())
    return ours, reference


@pytest.mark.parametrize('name', ALL_NAMES)
def test_logits_match_timm_at_an_odd_size(name):
    ours, reference = _pair(name)
    x = torch.randn(2, 3, 72, 104)  # non-square, not a multiple of either patch size
    with torch.no_grad():
        expected = reference(x)
        assert (ours(x) - expected).abs().max() < 1e-4
    assert expected.abs().max() > 0.1  # perturbed weights give logits worth comparing


@pytest.mark.parametrize('name', [n for n in ALL_NAMES if '_nano_' in n or '_tiny_' in n])
def test_logits_match_timm_at_224(name):
    ours, reference = _pair(name)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert (ours(x) - reference(x)).abs().max() < 1e-4


def test_our_state_dict_in_timm_layout_loads_strictly_into_timm():
    torch.manual_seed(0)
    ours = perturb_(xcit.create_model('xcit_tiny_12_p16_224')).eval()
    reference = timm.create_model('xcit_tiny_12_p16_224').eval()
    reference.load_state_dict(timm_state_dict(ours.state_dict()), strict=True)
    x = torch.randn(1, 3, 96, 80)
    with torch.no_grad():
        assert (ours(x) - reference(x)).abs().max() < 1e-4
