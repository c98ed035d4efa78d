"""What XCiT, CvT and FCViT share: gradient checkpointing and forward_intermediates' walk, with the same semantics."""
import pytest
import torch

import xcit
from conftest import perturb_
from xcit.models import CvT, FCViT


def _xcit():
    return xcit.create_model('xcit_nano_12_p16_224', depth=3, num_classes=4)


def _cvt():
    return CvT(num_classes=4, embed_dims=(16, 32, 48), num_heads=(1, 2, 3), depths=(1, 1, 2))


def _fcvit():
    return FCViT(num_classes=4, embed_dims=(16, 32, 40, 64), depths=(1, 1, 2, 1))


# family: (a small model, its blocks grouped by layer: XCiT's layers are its blocks, CvT's and FCViT's their stages)
FAMILIES = {
    'xcit': (_xcit, lambda m: [[block] for block in m.blocks]),
    'cvt': (_cvt, lambda m: [list(stage.blocks) for stage in m.stages]),
    'fcvit': (_fcvit, lambda m: [list(m.network[2 * i]) for i in range(m.num_stages)]),
}


def _model_and_calls(family):
    """The model (eval: fixed BatchNorm statistics) and a list that gets the layer of every block forward it runs."""
    build, layer_blocks = FAMILIES[family]
    torch.manual_seed(0)
    model = perturb_(build()).eval()
    layers = layer_blocks(model)
    calls = []
    for i, blocks in enumerate(layers):
        for block in blocks:
            block.register_forward_pre_hook(lambda _module, _args, i=i: calls.append(i))
    return model, layers, calls


@pytest.mark.parametrize('family', FAMILIES)
def test_grad_checkpointing_reruns_every_block_in_the_backward_pass_and_changes_nothing(family):
    model, layers, calls = _model_and_calls(family)
    num_blocks = sum(len(blocks) for blocks in layers)
    x = torch.randn(2, 3, 48, 64)

    def run():
        model.zero_grad()
        calls.clear()
        out = model(x)
        forwards = len(calls)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()], forwards, len(calls)

    out_plain, grads_plain, forwards, total = run()
    assert forwards == total == num_blocks
    model.set_grad_checkpointing(True)
    assert model.grad_checkpointing
    out_ckpt, grads_ckpt, forwards, total = run()
    assert forwards == num_blocks and total == 2 * num_blocks  # each block recomputed once for its gradients
    assert torch.allclose(out_plain, out_ckpt, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads_plain, grads_ckpt))
    calls.clear()
    with torch.no_grad():  # nothing to recompute for
        model(x)
    assert len(calls) == num_blocks
    model.set_grad_checkpointing(False)
    out_again, _, forwards, total = run()
    assert forwards == total == num_blocks and torch.equal(out_again, out_plain)


@pytest.mark.parametrize('family', FAMILIES)
def test_intermediates_only_stops_after_the_last_tap(family):
    model, layers, calls = _model_and_calls(family)
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        final, every = model.forward_intermediates(x)
        assert len(every) == model.num_layers and torch.allclose(final, model.forward_features(x), atol=1e-6)
        for stop_early in (False, True):
            calls.clear()
            taps = model.forward_intermediates(x, indices=[0, 1], stop_early=stop_early, intermediates_only=True)
            assert sorted(set(calls)) == [0, 1]  # no block of a later layer ran
            assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(taps, every[:2]))


@pytest.mark.parametrize('family', FAMILIES)
def test_stop_early_without_intermediates_only_is_refused_unless_it_runs_every_layer(family):
    model, _, _ = _model_and_calls(family)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        with pytest.raises(ValueError, match='no final features.*intermediates_only=True'):
            model.forward_intermediates(x, indices=[0], stop_early=True)
        final, taps = model.forward_intermediates(x, indices=[0, -1], stop_early=True)  # the last layer is tapped
        assert torch.allclose(final, model.forward_features(x), atol=1e-6) and len(taps) == 2


@pytest.mark.parametrize('family', FAMILIES)
def test_nchw_and_nlc_intermediates_are_the_same_values(family):
    model, _, _ = _model_and_calls(family)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        maps = model.forward_intermediates(x, intermediates_only=True)
        tokens = model.forward_intermediates(x, output_fmt='NLC', intermediates_only=True)
    for m, t in zip(maps, tokens):
        B, C, H, W = m.shape
        assert t.shape == (B, H * W, C) and torch.equal(t, m.flatten(2).transpose(1, 2))


@pytest.mark.parametrize('name', ['xcit_nano_12_p16_224', 'cvt_13_224', 'fcvit_tiny'])
def test_features_only_drops_the_classifier_keywords(name):
    with torch.device('meta'):
        backbone = xcit.create_model(name, features_only=True, num_classes=3, global_pool='avg', drop_rate=0.1)
    assert not hasattr(backbone, 'head') and not hasattr(backbone, 'num_classes')
    with pytest.raises(ValueError, match='features_only'):
        xcit.create_model(name, out_indices=(0, 1))
