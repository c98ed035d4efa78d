"""Golden checkpoints and logits written by facebookresearch/xcit itself."""
import numpy as np
import pytest
import torch

import xcit


@pytest.mark.parametrize('name', ['xcit_nano_12_p8_224', 'xcit_tiny_12_p16_224'])
def test_official_checkpoint_reproduces_reference_logits(fixtures_dir, name):
    model = xcit.create_model(name, checkpoint_path=fixtures_dir / f'official_{name}.pth').eval()
    x = torch.from_numpy(np.load(fixtures_dir / f'official_{name}.input.npy'))
    expected = torch.from_numpy(np.load(fixtures_dir / f'official_{name}.logits.npy'))
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == expected.shape == (2, 1000)
    assert (logits - expected).abs().max() < 1e-4


def test_official_checkpoint_differs_from_a_fresh_model(fixtures_dir):
    """The fixture is not trivially reproduced by an initialised model (the test can fail)."""
    name = 'xcit_nano_12_p8_224'
    model = xcit.create_model(name).eval()
    x = torch.from_numpy(np.load(fixtures_dir / f'official_{name}.input.npy'))
    expected = torch.from_numpy(np.load(fixtures_dir / f'official_{name}.logits.npy'))
    with torch.no_grad():
        assert (model(x) - expected).abs().max() > 1e-2
