"""Attention maps, ONNX and TorchScript export, torch.hub."""
from pathlib import Path

import numpy as np
import pytest
import torch

import xcit
import xcit.export
from xcit.viz import attention_maps

from conftest import perturb_, run_cli

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def photo(tmp_path_factory) -> Path:
    """A real photo that ships with scikit-learn (a Chinese temple, 427 x 640)."""
    from PIL import Image
    from sklearn.datasets import load_sample_image
    path = tmp_path_factory.mktemp('photos') / 'china.jpg'
    Image.fromarray(load_sample_image('china.jpg')).save(path)
    return path


def test_attention_maps_are_distributions_over_the_patch_grid():
    torch.manual_seed(0)
    model = perturb_(xcit.create_model('xcit_nano_12_p16_224', depth=3), scale=0.2).eval()
    images = torch.randn(2, 3, 100, 150)
    maps = attention_maps(model, images, xca_block=1)
    assert maps.grid == (7, 10) and maps.xca_block == 1
    assert maps.class_attention.shape == (2, 4, 7, 10)
    assert torch.allclose(maps.class_attention.sum(dim=(-2, -1)), torch.ones(2, 4), atol=1e-5)
    assert (maps.class_attention >= 0).all()
    assert maps.channel_attention.shape == (2, 4, 32, 32)  # d_h x d_h per head
    assert torch.allclose(maps.channel_attention.sum(-1), torch.ones(2, 4, 32), atol=1e-5)
    other = attention_maps(model, images.flip(-1), xca_block=1)
    assert (other.class_attention - maps.class_attention).abs().max() > 1e-4
    assert (other.channel_attention - maps.channel_attention).abs().max() > 1e-4
    with torch.no_grad():  # collecting maps leaves the model's output alone
        assert torch.equal(model(images), model(images))


def test_attention_maps_need_an_xcit_and_a_valid_block():
    with pytest.raises(ValueError, match='XCiT classifier'):
        attention_maps(xcit.create_model('cvt_13_224'), torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match='out of range'):
        attention_maps(xcit.create_model('xcit_nano_12_p16_224', depth=2), torch.randn(1, 3, 64, 64), xca_block=5)


@pytest.mark.slow
def test_attention_cli_draws_a_real_photo(photo, tmp_path):
    from PIL import Image
    proc = run_cli('attention', photo, '--model', 'xcit_nano_12_p16_224', '--out', tmp_path / 'maps')
    assert proc.returncode == 0, proc.stderr
    png = tmp_path / 'maps' / 'china_attention.png'
    with Image.open(png) as img:
        assert img.format == 'PNG' and img.width > 1000 and np.asarray(img.convert('L')).std() > 10
    missing = run_cli('attention', tmp_path / 'nope.jpg', '--model', 'xcit_nano_12_p16_224')
    assert missing.returncode == 2 and 'nope.jpg' in missing.stderr and 'Traceback' not in missing.stderr


@pytest.fixture
def onnx_runtime():
    """onnxruntime, where ONNX export and its runtime are installed; otherwise the test skips, saying why."""
    pytest.importorskip('onnxscript', reason='ONNX export needs onnx and onnxscript (pip install "xcit[onnx]")')
    return pytest.importorskip('onnxruntime', reason='the parity checks run the graph in onnxruntime')


def _onnx_logits(path: Path, images: torch.Tensor) -> torch.Tensor:
    import onnxruntime
    session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    return torch.from_numpy(session.run(['logits'], {'image': images.numpy()})[0])


def _assert_onnx_matches_at_the_export_size_and_another(onnx_path: Path, model: torch.nn.Module) -> None:
    for shape in ((2, 3, 96, 96), (3, 3, 128, 112)):
        images = torch.randn(*shape)
        with torch.no_grad():
            expected = model(images)
        assert (_onnx_logits(onnx_path, images) - expected).abs().max() < 1e-4, shape


@pytest.mark.slow
def test_export_cli_writes_onnx_of_any_size_that_matches_pytorch(tmp_path, onnx_runtime):
    torch.manual_seed(0)
    name = 'xcit_nano_12_p16_224'
    model = perturb_(xcit.create_model(name), scale=0.01).eval()
    checkpoint = tmp_path / 'weights.safetensors'
    xcit.checkpoints.save_state_dict(model.state_dict(), checkpoint, 'safetensors', model_name=name)
    onnx_path = tmp_path / f'{name}.onnx'
    proc = run_cli('export', '--model', name, '--checkpoint', checkpoint, '--onnx', onnx_path, '--dynamic-size',
                   '--image-size', 96, timeout=600)
    assert proc.returncode == 0, proc.stderr
    _assert_onnx_matches_at_the_export_size_and_another(onnx_path, model)


@pytest.mark.slow
def test_cvt_exports_to_onnx_of_any_size_that_matches_pytorch(tmp_path, onnx_runtime):
    """CvT's convolutional projections and its class token in the last stage, one block a stage."""
    torch.manual_seed(0)
    model = perturb_(xcit.create_model('cvt_13_224', depths=[1, 1, 1]), scale=0.01).eval()
    path = xcit.export.export_onnx(model, tmp_path / 'cvt.onnx', image_size=(96, 96), dynamic_size=True)
    _assert_onnx_matches_at_the_export_size_and_another(path, model)


@pytest.mark.slow
def test_onnx_export_without_dynamic_size_fixes_height_and_width(tmp_path, onnx_runtime):
    model = xcit.create_model('xcit_nano_12_p16_224', depth=2).eval()
    path = xcit.export.export_onnx(model, tmp_path / 'fixed.onnx', image_size=(64, 64))
    images = torch.randn(5, 3, 64, 64)  # any batch size
    with torch.no_grad():
        assert (_onnx_logits(path, images) - model(images)).abs().max() < 1e-4
    with pytest.raises(onnx_runtime.capi.onnxruntime_pybind11_state.InvalidArgument):
        _onnx_logits(path, torch.randn(1, 3, 96, 64))


def test_torchscript_export_runs_without_custom_ops(tmp_path):
    torch.manual_seed(0)
    model = perturb_(xcit.create_model('xcit_nano_12_p16_224', depth=2)).eval()
    path_before = xcit.models.get_fast_path(model)
    path = xcit.export.export_torchscript(model, tmp_path / 'model.pt', image_size=(64, 64))
    loaded = torch.jit.load(str(path))
    assert 'xcit::' not in str(loaded.inlined_graph)  # portable ops only
    assert xcit.models.get_fast_path(model) == path_before  # the model itself is back on its own path
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert (loaded(images) - model(images)).abs().max() < 1e-5


def test_export_cli_needs_an_output():
    proc = run_cli('export', '--model', 'xcit_nano_12_p16_224')
    assert proc.returncode == 2 and '--onnx' in proc.stderr and 'Traceback' not in proc.stderr


def test_torch_hub_builds_models_from_the_local_repo_and_honours_pretrained(tmp_path, monkeypatch):
    model = torch.hub.load(str(REPO), 'xcit_nano_12_p8_224', source='local', num_classes=7)
    assert isinstance(model, xcit.models.XCiT) and model.num_classes == 7 and model.patch_size == 8
    cvt = torch.hub.load(str(REPO), 'cvt_13_224', source='local')
    assert isinstance(cvt, xcit.models.CvT)
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'hub'))
    published = tmp_path / 'xcit_nano_12_p8_224.pth'
    reference = perturb_(xcit.create_model('xcit_nano_12_p8_224'))
    torch.save({'model': reference.state_dict()}, published)
    loaded = torch.hub.load(str(REPO), 'xcit_nano_12_p8_224', source='local', pretrained=True,
                            pretrained_cfg_overlay=dict(url=published.as_uri()))
    for key, value in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
