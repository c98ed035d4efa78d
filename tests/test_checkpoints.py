"""Loading official and timm checkpoints safely, with errors that name the problem."""
import argparse
import logging
import pickle
from pathlib import Path

import pytest
import torch

import xcit
from conftest import Payload, assert_same_weights, perturb_
from xcit.checkpoints import CheckpointError, PretrainedUnavailableError, read_checkpoint, sniff_format

NAME = 'xcit_nano_12_p16_224'


@pytest.fixture(scope='module')
def trained():
    torch.manual_seed(0)
    return perturb_(xcit.create_model(NAME)).eval()


@pytest.mark.parametrize('layout', ['flat', 'model', 'state_dict', 'ddp', 'training'])
def test_official_layouts_load(tmp_path, trained, layout):
    sd = trained.state_dict()
    obj = {
        'flat': sd,
        'model': {'model': sd},
        'state_dict': {'state_dict': sd, 'epoch': 3},
        'ddp': {f'module.{k}': v for k, v in sd.items()},
        # what main.py writes each epoch, argparse args included
        'training': {'model': sd, 'optimizer': {}, 'epoch': 1, 'args': argparse.Namespace(lr=1e-3)},
    }[layout]
    path = tmp_path / 'ckpt.pth'
    torch.save(obj, path)
    model = xcit.create_model(NAME, checkpoint_path=path)
    assert_same_weights(model, trained)


def test_ema_weights_on_request(tmp_path, trained):
    fresh = xcit.create_model(NAME).state_dict()
    path = tmp_path / 'ema.pth'
    torch.save({'model': fresh, 'model_ema': trained.state_dict()}, path)
    model = xcit.create_model(NAME)
    xcit.load_checkpoint(model, path, use_ema=True)
    assert_same_weights(model, trained)
    with pytest.raises(CheckpointError, match='no model_ema'):
        xcit.load_checkpoint(model, {'model': fresh}, use_ema=True)


def test_timm_layout_loads(trained):
    from xcit.models.xcit import timm_state_dict
    timm_sd = timm_state_dict(trained.state_dict())
    assert 'pos_embed.token_projection.weight' in timm_sd and 'cls_attn_blocks.0.attn.q.weight' in timm_sd
    model = xcit.create_model(NAME)
    xcit.load_checkpoint(model, timm_sd)
    assert_same_weights(model, trained)


def test_missing_num_batches_tracked_is_tolerated(trained):
    sd = {k: v for k, v in trained.state_dict().items() if not k.endswith('num_batches_tracked')}
    model = xcit.create_model(NAME)
    result = xcit.load_checkpoint(model, sd)
    assert result.missing == []
    assert_same_weights(model, trained)


def test_mismatch_names_missing_unexpected_and_misshaped_keys(trained):
    sd = dict(trained.state_dict())
    del sd['blocks.3.attn.temperature']
    sd['blocks.99.gamma1'] = torch.ones(128)
    sd['norm.weight'] = torch.ones(64)
    model = xcit.create_model(NAME)
    with pytest.raises(CheckpointError) as err:
        xcit.load_checkpoint(model, sd)
    message = str(err.value)
    assert 'missing from the checkpoint (1): blocks.3.attn.temperature' in message
    assert 'unexpected in the checkpoint (1): blocks.99.gamma1' in message
    assert 'norm.weight: checkpoint (64,) vs model (128,)' in message
    before = model.state_dict()['blocks.0.gamma1'].clone()
    result = xcit.load_checkpoint(model, sd, strict=False)  # loads everything that fits
    assert result.missing == ['blocks.3.attn.temperature'] and result.unexpected == ['blocks.99.gamma1']
    assert torch.equal(model.blocks[0].gamma1, trained.blocks[0].gamma1) and not torch.equal(before, trained.blocks[0].gamma1)


def test_checkpoint_of_another_size_is_refused(tmp_path, trained):
    path = tmp_path / 'nano.pth'
    torch.save({'model': trained.state_dict()}, path)
    with pytest.raises(CheckpointError, match='does not fit xcit_tiny_12_p16_224'):
        xcit.create_model('xcit_tiny_12_p16_224', checkpoint_path=path)


def test_new_class_count_starts_a_new_head(tmp_path, trained, caplog):
    path = tmp_path / 'in1k.pth'
    torch.save({'model': trained.state_dict()}, path)
    with caplog.at_level(logging.WARNING):
        model = xcit.create_model(NAME, num_classes=10, checkpoint_path=path)
    assert 'head.weight, head.bias' in caplog.text
    assert model.head.out_features == 10 and torch.equal(model.blocks[5].gamma2, trained.blocks[5].gamma2)
    features = xcit.create_model(NAME, num_classes=0, checkpoint_path=path)  # e.g. a DINO-style feature extractor
    assert torch.equal(features.norm.weight, trained.norm.weight)
    # without asking for a new head, a class-count mismatch is an error that says what to do
    small = xcit.create_model(NAME, num_classes=10)
    torch.save(small.state_dict(), tmp_path / 'ten.pth')
    with pytest.raises(CheckpointError, match='num_classes'):
        xcit.create_model(NAME, checkpoint_path=tmp_path / 'ten.pth')


def test_pth_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / 'pwned'
    path = tmp_path / 'evil.pth'
    torch.save({'model': {'w': torch.ones(1)}, 'x': Payload(marker)}, path)
    with pytest.raises(CheckpointError, match='refused'):
        xcit.create_model(NAME, checkpoint_path=path)
    assert not marker.exists()


@pytest.mark.parametrize('protocol', [2, 4])
def test_pdparams_that_runs_code_is_refused(tmp_path, protocol):
    marker = tmp_path / 'pwned'
    path = tmp_path / 'evil.pdparams'
    with open(path, 'wb') as f:
        pickle.dump({'backbone.cls_token': Payload(marker)}, f, protocol=protocol)
    with pytest.raises(CheckpointError, match='refused.*code, not weights'):
        read_checkpoint(path)
    assert not marker.exists()


def test_damaged_files_give_one_line_errors(tmp_path, trained):
    good = tmp_path / 'good.pth'
    torch.save({'model': trained.state_dict()}, good)
    data = good.read_bytes()
    cases = {
        'empty.pth': (b'', 'empty'),
        'truncated.pth': (data[: len(data) // 2], 'truncated or corrupt'),
        'photo.pth': (b'\xff\xd8\xff\xe0' + b'\x00' * 64, 'not a checkpoint'),
        'notes.pth': (b'just some text\n', 'not a checkpoint'),
    }
    for filename, (content, reason) in cases.items():
        path = tmp_path / filename
        path.write_bytes(content)
        with pytest.raises(CheckpointError, match=reason) as err:
            xcit.create_model(NAME, checkpoint_path=path)
        assert str(path) in str(err.value) and '\n' not in str(err.value)
    with pytest.raises(CheckpointError, match='no such file'):
        xcit.create_model(NAME, checkpoint_path=tmp_path / 'absent.pth')


def test_format_is_sniffed_not_guessed_from_the_extension(tmp_path, trained):
    path = tmp_path / 'weights.bin'
    torch.save(trained.state_dict(), path)
    assert sniff_format(path) == 'torch'
    legacy = tmp_path / 'legacy.pth'
    torch.save(trained.state_dict(), legacy, _use_new_zipfile_serialization=False)
    assert sniff_format(legacy) == 'torch-legacy'
    model = xcit.create_model(NAME, checkpoint_path=legacy)
    assert_same_weights(model, trained)


@pytest.mark.parametrize('header_bytes', [0x80, 0x8880])
def test_a_safetensors_header_length_that_starts_like_a_pickle_is_still_safetensors(tmp_path, header_bytes):
    """The first byte of a safetensors file is the low byte of its header length: 0x80 is also the pickle marker."""
    from safetensors.torch import save_file
    tensors = {'w': torch.arange(6.0).reshape(2, 3)}
    path = tmp_path / 'weights.safetensors'
    save_file(tensors, path, metadata={'pad': ''})
    shortest = int.from_bytes(path.read_bytes()[:8], 'little')
    for padding in range(header_bytes - shortest - 8, header_bytes - shortest + 1):  # the header padded to 8
        save_file(tensors, path, metadata={'pad': 'x' * padding})
        if int.from_bytes(path.read_bytes()[:8], 'little') == header_bytes:
            break
    assert path.read_bytes()[0] == 0x80
    assert sniff_format(path) == 'safetensors'
    assert torch.equal(read_checkpoint(path)['w'], tensors['w'])


def test_pretrained_download_from_a_file_url(tmp_path, trained, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'hub'))
    published = tmp_path / 'published' / 'xcit_nano_12_p16_224.pth'
    published.parent.mkdir()
    torch.save({'model': trained.state_dict()}, published)
    overlay = dict(url=published.as_uri())
    model = xcit.create_model(NAME, pretrained=True, pretrained_cfg_overlay=overlay)
    assert_same_weights(model, trained)
    cached = Path(torch.hub.get_dir()) / 'checkpoints' / 'xcit_nano_12_p16_224.pth'
    assert cached.is_file() and str(cached).startswith(str(tmp_path))
    published.unlink()  # the second call is served from the cache
    assert_same_weights(xcit.create_model(NAME, pretrained=True, pretrained_cfg_overlay=overlay), trained)


def test_offline_download_names_the_url_and_the_local_alternative(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'hub'))
    url = 'http://127.0.0.1:9/xcit/xcit_nano_12_p16_224.pth'  # nothing listens on the discard port
    with pytest.raises(PretrainedUnavailableError) as err:
        xcit.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(url=url))
    message = str(err.value)
    assert url in message and "checkpoint_path='/path/to/xcit_nano_12_p16_224.pth'" in message
    assert not (Path(torch.hub.get_dir()) / 'checkpoints' / 'xcit_nano_12_p16_224.pth').exists()


def test_generic_file_names_are_cached_per_model(tmp_path, trained, monkeypatch):
    """Two weight tags served as `pytorch_model.bin` must not share one cache file."""
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'hub'))
    for tag, scale in (('fb_in1k', 1.0), ('fb_dist_in1k', 2.0)):
        folder = tmp_path / tag
        folder.mkdir()
        torch.save({k: v * scale if v.is_floating_point() else v for k, v in trained.state_dict().items()},
                   folder / 'pytorch_model.bin')
    first = xcit.create_model(f'{NAME}.fb_in1k', pretrained=True,
                              pretrained_cfg_overlay=dict(url=(tmp_path / 'fb_in1k' / 'pytorch_model.bin').as_uri()))
    second = xcit.create_model(f'{NAME}.fb_dist_in1k', pretrained=True,
                               pretrained_cfg_overlay=dict(url=(tmp_path / 'fb_dist_in1k' / 'pytorch_model.bin').as_uri()))
    assert torch.equal(second.norm.weight, 2 * first.norm.weight)
