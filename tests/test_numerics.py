"""Mixed precision at high resolution, where XCA's L2 norm over thousands of tokens is at risk."""
import pytest
import torch

import xcit
from conftest import perturb_

_REFERENCE = {}


def _model_and_reference(name):
    if name not in _REFERENCE:
        torch.manual_seed(0)
        model = perturb_(xcit.create_model(name)).eval()
        x = torch.randn(1, 3, 1024, 1024)
        with torch.inference_mode():
            _REFERENCE[name] = model, x, model(x)
    return _REFERENCE[name]


@pytest.mark.slow
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('name', ['xcit_nano_12_p16_224', 'xcit_small_12_p16_224'])
def test_autocast_at_1024_is_finite_and_close(name, dtype):
    model, x, reference = _model_and_reference(name)
    with torch.inference_mode(), torch.autocast('cpu', dtype=dtype):
        out = model(x)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    relative = (out.float() - reference).norm() / reference.norm()
    assert relative < 2e-2, f'{name} {dtype}: relative error {relative:.4f}'


def test_xca_normalises_in_float32_under_autocast(monkeypatch):
    """The L2 norm sees float32 even when autocast hands XCA float16 activations."""
    seen = []
    original = torch.nn.functional.normalize

    def recording_normalize(t, *args, **kwargs):
        seen.append(t.dtype)
        return original(t, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, 'normalize', recording_normalize)
    xca = xcit.create_model('xcit_nano_12_p16_224').blocks[0].attn.eval()
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.float16):
        out = xca(torch.randn(1, 64, 128))
    assert seen == [torch.float32, torch.float32]  # q and k
    assert out.dtype == torch.float16
