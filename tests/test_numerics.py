"""Mixed precision at high resolution, where XCA's L2 norm over thousands of tokens is at risk."""
import pytest
import torch

import xcit
from conftest import perturb_
from xcit.models import set_fast_path
from xcit.models.xcit import XCA, xca_reference

_REFERENCE = {}


def _model_and_reference(name):
    """Four XCA blocks and both class-attention layers: the risk is in each block's norms over 4096 tokens,
    not in the depth. The float32 reference runs the readable maths."""
    if name not in _REFERENCE:
        torch.manual_seed(0)
        model = set_fast_path(perturb_(xcit.create_model(name, depth=4)).eval(), 'reference')
        x = torch.randn(1, 3, 1024, 1024)
        with torch.inference_mode():
            _REFERENCE[name] = model, x, model(x)
    return _REFERENCE[name]


@pytest.mark.slow
@pytest.mark.parametrize('dtype', [torch.bfloat16])  # float16 GEMMs crawl on CPUs without AVX512-FP16 (minutes
# a model); float16 XCA over 4096 tokens is checked layer by layer below
@pytest.mark.parametrize('name, path', [
    # each path forced: 'auto' would first time every candidate in bfloat16 and then test only the one it took
    ('xcit_nano_12_p16_224', 'reference'), ('xcit_nano_12_p16_224', 'fast'),
    # not small on 'reference': without AVX-512, PyTorch runs its bfloat16 depthwise convolutions one group at
    # a time (a minute for 384 channels at 1024); its maths is nano's at another width
    ('xcit_small_12_p16_224', 'fast')])
def test_autocast_at_1024_is_finite_and_close(name, dtype, path):
    model, x, reference = _model_and_reference(name)
    set_fast_path(model, path)
    try:
        with torch.inference_mode(), torch.autocast('cpu', dtype=dtype):
            out = model(x)
    finally:
        set_fast_path(model, 'reference')
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    relative = (out.float() - reference).norm() / reference.norm()
    assert relative < 2e-2, f'{name} {dtype} {path}: relative error {relative:.4f}'


def test_xca_under_float16_autocast_survives_token_norms_beyond_float16():
    """Over 4096 tokens the queries' and keys' norms exceed float16's range; the output must still be right."""
    torch.manual_seed(0)
    xca = perturb_(XCA(64, num_heads=2), scale=0.05).eval()
    x = torch.randn(1, 4096, 64) * 2000
    with torch.no_grad():
        qk = xca.qkv(x)[..., :128]  # (B, N, q and k channels)
        assert qk.norm(dim=1).min() > torch.finfo(torch.float16).max  # the regime where a float16 norm is inf
        assert qk.abs().max() < torch.finfo(torch.float16).max  # while the values themselves fit
        reference = xca_reference(xca, x)
        with torch.autocast('cpu', dtype=torch.float16):
            out = xca(x)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert (out.float() - reference).norm() / reference.norm() < 2e-2
