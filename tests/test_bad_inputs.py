"""What a hostile or careless user can feed the package: each bad input is one clear line and exit code 2."""
import errno
import logging
import os
import pickle
import random
import struct
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import xcit
from conftest import Payload, cli, perturb_
from xcit.checkpoints import CheckpointError, WriteError, read_checkpoint
from xcit.checkpoints.paddle import write_paddle_pickle
from xcit.config import Config, ConfigError, load_config

NAME = 'xcit_nano_12_p16_224'
DIGITS = str(Path(__file__).resolve().parents[1] / 'configs' / 'demo' / 'digits_xcit.yaml')


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    return perturb_(xcit.create_model(NAME, num_classes=10)).eval()


@pytest.fixture
def weights(tmp_path, model) -> Path:
    path = tmp_path / 'weights.pth'
    torch.save({'model': model.state_dict()}, path)
    return path


def assert_one_error(code, err, *needles):
    assert code == 2, err
    assert len(err) == 1 and 'Traceback' not in err[0] and err[0].startswith('xcit '), err
    for needle in needles:
        assert needle in err[0], (needle, err[0])


def _png(path: Path, value: int = 0, size=(12, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, dtype=np.uint8)).save(path)
    return path


def _bomb_png(path: Path, side: int = 100_000) -> Path:
    """A few dozen bytes whose header declares side x side pixels: PIL refuses it at open."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
    header = struct.pack('>IIBBBBB', side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', zlib.compress(b''))
                     + chunk(b'IEND', b''))
    return path


# --- 1. Paddle pickles of arrays that are not numbers --------------------------------------------

@pytest.mark.parametrize('protocol', [2, 4])
@pytest.mark.parametrize('array', [np.array(['weights', 'text']), np.array([1.5, 'x'], dtype=object),
                                   np.zeros(3, dtype='V4'), np.zeros(2, dtype='datetime64[s]'),
                                   np.zeros(2, dtype=[('a', '<f4'), ('b', '<i4')])],
                         ids=['str', 'object', 'void', 'datetime', 'record'])
def test_paddle_arrays_that_are_not_numbers_are_refused_by_name(tmp_path, array, protocol):
    path = tmp_path / 'odd.pdparams'
    with open(path, 'wb') as f:
        pickle.dump({'backbone.cls_token': np.zeros(3, np.float32), 'backbone.pos_embed.weird': array}, f,
                    protocol=protocol)
    with pytest.raises(CheckpointError, match="entry 'backbone.pos_embed.weird' holds .*not") as err:
        read_checkpoint(path)
    assert str(path) in str(err.value) and '\n' not in str(err.value)


def test_paddle_array_in_a_nested_checkpoint_is_named_by_its_path(tmp_path, capsys):
    path = tmp_path / 'epoch_1.pd'
    with open(path, 'wb') as f:
        pickle.dump({'state_dict': {'Student.w': np.array(['a'])}, 'epoch': 1}, f, protocol=4)
    code, _, err = cli(capsys, 'convert', path, tmp_path / 'out.pth')
    assert_one_error(code, err, str(path), "'state_dict.Student.w'", 'text')


def test_big_endian_paddle_arrays_keep_their_values(tmp_path):
    path = tmp_path / 'be.pdparams'
    values = np.arange(6, dtype='>f4').reshape(2, 3)
    with open(path, 'wb') as f:
        pickle.dump({'backbone.w': values}, f, protocol=4)
    assert torch.equal(read_checkpoint(path)['backbone.w'], torch.arange(6.0).reshape(2, 3))


def test_paddle_pickle_cannot_reach_other_codecs(tmp_path):
    import codecs

    class Rot13:
        def __reduce__(self):
            return codecs.encode, ('payload', 'rot13')

    path = tmp_path / 'codec.pdparams'
    path.write_bytes(pickle.dumps({'backbone.w': Rot13()}, protocol=2))
    with pytest.raises(CheckpointError, match="refused.*'rot13'"):
        read_checkpoint(path)


def test_pickle_that_references_one_list_a_billion_times_loads_at_once(tmp_path, capsys):
    nested = [np.zeros(1, np.float32)]
    for _ in range(30):
        nested = [nested, nested]  # 2**30 paths to one array, in a few hundred bytes
    path = tmp_path / 'laughs.pdparams'
    path.write_bytes(pickle.dumps({'backbone.w': nested}, protocol=4))
    assert path.stat().st_size < 1000
    start = time.perf_counter()
    code, _, err = cli(capsys, 'convert', path, tmp_path / 'out.pth')
    assert time.perf_counter() - start < 10
    assert_one_error(code, err, str(path), 'not tensors')


def test_stored_config_alias_bomb_in_a_training_checkpoint(tmp_path, model, capsys):
    nested = ['lol'] * 10
    for _ in range(8):
        nested = [nested] * 10
    path = tmp_path / 'run.pth'
    torch.save({'model': model.state_dict(), 'config': {'optim': {'no_decay_names': nested}}}, path)
    start = time.perf_counter()
    code, _, err = cli(capsys, 'predict', '--model', NAME, '--checkpoint', path, _png(tmp_path / 'i.png'))
    assert time.perf_counter() - start < 30
    assert_one_error(code, err, str(path), 'more than 100,000 values')


# --- 2. NaN and infinity in weights --------------------------------------------------------------

def _nonfinite_state_dict(model, count: int) -> dict:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    names = [k for k, v in state.items() if v.is_floating_point()][:count]
    for i, key in enumerate(names):
        state[key].view(-1)[0] = float('nan') if i % 2 else float('inf')
    return state, names


def test_loading_nonfinite_weights_warns_and_names_them(model, caplog):
    state, names = _nonfinite_state_dict(model, 20)
    target = xcit.create_model(NAME, num_classes=10)
    with caplog.at_level(logging.WARNING):
        xcit.load_checkpoint(target, state)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and '20 tensors hold NaN or infinite values' in warnings[0]
    assert names[0] in warnings[0] and 'and 12 more' in warnings[0]  # the list is capped
    assert names[-1] not in warnings[0]


def test_finite_weights_load_without_a_warning(model, caplog):
    with caplog.at_level(logging.WARNING):
        xcit.load_checkpoint(xcit.create_model(NAME, num_classes=10), model.state_dict())
    assert not [r for r in caplog.records if 'NaN' in r.getMessage()]


def test_convert_refuses_nonfinite_weights_unless_allowed(tmp_path, model, capsys):
    state, names = _nonfinite_state_dict(model, 2)
    src, dst = tmp_path / 'diverged.pth', tmp_path / 'out.safetensors'
    torch.save(state, src)
    code, _, err = cli(capsys, 'convert', src, dst)
    assert_one_error(code, err, str(src), names[0], '--allow-nonfinite')
    assert not dst.exists()
    code, out, _ = cli(capsys, 'convert', src, dst, '--allow-nonfinite')
    assert code == 0 and dst.exists()
    again = xcit.create_model(NAME, num_classes=10, checkpoint_path=dst)
    assert torch.isinf(again.state_dict()[names[0]]).any() and torch.isnan(again.state_dict()[names[1]]).any()


def test_integers_where_the_model_has_floats_are_refused(model):
    state = dict(model.state_dict())
    state['norm.weight'] = torch.ones_like(state['norm.weight'], dtype=torch.int64)
    with pytest.raises(CheckpointError, match=r'norm.weight: checkpoint torch.int64 vs model torch.float32'):
        xcit.load_checkpoint(xcit.create_model(NAME, num_classes=10), state)


# --- 3. YAML alias bombs and values too big to quote ---------------------------------------------

def _alias_bomb(path: Path, levels: int = 9) -> Path:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f'a{i}: &a{i} [' + ', '.join([f'*a{i - 1}'] * 9) + ']' for i in range(1, levels)]
    lines.append(f'data: {{mean: *a{levels - 1}}}')  # 9**9 strings once expanded
    path.write_text('\n'.join(lines) + '\n')
    return path


def test_yaml_alias_bomb_is_refused_without_expanding(tmp_path, capsys):
    bomb = _alias_bomb(tmp_path / 'lol.yaml')
    start = time.perf_counter()
    with pytest.raises(ConfigError, match='more than 100,000 values'):
        load_config(bomb)
    assert time.perf_counter() - start < 5
    code, _, err = cli(capsys, 'eval', '-c', bomb, '--load', tmp_path / 'unused.pth')
    assert_one_error(code, err, 'lol.yaml', 'YAML aliases')


def test_self_referencing_yaml_is_refused(tmp_path):
    with pytest.raises(ConfigError, match='nested more than'):
        load_config(_write(tmp_path / 'loop.yaml', 'data: &x {mean: [*x]}\n'))


def test_deeply_nested_yaml_is_refused(tmp_path):
    with pytest.raises(ConfigError, match='nested too deeply'):
        load_config(_write(tmp_path / 'deep.yaml', 'a: ' + '[' * 3000 + ']' * 3000 + '\n'))


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_config_errors_quote_at_most_a_few_hundred_characters(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config([], ["data.interpolation='" + 'x' * 10_000_000 + "'"])
    assert len(str(err.value)) < 400
    with pytest.raises(ConfigError) as err:
        load_config([], ["data.interpolation='" + 'x' * 100_000 + "'"])
    assert len(str(err.value)) < 400 and 'data.interpolation' in str(err.value)
    listed = _write(tmp_path / 'list.yaml', yaml.safe_dump({'optim': {'no_decay_names': list(range(20_000))}}))
    with pytest.raises(ConfigError) as err:
        load_config(listed)
    message = str(err.value)
    assert len(message) < 1000 and 'optim.no_decay_names' in message and 'and 19995 more' in message
    with pytest.raises(ConfigError) as err:
        load_config([], ['data.' + 'k' * 1_000_000 + '=1'])
    assert len(str(err.value)) < 400 and 'unknown key' in str(err.value)


def test_huge_config_file_is_refused_before_parsing(tmp_path):
    big = tmp_path / 'big.yaml'
    big.write_text('# padding\n' * 200_000)
    with pytest.raises(ConfigError, match='not a config file'):
        load_config(big)


# --- 4. Absurd sizes -----------------------------------------------------------------------------

@pytest.mark.parametrize('override,bound', [('data.image_size=100000', '4096'), ('data.digits_size=100000', '512'),
                                            ('data.batch_size=10000000', '65536'),
                                            ('data.eval_batch_size=10000000', '65536'),
                                            ('data.num_workers=100000', '256'),
                                            ('augment.repeated_aug=1000000000', '64')])
def test_absurd_sizes_are_refused_with_the_bound(override, bound):
    with pytest.raises(ConfigError, match=bound) as err:
        load_config([], [override])
    assert override.split('=')[0] in str(err.value)


def test_a_batch_that_cannot_fit_in_memory_is_refused():
    with pytest.raises(ConfigError, match=r'data.batch_size=1000 at image_size 4096.*GiB.*at most 85'):
        load_config([], ['data.image_size=4096', 'data.batch_size=1000'])
    config = load_config([], ['data.image_size=4096', 'data.batch_size=85'])  # the largest that fits
    assert config.data.batch_size == 85


def test_other_nonsense_values_are_refused():
    for override, needle in [('data.std=(0.5, 0.0, 0.5)', 'std'), ('augment.scale=(0.9, 0.1)', 'min <= max'),
                             ('data.interpolation="cubic"', 'bicubic'), ('seed=-1', 'seed'),
                             ('optim.betas=(0.9, 1.5)', 'beta'), ('data.num_workers=-1', 'num_workers'),
                             ('optim.lr=1e999', 'finite')]:
        with pytest.raises(ConfigError, match=needle):
            load_config([], [override])


def test_yaml_nan_and_infinity_are_refused(tmp_path):
    for text in ('augment: {mixup: .nan}\n', 'schedule: {warmup_epochs: .inf}\n'):
        with pytest.raises(ConfigError, match='finite number'):
            load_config(_write(tmp_path / 'c.yaml', text))


# --- 5. Booleans are not numbers -----------------------------------------------------------------

def _numeric_fields():
    """(key, a valid value for it) for every field of the schema that holds ints or floats."""
    tuples = {'augment.scale': (0.5, 1.0), 'augment.ratio': (0.5, 1.0), 'optim.betas': (0.9, 0.99),
              'data.mean': (0.5, 0.5, 0.5), 'data.std': (0.5, 0.5, 0.5), 'scenes.digit_sizes': (20, 72),
              'augment.crop_size': (64, 64), 'dino.global_crops_scale': (0.4, 1.0),
              'dino.local_crops_scale': (0.05, 0.4), 'dino.blur_radius': (0.1, 2.0)}
    found = []

    def walk(model, prefix):
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, xcit.config._Section):
                walk(annotation, prefix + name + '.')
                continue
            text = str(annotation)
            if 'dict' in text or not ('int' in text or 'float' in text):
                continue
            key = prefix + name
            found.append((key, tuples[key] if 'tuple' in text else field.default))
    walk(Config, '')
    return found


def test_every_numeric_field_refuses_booleans():
    fields = _numeric_fields()
    assert len(fields) > 30
    for key, valid in fields:
        for flag in (True, False):
            value = (flag, *valid[1:]) if isinstance(valid, tuple) else flag
            with pytest.raises(ConfigError, match=f"'{key}': expected a number, not a boolean"):
                load_config([], [f'{key}={value!r}'])


def test_batch_size_true_on_the_command_line(tmp_path, capsys):
    config = _write(tmp_path / 'c.yaml', 'data: {dataset: digits}\n')
    code, _, err = cli(capsys, 'eval', '-c', config, '-o', 'data.batch_size=True', '--load', tmp_path / 'w.pth')
    assert_one_error(code, err, 'data.batch_size', 'boolean')


def test_floats_still_take_integers_and_booleans_stay_booleans():
    config = load_config([], ['optim.lr=1', 'augment.scale=(1, 1)', 'train.ema=True'])
    assert config.optim.lr == 1.0 and isinstance(config.optim.lr, float) and config.augment.scale == (1.0, 1.0)
    assert config.train.ema is True


# --- 6. Decompression bombs ----------------------------------------------------------------------

def test_decompression_bomb_is_an_unreadable_image(tmp_path):
    from xcit.data.datasets import IMAGE_ERRORS, FileSource, TransformedDataset, collate
    bomb = _bomb_png(tmp_path / 'bomb.png')
    assert bomb.stat().st_size < 100
    with pytest.raises(Image.DecompressionBombError):
        Image.open(bomb)
    good = [_png(tmp_path / f'{i}.png', value=i) for i in range(3)]
    source = FileSource([(str(good[0]), 0), (str(bomb), 1), (str(good[1]), 0), (str(good[2]), 1)], ['a', 'b'])
    with pytest.raises(IMAGE_ERRORS):
        source.load(1)
    as_tensor = lambda img: torch.tensor(np.asarray(img), dtype=torch.float32)  # noqa: E731
    train = TransformedDataset(source, as_tensor, training=True)
    image, target, skipped = train[1]
    assert skipped == [str(bomb)] and image[0, 0, 0] == 1  # the next image took its place
    val = TransformedDataset(source, as_tensor, training=False)
    images, targets, skipped = collate([val[i] for i in range(4)])
    assert len(images) == 3 and skipped == [str(bomb)]


def test_predict_reports_a_decompression_bomb_and_goes_on(tmp_path, weights, capsys):
    bomb = _bomb_png(tmp_path / 'bomb.png')
    good = _png(tmp_path / 'good.png')
    code, out, err = cli(capsys, 'predict', '--model', NAME, '--checkpoint', weights, bomb, good)
    assert_one_error(code, err, str(bomb), 'cannot read the image')
    assert len(out) == 1 and out[0].startswith(f'{good}: ')


# --- 7. A full disk while writing ----------------------------------------------------------------

def _disk_fills_up(monkeypatch):
    """torch.save that writes a few bytes, then finds the disk full."""
    def save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)):
            with open(f, 'wb') as handle:
                handle.write(b'PK\x03\x04partial')
        else:
            f.write(b'PK\x03\x04partial')
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(torch, 'save', save)


def test_full_disk_keeps_the_previous_last_checkpoint(tmp_path, monkeypatch):
    from xcit.engine.checkpoint import CheckpointWriter
    writer = CheckpointWriter(tmp_path, keep_last=2)
    writer.save_last({'step': torch.tensor(1)})
    before = writer.last.read_bytes()
    _disk_fills_up(monkeypatch)
    with pytest.raises(OSError) as err:
        writer.save_last({'step': torch.tensor(2)})
    assert isinstance(err.value, WriteError) and err.value.errno == errno.ENOSPC
    assert str(err.value) == f'cannot write {writer.last}: No space left on device'
    assert writer.last.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ['last.pth']


def test_failed_copy_of_last_leaves_the_old_copy(tmp_path, monkeypatch):
    import shutil

    from xcit.engine.checkpoint import CheckpointWriter
    writer = CheckpointWriter(tmp_path, keep_last=2)
    writer.save_last({'step': torch.tensor(1)})
    writer._copy_of_last('best.pth')
    best = (tmp_path / 'best.pth').read_bytes()
    writer.save_last({'step': torch.tensor(2)})

    def no_link(*args):
        raise OSError(errno.EXDEV, 'Invalid cross-device link')

    def partial_copy(src, dst):
        Path(dst).write_bytes(b'half')
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(os, 'link', no_link)
    monkeypatch.setattr(shutil, 'copyfile', partial_copy)
    with pytest.raises(WriteError, match='best.pth: No space left'):
        writer._copy_of_last('best.pth')
    assert (tmp_path / 'best.pth').read_bytes() == best
    assert sorted(p.name for p in tmp_path.iterdir()) == ['best.pth', 'last.pth']


@pytest.mark.parametrize('filename', ['out.pth', 'out.pdparams'])
def test_convert_to_a_full_disk(tmp_path, weights, monkeypatch, capsys, filename):
    dst = tmp_path / 'out' / filename
    dst.parent.mkdir()
    dst.write_bytes(b'the previous file')
    _disk_fills_up(monkeypatch)

    def dump(obj, f, protocol=None):
        f.write(b'\x80\x04partial')
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(pickle, 'dump', dump)
    code, out, err = cli(capsys, 'convert', weights, dst)
    assert_one_error(code, err, f'cannot write {dst}: No space left on device')
    assert dst.read_bytes() == b'the previous file' and os.listdir(dst.parent) == [filename]


def test_writing_under_a_file_or_into_an_unwritable_place(tmp_path, weights, capsys):
    blocker = tmp_path / 'notes.txt'
    blocker.write_text('a file, not a folder')
    code, _, err = cli(capsys, 'convert', weights, blocker / 'out.pth')
    assert_one_error(code, err, f'cannot write {blocker / "out.pth"}', 'is a file, not a folder')
    if Path('/proc/self').is_dir():  # a folder nobody, root included, may create files in
        code, _, err = cli(capsys, 'convert', weights, '/proc/xcit-test/out.pth')
        assert_one_error(code, err, 'cannot write /proc/xcit-test/out.pth')
    code, _, err = cli(capsys, 'convert', weights, tmp_path, '--to', 'official')
    assert_one_error(code, err, f'cannot write {tmp_path}', 'directory')


def test_output_in_a_missing_folder_is_created(tmp_path, weights, capsys):
    dst = tmp_path / 'new' / 'sub' / 'w.safetensors'
    code, _, _ = cli(capsys, 'convert', weights, dst)
    assert code == 0 and dst.is_file() and os.listdir(dst.parent) == ['w.safetensors']


# --- 8. What a refused pickle says ---------------------------------------------------------------

class _Shell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


@pytest.mark.parametrize('payload,culprit', [(_Shell, 'system'), (Payload, 'getattr')])
def test_refused_pickle_names_the_global_not_pytorchs_advice(tmp_path, capsys, payload, culprit):
    marker = tmp_path / 'ran'
    src = tmp_path / 'evil.pth'
    torch.save({'model': {'w': torch.ones(1)}, 'hook': payload(marker)}, src)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(src)
    message = str(err.value)
    assert culprit in message and 'could run arbitrary code' in message
    assert 'weights_only' not in message and '\n' not in message
    code, _, err_lines = cli(capsys, 'convert', src, tmp_path / 'out.pth')
    assert_one_error(code, err_lines, culprit, 'refused')
    assert 'weights_only' not in err_lines[0] and not marker.exists()


# --- 9. predict and attention over folders, going on past unreadable files -----------------------

def test_predict_takes_folders_and_reports_each_unreadable_input(tmp_path, weights, capsys):
    folder = tmp_path / 'photos'
    for name in ('b.png', 'a.JPG', 'c.jpeg'):
        _png(folder / name, value=50)
    (folder / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\nnot really')
    (folder / 'notes.txt').write_text('not an image, and not an image name: ignored')
    (folder / 'sub').mkdir()
    missing = tmp_path / 'absent.png'
    code, out, err = cli(capsys, 'predict', '--model', NAME, '--checkpoint', weights, '--topk', '2', folder, missing)
    assert code == 2
    assert [line.split(':')[0] for line in out] == [str(folder / n) for n in ('a.JPG', 'b.png', 'c.jpeg')]
    assert all(len(line.split(',')) == 2 for line in out)
    assert len(err) == 2 and not any('Traceback' in line for line in err)
    assert any(str(missing) in line and 'no such file' in line for line in err)
    assert any(str(folder / 'broken.png') in line and 'cannot read the image' in line for line in err)
    code, out, err = cli(capsys, 'predict', '--model', NAME, '--checkpoint', weights, folder / 'b.png')
    assert code == 0 and len(out) == 1 and err == []


def test_predict_with_nothing_readable_fails_without_loading(tmp_path, capsys):
    empty = tmp_path / 'empty'
    empty.mkdir()
    code, out, err = cli(capsys, 'predict', '--model', NAME, '--checkpoint', tmp_path / 'never-read.pth', empty)
    assert_one_error(code, err, str(empty), 'no image files')
    assert out == []


def test_attention_takes_folders_and_keeps_maps_of_equal_stems(tmp_path, capsys):
    for folder in ('x', 'y'):
        _png(tmp_path / folder / 'cat.png', size=(48, 40))
    (tmp_path / 'y' / 'dog.png').write_text('truncated')
    out_dir = tmp_path / 'maps'
    code, out, err = cli(capsys, 'attention', '--model', NAME, '--image-size', '32', '--out', out_dir,
                         tmp_path / 'x', tmp_path / 'y')
    assert_one_error(code, err, str(tmp_path / 'y' / 'dog.png'))
    assert sorted(p.name for p in out_dir.iterdir()) == ['cat-2_attention.png', 'cat_attention.png']
    assert len(out) == 2


# --- probing as a hostile user -------------------------------------------------------------------

def test_damaged_checkpoints_only_ever_raise_checkpoint_errors(tmp_path, model):
    """Random byte damage to every format: a one-line CheckpointError, never another exception."""
    state = {k: v for k, v in list(model.state_dict().items())[:4]}
    sources = {'zip.pth': lambda p: torch.save({'model': state}, p),
               'legacy.pth': lambda p: torch.save({'model': state}, p, _use_new_zipfile_serialization=False),
               'p4.pdparams': lambda p: write_paddle_pickle({k: v.numpy() for k, v in state.items()}, p),
               'p2.pdparams': lambda p: p.write_bytes(pickle.dumps({k: v.numpy() for k, v in state.items()},
                                                                   protocol=2))}
    rng = random.Random(0)
    for name, write in sources.items():
        path = tmp_path / name
        write(path)
        data = path.read_bytes()
        for _ in range(150):
            damaged = bytearray(data)
            for _ in range(rng.randint(1, 3)):
                i = rng.randrange(len(damaged))
                if rng.random() < 0.7:
                    damaged[i] = rng.randrange(256)
                else:
                    damaged = damaged[:max(i, 1)]
            (tmp_path / 'damaged.bin').write_bytes(damaged)
            with warnings.catch_warnings(record=True) as caught:  # a warning would be a second stderr line
                warnings.simplefilter('always')
                try:
                    read_checkpoint(tmp_path / 'damaged.bin')
                except CheckpointError as e:
                    assert '\n' not in str(e) and len(str(e)) < 600, (name, str(e))
            assert not caught, (name, [str(w.message)[:100] for w in caught])


@pytest.mark.parametrize('case', ['empty', 'truncated', 'folder', 'missing', 'text', 'int-keys', 'other-model',
                                  'bad-stored-config'])
def test_predict_and_export_with_bad_checkpoints(tmp_path, weights, model, capsys, case):
    path = tmp_path / 'bad.pth'
    if case == 'empty':
        path.write_bytes(b'')
    elif case == 'truncated':
        path.write_bytes(weights.read_bytes()[:5000])
    elif case == 'folder':
        path.mkdir()
    elif case == 'text':
        path.write_text('{"model": "not weights"}')
    elif case == 'int-keys':
        torch.save({0: torch.ones(1)}, path)
    elif case == 'other-model':
        torch.save(xcit.create_model('xcit_nano_12_p8_224').state_dict(), path)
    elif case == 'bad-stored-config':
        torch.save({'model': model.state_dict(), 'config': {'data': {'batch_size': True}}}, path)
    image = _png(tmp_path / 'i.png')
    code, _, err = cli(capsys, 'predict', '--model', NAME, '--checkpoint', path, image)
    assert_one_error(code, err, str(path))
    code, _, err = cli(capsys, 'export', '--model', NAME, '--checkpoint', path, '--torchscript', tmp_path / 'm.pt')
    assert_one_error(code, err, str(path))
    assert not (tmp_path / 'm.pt').exists()


def test_checkpoint_for_another_model_is_one_line_naming_both(tmp_path, capsys):
    path = tmp_path / 'p8.pth'
    torch.save(xcit.create_model('xcit_nano_12_p8_224').state_dict(), path)
    code, _, err = cli(capsys, 'predict', '--model', 'xcit_tiny_12_p16_224', '--checkpoint', path,
                       _png(tmp_path / 'i.png'))
    assert_one_error(code, err, 'does not fit xcit_tiny_12_p16_224', 'looks like xcit_nano_12_p8_224')
    assert len(err[0]) <= 2100


@pytest.mark.parametrize('argv,needle', [
    (['predict', '--model', 'xcit_gigantic', '--checkpoint', '{w}', '{img}'], "Unknown model 'xcit_gigantic'"),
    (['predict', '--model', NAME, '--checkpoint', '{w}', '{img}', '--topk', '0'], '--topk must be at least 1'),
    (['predict', '--model', NAME, '--checkpoint', '{w}', '{img}', '--topk', '-3'], '--topk must be at least 1'),
    (['predict', '--model', NAME, '--checkpoint', '{w}', '{img}', '--image-size', '0'], 'between 8 and 4096'),
    (['predict', '--model', NAME, '--checkpoint', '{w}', '{img}', '--image-size', '100000'], 'between 8 and 4096'),
    (['attention', '--model', NAME, '{img}', '--image-size', '-1', '--out', '{tmp}/a'], 'between 0 and 4096'),
    (['attention', '--model', NAME, '{img}', '--xca-block', '40', '--out', '{tmp}/a'], 'out of range'),
    (['attention', '--model', 'cvt_13_224', '{img}', '--out', '{tmp}/a'], 'XCiT'),
    (['attention', '--model', NAME, '{img}', '--out', '{img}'], 'is a file'),
    (['export', '--model', NAME, '--torchscript', '{tmp}', '--image-size', '64'], 'is a folder'),
    (['export', '--model', NAME, '--onnx', '{tmp}/m', '--torchscript', '{tmp}/m'], 'overwrite'),
    (['export', '--model', NAME, '--torchscript', '{tmp}/m.pt', '--image-size', '100000'], 'between 32 and 4096'),
    (['export', '--model', NAME], 'nothing to write'),
    (['export', '--model', NAME, '--hub-dir', '{img}'], 'is a file; give the folder to write'),
    (['models', 'nothing_like_this*'], 'no model matches'),
    (['eval', '-c', DIGITS, '--load', '{w}', '--image-sizes', '32,x'], "--image-sizes: 'x' is not an integer"),
    (['eval', '-c', DIGITS, '--load', '{w}', '--image-sizes', '32,8'], '--image-sizes: 8 is outside 16 to 4096'),
    (['eval', '-c', DIGITS, '--load', '{w}', '--image-sizes', '5000'], '--image-sizes: 5000 is outside 16 to 4096'),
    (['eval', '-c', DIGITS, '--load', '{w}', '--image-sizes', '32', '--compare-model', 'deit_tiny_patch16_224'],
     'which is missing'),
    (['eval', '-c', DIGITS, '--load', '{w}', '--image-sizes', '32', '--compare-load', '{w}', '--compare-model',
      'no_such_net'], "'no_such_net' is neither an xcit nor a timm model"),
    (['eval', '-c', DIGITS, '--load', '{w}', '--out', '{tmp}'], 'go with --image-sizes'),
    (['convert', '{w}', '{tmp}/x.pth', '--model', 'resnet50'], "Unknown model 'resnet50'"),
    (['convert', '{w}', '{tmp}/x.weights'], 'cannot tell the format'),
    (['convert', '{w}', '{tmp}/x.pth', '--use-ema'], 'no model_ema'),
    (['extract-weights', '{w}', '--prefix', '', '-o', '{tmp}/e.pth'], 'prefix is empty'),
    (['extract-weights', '{w}', '--prefix', 'nothing', '-o', '{tmp}/e.pth'], "no entry starts with 'nothing'"),
])
def test_bad_arguments_are_one_line(tmp_path, weights, capsys, argv, needle):
    image = _png(tmp_path / 'i.png')
    argv = [a.format(w=weights, img=image, tmp=tmp_path) for a in argv]
    code, _, err = cli(capsys, *argv)
    assert_one_error(code, err, needle)


def test_convert_onto_its_own_source_is_refused(weights, capsys):
    before = weights.read_bytes()
    for argv in (['convert', weights, weights, '--to', 'timm'],
                 ['extract-weights', weights, '--prefix', 'blocks', '-o', weights]):
        code, _, err = cli(capsys, *argv)
        assert_one_error(code, err, str(weights), 'is the file being read')
    assert weights.read_bytes() == before


def test_extract_prefix_matches_whole_name_parts(tmp_path, capsys):
    src = tmp_path / 'dist.pth'
    torch.save({'Student.w': torch.ones(2), 'StudentX.w': torch.zeros(2), 'Teacher.w': torch.zeros(3)}, src)
    for prefix in ('Student', 'Student.'):
        out = tmp_path / 'student.pth'
        code, _, _ = cli(capsys, 'extract-weights', src, '--prefix', prefix, '--remove-prefix', '-o', out)
        assert code == 0
        assert list(torch.load(out, weights_only=True)['model']) == ['w']


@pytest.mark.parametrize('text,needle', [
    ('- just\n- a list\n', 'expected a mapping'),
    ('data:\n  batchsize: 32\n', "did you mean 'data.batch_size'"),
    ('data: {image_size: -5}\n', 'data.image_size'),
    ('model: [1, 2]\n', "'model'"),
    ('data: {dataset: imagenet}\n', 'data.dataset'),
    ('optim: {lr: fast}\n', 'optim.lr'),
    (': : :\n', 'not valid YAML'),
    ('x: !!python/object/apply:os.system ["true"]\n', 'not valid YAML'),
])
def test_eval_with_bad_configs(tmp_path, capsys, text, needle):
    config = _write(tmp_path / 'c.yaml', text)
    code, _, err = cli(capsys, 'eval', '-c', config, '--load', tmp_path / 'w.pth')
    assert_one_error(code, err, needle)


def test_eval_with_config_files_that_are_not_text(tmp_path, capsys):
    binary = tmp_path / 'photo.yaml'
    binary.write_bytes(b'\xff\xd8\xff\xe0 JFIF binary')
    for path, needle in ((binary, 'not UTF-8'), (tmp_path, 'is a folder'), (tmp_path / 'none.yaml', 'not found')):
        code, _, err = cli(capsys, 'eval', '-c', path, '--load', tmp_path / 'w.pth')
        assert_one_error(code, err, needle)


def test_numeric_annotations_cover_every_number_field():
    """Guards the boolean test: its field walk sees the int and float fields this module knows of."""
    keys = {key for key, _ in _numeric_fields()}
    assert {'data.batch_size', 'data.image_size', 'seed', 'optim.lr', 'augment.scale', 'train.keep_last'} <= keys
    assert 'train.ema' not in keys and 'model.kwargs' not in keys and 'data.on_corrupt' not in keys


def test_state_dicts_with_damaged_shapes_only_raise_checkpoint_errors():
    """Zero-dimensional or oddly shaped entries, in our layout and timm's: refused, never an IndexError."""
    from xcit.checkpoints import load_into
    from xcit.models.xcit import timm_state_dict
    rng = random.Random(0)
    for name in ('xcit_nano_12_p16_224', 'cvt_13_224', 'fcvit_tiny'):
        target = xcit.create_model(name)
        layouts = [target.state_dict()] + ([timm_state_dict(target.state_dict())] if name.startswith('xcit') else [])
        for layout in layouts:
            keys = list(layout)
            for _ in range(40):
                damaged = dict(layout)
                for _ in range(rng.randint(1, 3)):
                    key = rng.choice(keys)
                    if rng.random() < 0.5:
                        damaged[key] = torch.zeros(())
                    else:
                        damaged[key] = torch.zeros(*[rng.randint(0, 3) for _ in range(rng.randint(1, 4))])
                try:  # a 0-d num_batches_tracked still fits; anything else is refused as a CheckpointError
                    load_into(target, damaged, source='damaged.pth')
                except CheckpointError as e:
                    assert 'damaged.pth' in str(e)


@pytest.mark.parametrize('line,needle', [('img/a.png -1', 'label from 0'), ('img/a.png ³', 'label from 0'),
                                         ('img/a.png 5000000', 'below 1,000,000'), ('img/a.png', 'label from 0')])
def test_label_lists_with_impossible_labels(tmp_path, line, needle):
    from xcit.data.datasets import label_list
    (tmp_path / 'train.txt').write_text(f'img/b.png 0\n{line}\n', encoding='utf-8')
    with pytest.raises(ConfigError, match=needle) as err:
        label_list(tmp_path, 'train.txt')
    assert 'train.txt:2' in str(err.value)


def test_label_list_that_is_not_text(tmp_path):
    from xcit.data.datasets import label_list
    (tmp_path / 'train.txt').write_bytes(b'img/a.png 0\n\xff\xfe\x00\x01')
    with pytest.raises(ConfigError, match='not UTF-8'):
        label_list(tmp_path, 'train.txt')


def test_pack_with_bad_arguments_is_one_line_and_keeps_what_is_there(tmp_path, capsys):
    from xcit.data.shards import pack_split
    from xcit.data.views import DigitViews
    shards = tmp_path / 'shards'
    pack_split(DigitViews('val', size=16), shards, 'val', shard_size=200)
    before = {p.name: p.read_bytes() for p in shards.iterdir()}
    a_file = _png(tmp_path / 'a.png')
    (tmp_path / 'empty').mkdir()
    for argv, needle in [
        (['nowhere', shards], 'nowhere: no such folder or label list'),
        (['digits', shards, '--shard-size', '0'], '--shard-size must be at least 1'),
        (['digits', a_file], 'exists and is not a folder'),
        (['digits', shards, '--split', '../up'], '--split must be a plain name'),
        (['digits', shards, '--digits-size', '4'], '--digits-size must be 8 to 512'),
        (['digit_views', shards, '--split', 'val', '--digits-size', '16'], 'val-000000.tar exists'),
        ([tmp_path / 'empty', tmp_path / 'out'], "find any class folder"),
    ]:
        code, _, err = cli(capsys, 'data', 'pack', *argv)
        assert_one_error(code, err, needle)
    assert {p.name: p.read_bytes() for p in shards.iterdir()} == before


def test_webdataset_configs_that_point_at_no_shards(tmp_path, capsys):
    from xcit.data.datasets import DigitsSource
    from xcit.data.shards import pack_split
    shards = tmp_path / 'shards'
    pack_split(DigitsSource('val', size=8), shards, 'val', shard_size=400)
    (tmp_path / 'bad').mkdir()
    (tmp_path / 'bad' / 'info.json').write_text('{"splits": [')
    for overrides, needle in [
        ([f'data.root={tmp_path / "none"}'], 'shard folder not found'),
        ([f'data.root={tmp_path}'], 'info.json not found'),
        ([f'data.root={tmp_path / "bad"}'], 'not a JSON shard index'),
        ([f'data.root={shards}'], "no split 'train' (splits: val)"),
        ([f'data.root={shards}', 'data.train_split=val-{000000..000001}.tar'], 'shard not found'),
    ]:
        argv = ['train', '-c', _write(tmp_path / 'c.yaml', 'data: {dataset: webdataset}\n')]
        for override in overrides:
            argv += ['-o', override]
        code, _, err = cli(capsys, *argv)
        assert_one_error(code, err, needle)


def test_pack_leaves_out_missing_files_and_keeps_no_half_written_split(tmp_path, capsys):
    images = tmp_path / 'images'
    _png(images / 'a.png', 10)
    listing = _write(tmp_path / 'train_list.txt', 'a.png 0\nmissing.png 1\n')
    code, out, err = cli(capsys, 'data', 'pack', listing, tmp_path / 'shards', '--image-root', images)
    assert code == 0 and err == [] and out[0].startswith('train: 1 samples in 1 shards'), (out, err)
    assert out[1] == f"train: 1 unreadable images left out: {images / 'missing.png'}"
    nothing = _write(tmp_path / 'val_list.txt', 'missing.bmp 0\nmissing.gif 1\n')
    code, _, err = cli(capsys, 'data', 'pack', nothing, tmp_path / 'shards', '--image-root', images)
    assert_one_error(code, err, "split 'val': none of its 2 images can be read")
    assert sorted(p.name for p in (tmp_path / 'shards').iterdir()) == ['info.json', 'train-000000.tar']
