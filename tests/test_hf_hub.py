"""The Hugging Face Hub both ways: timm-style folders and repos load here and in timm, offline from the Hub
cache, as the fallback of a failing release URL, and with one clear error when nothing can supply them."""
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import xcit
from conftest import assert_same_weights, cli, perturb_, run_cli, tiny_run_config
from xcit.checkpoints import CheckpointError, PretrainedUnavailableError
from xcit.registry import get_model_entry

NAME = 'xcit_nano_12_p16_224'
REPO = f'timm/{NAME}.fb_in1k'
COMMIT = hashlib.sha1(b'a snapshot').hexdigest()
FILES = {'config.json', 'model.safetensors', 'README.md'}


@pytest.fixture(scope='module')
def nano():
    """A 4-block nano with 10 classes and weights away from their initialisation."""
    torch.manual_seed(0)
    return perturb_(xcit.create_model(NAME, num_classes=10, depth=4)).eval()


@pytest.fixture(scope='module')
def images():
    return torch.randn(2, 3, 48, 64, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hub cache, offline: huggingface_hub read the environment at import, so its constants are set too."""
    import huggingface_hub.constants as constants
    cache = tmp_path / 'hf' / 'hub'
    cache.mkdir(parents=True)
    for name, value in (('HF_HUB_OFFLINE', '1'), ('HF_HOME', str(tmp_path / 'hf')), ('HF_HUB_CACHE', str(cache))):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(cache))
    return cache


def cache_repo(cache: Path, repo_id: str, folder: Path) -> None:
    """Lay `folder`'s files out as the Hub cache keeps a downloaded repo: content-named blobs, a snapshot of
    links to them per commit, and the commit `main` points to."""
    root = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = root / 'snapshots' / COMMIT
    snapshot.mkdir(parents=True)
    (root / 'blobs').mkdir()
    for path in folder.iterdir():
        blob = root / 'blobs' / hashlib.sha256(path.read_bytes()).hexdigest()
        shutil.copyfile(path, blob)
        (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
    (root / 'refs').mkdir()
    (root / 'refs' / 'main').write_text(COMMIT)


def logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


def test_a_saved_folder_loads_in_timm_and_here(tmp_path, nano, images):
    import timm
    labels = [f'digit {i}' for i in range(10)]
    folder = xcit.save_pretrained(nano, tmp_path / 'nano', label_names=labels, model_args=dict(depth=4),
                                  metrics={'top1': 97.25}, config={'train': {'epochs': 3}})
    assert {p.name for p in folder.iterdir()} == FILES
    config = json.loads((folder / 'config.json').read_text())
    assert (config['architecture'], config['num_classes'], config['num_features']) == (NAME, 10, 128)
    assert config['label_names'] == labels and config['pretrained_cfg']['num_classes'] == 10
    assert not {'url', 'hf_hub_id'} & set(config['pretrained_cfg'])  # where the release came from is not this copy
    card = (folder / 'README.md').read_text()
    assert NAME in card and '| top1 | 97.25 |' in card and 'epochs: 3' in card and 'library_name: timm' in card

    expected = logits(nano, images)
    theirs = timm.create_model(f'local-dir:{folder}', pretrained=True)
    assert len(theirs.blocks) == 4
    torch.testing.assert_close(logits(theirs, images), expected, atol=1e-5, rtol=0)
    ours = xcit.create_model(f'local-dir:{folder}', pretrained=True)
    assert_same_weights(ours, nano)
    assert ours.pretrained_cfg['label_names'] == labels and ours.pretrained_cfg['source'] == 'local-dir'


@pytest.mark.parametrize('safe', [True, False], ids=['safetensors', 'pytorch_model.bin'])
def test_a_folder_written_by_timm_loads_here(tmp_path, images, safe, hub_cache):
    import timm
    from timm.models import save_for_hf
    torch.manual_seed(2)
    reference = perturb_(timm.create_model(NAME, num_classes=7)).eval()
    save_for_hf(reference, tmp_path / 'timm', safe_serialization=safe,
                model_config=dict(label_names=[f'class {i}' for i in range(7)]))
    assert (tmp_path / 'timm' / ('model.safetensors' if safe else 'pytorch_model.bin')).is_file()
    expected = logits(reference, images)
    model = xcit.create_model(f'local-dir:{tmp_path / "timm"}', pretrained=True)
    assert isinstance(model, xcit.XCiT) and model.num_classes == 7
    assert model.pretrained_cfg['label_names'][6] == 'class 6'
    torch.testing.assert_close(logits(model, images), expected, atol=1e-5, rtol=0)
    cache_repo(hub_cache, 'someone/nano', tmp_path / 'timm')  # any repo in that layout, whichever weight file
    torch.testing.assert_close(logits(xcit.create_model('hf-hub:someone/nano', pretrained=True), images), expected,
                               atol=1e-5, rtol=0)


def test_an_hf_hub_name_loads_from_the_offline_cache(tmp_path, capsys, hub_cache, nano):
    labels = [f'label {i}' for i in range(10)]
    cache_repo(hub_cache, REPO, xcit.save_pretrained(nano, tmp_path / 'nano', model_args=dict(depth=4),
                                                     label_names=labels))
    for name in (f'hf-hub:{REPO}', f'hf-hub:{REPO}@{COMMIT}'):
        model = xcit.create_model(name, pretrained=True)
        assert_same_weights(model, nano)
        assert model.pretrained_cfg['hf_hub_id'] == name.removeprefix('hf-hub:')
    fresh = xcit.create_model(f'hf-hub:{REPO}', num_classes=3)  # the architecture alone, a new classifier
    assert fresh.num_classes == 3 and len(fresh.blocks) == 4
    # the CLI takes the repo's weights and label names
    image = tmp_path / 'photo.png'
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(image)
    code, out, err = cli(capsys, 'predict', image, '--model', f'hf-hub:{REPO}', '--topk', '1')
    assert code == 0 and len(out) == 1 and out[0].split(': ')[1].rsplit(' ', 1)[0] in labels, (out, err)


def test_offline_without_a_cache_says_which_repo_and_what_to_do(hub_cache):
    with pytest.raises(PretrainedUnavailableError) as err:
        xcit.create_model(f'hf-hub:{REPO}', pretrained=True)
    message = str(err.value)
    assert '\n' not in message and f'hf-hub:{REPO}' in message and 'HF_HUB_OFFLINE' in message
    assert f'hf download {REPO}' in message and "create_model('local-dir:DIR', pretrained=True)" in message


def test_the_cli_reports_an_unreachable_repo_in_one_line(tmp_path, hub_cache):
    """In a fresh interpreter, so the Hub library reads HF_HUB_OFFLINE and the cache location from the environment."""
    image = tmp_path / 'photo.png'
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(image)
    proc = run_cli('predict', image, '--model', f'hf-hub:{REPO}')
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and 'Traceback' not in proc.stderr, proc.stderr
    assert lines[0].startswith('xcit predict: error: ') and f'hf-hub:{REPO}' in lines[0]
    assert str(hub_cache) in lines[0] and 'local-dir:DIR' in lines[0]


def test_a_failing_release_url_falls_back_to_the_hub_and_says_so(tmp_path, monkeypatch, hub_cache, caplog):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    monkeypatch.setitem(get_model_entry(NAME).cfgs['fb_in1k'], 'url', (tmp_path / 'gone.pth').as_uri())
    with pytest.raises(PretrainedUnavailableError) as err:  # neither source: both are named
        xcit.create_model(f'{NAME}.fb_in1k', pretrained=True, depth=4, num_classes=10)
    assert 'gone.pth' in str(err.value) and f'hf-hub:{REPO}' in str(err.value)

    torch.manual_seed(3)
    published = perturb_(xcit.create_model(NAME, depth=4)).eval()
    cache_repo(hub_cache, REPO, xcit.save_pretrained(published, tmp_path / 'published'))
    with caplog.at_level(logging.INFO, logger='xcit'):
        model = xcit.create_model(f'{NAME}.fb_in1k', pretrained=True, depth=4)
    assert_same_weights(model, published)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any('release URL failed' in m and f'hf-hub:{REPO}' in m for m in warned), caplog.text
    assert any(f'weights from the Hugging Face Hub, hf-hub:{REPO}' in r.getMessage() for r in caplog.records)


def test_every_published_xcit_tag_names_timms_hub_copy():
    import timm
    on_timm = set(timm.list_pretrained('xcit_*'))
    ours = xcit.list_models('xcit_*', pretrained=True)
    assert on_timm <= set(ours)
    for name in ours:
        hub_id = xcit.get_pretrained_cfg(name).get('hf_hub_id')
        assert hub_id == (timm.get_pretrained_cfg(name).hf_hub_id if name in on_timm else None), name
    # a URL put in the registry's place is not the Hub copy's file: no fallback to other weights
    overlaid = xcit.create_model(NAME, pretrained_cfg_overlay=dict(url='file:///elsewhere.pth'), depth=1)
    assert 'hf_hub_id' not in overlaid.pretrained_cfg


def test_export_hub_dir_writes_the_three_files(tmp_path, capsys, images):
    torch.manual_seed(5)
    trained = perturb_(xcit.create_model(NAME, num_classes=10)).eval()
    checkpoint = tmp_path / 'run.pth'
    classes = [str(i) for i in range(10)]
    torch.save({'model': trained.state_dict(), 'classes': classes, 'best': {'metric': 'top1', 'value': 88.5}},
               checkpoint)
    code, out, err = cli(capsys, 'export', '--model', NAME, '--checkpoint', checkpoint, '--hub-dir', tmp_path / 'hub')
    assert code == 0 and err == [] and 'hub' in out[-1], (out, err)
    folder = tmp_path / 'hub'
    assert {p.name for p in folder.iterdir()} == FILES
    assert json.loads((folder / 'config.json').read_text())['label_names'] == classes
    assert '| top1 | 88.5 |' in (folder / 'README.md').read_text()
    from safetensors import safe_open
    with safe_open(str(folder / 'model.safetensors'), 'pt') as f:
        keys, metadata = set(f.keys()), f.metadata()
    assert 'pos_embed.token_projection.weight' in keys and 'cls_attn_blocks.0.attn.q.weight' in keys  # timm's names
    assert metadata['format'] == 'pt'
    loaded = xcit.create_model(f'local-dir:{folder}', pretrained=True)
    torch.testing.assert_close(logits(loaded, images), logits(trained, images), atol=0, rtol=0)


def test_a_trained_demo_model_exported_for_the_hub_gives_timm_our_logits(tmp_path, capsys):
    """The user's path: train on the built-in digits, `xcit export --hub-dir`, then timm's local-dir loader."""
    import timm
    config = tiny_run_config(tmp_path, **{'schedule.epochs': 1})
    assert cli(capsys, 'train', '-c', config)[0] == 0
    run = tmp_path / 'runs' / 'tiny'
    code, out, err = cli(capsys, 'export', '--model', 'xcit_nano_12_p8_224', '--checkpoint', run / 'last.pth',
                         '--hub-dir', tmp_path / 'hub')
    assert code == 0 and err == [], (out, err)
    ours = xcit.create_model('xcit_nano_12_p8_224', depth=2, num_classes=10, checkpoint_path=run / 'last.pth').eval()
    theirs = timm.create_model(f'local-dir:{tmp_path / "hub"}', pretrained=True).eval()
    digits = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(theirs(digits), ours(digits), atol=1e-5, rtol=1e-5)


def test_a_family_timm_lacks_keeps_our_layout(tmp_path, images):
    torch.manual_seed(4)
    model = perturb_(xcit.create_model('fcvit_tiny', num_classes=5)).eval()
    folder = xcit.save_pretrained(model, tmp_path / 'fcvit')
    assert json.loads((folder / 'config.json').read_text())['architecture'] == 'fcvit_tiny'
    assert 'library_name' not in (folder / 'README.md').read_text()
    loaded = xcit.create_model(f'local-dir:{folder}', pretrained=True)
    torch.testing.assert_close(logits(loaded, images), logits(model, images), atol=0, rtol=0)


def test_push_to_hub_uploads_the_saved_folder(monkeypatch, nano):
    import huggingface_hub
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            self.token = token

        def create_repo(self, repo_id, private=None, exist_ok=False):
            calls.append(('create', repo_id, exist_ok))
            return huggingface_hub.RepoUrl(f'https://huggingface.co/{repo_id}')

        def upload_folder(self, repo_id, folder_path, commit_message, revision, create_pr):
            folder = Path(folder_path)
            calls.append(('upload', repo_id, {p.name for p in folder.iterdir()}, (folder / 'README.md').read_text()))
            return 'commit'

    monkeypatch.setattr(huggingface_hub, 'HfApi', FakeApi)
    assert xcit.push_to_hub(nano, 'me/nano', model_args=dict(depth=4)) == 'commit'
    (_, created, exist_ok), (_, uploaded, files, card) = calls
    assert created == uploaded == 'me/nano' and exist_ok and files == FILES
    assert "xcit.create_model('hf-hub:me/nano', pretrained=True)" in card


def test_bad_hub_names_and_folders_are_one_clear_line(tmp_path, monkeypatch, capsys):
    with pytest.raises(CheckpointError, match='no config.json'):
        xcit.create_model(f'local-dir:{tmp_path}', pretrained=True)
    (tmp_path / 'config.json').write_text(json.dumps({'architecture': 'resnet18', 'num_classes': 1000}))
    with pytest.raises(CheckpointError, match="'resnet18', which this package does not implement"):
        xcit.create_model(f'local-dir:{tmp_path}')
    (tmp_path / 'config.json').write_text(json.dumps({'architecture': NAME, 'num_classes': 4}))
    code, _, err = cli(capsys, 'export', '--model', f'local-dir:{tmp_path}', '--hub-dir', tmp_path / 'out')
    assert code == 2 and len(err) == 1 and 'holds no weights' in err[0], err
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(tmp_path / 'photo.png')
    code, _, err = cli(capsys, 'predict', tmp_path / 'photo.png', '--model', NAME)  # a registered name brings none
    assert code == 2 and len(err) == 1 and '--checkpoint is required' in err[0], err
    monkeypatch.setitem(__import__('sys').modules, 'huggingface_hub', None)  # not installed
    with pytest.raises(ValueError, match=r'pip install "xcit\[hub\]"'):
        xcit.create_model(f'hf-hub:{REPO}')
