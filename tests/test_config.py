from pathlib import Path

import pytest
import yaml

from xcit.config import Config, ConfigError, load_config, parse_override, save_config

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / 'configs').rglob('*.yaml'))


def _write(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


@pytest.mark.parametrize('path', [p for p in SHIPPED if '_base_' not in p.parts and 'recipes' not in p.parts],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_config_validates(path):
    config = load_config(path)
    assert config.experiment == path.stem


def test_shipped_set_covers_the_imagenet_variants():
    names = {p.stem for p in (ROOT / 'configs' / 'xcit').glob('xcit_*.yaml')}
    variants = {f'xcit_{s}_p{p}_224' for s in ['nano_12', 'tiny_12', 'tiny_24', 'small_12', 'small_24', 'medium_24',
                                               'large_24'] for p in (16, 8)}
    assert names == variants | {f'{v}_dist' for v in variants}


def test_passl_recipe_values():
    c = load_config(ROOT / 'configs/xcit/xcit_small_24_p8_224.yaml')
    assert c.model.name == 'xcit_small_24_p8_224' and c.data.batch_size == 32
    assert (c.schedule.epochs, c.schedule.warmup_epochs, c.schedule.warmup_lr, c.schedule.min_lr) == (400, 5, 1e-6, 1e-5)
    assert (c.optim.lr, c.optim.scale_lr, c.optim.no_decay) == (5e-4, False, 'passl')
    assert c.augment.auto_augment == 'rand-m9-mstd0.5-inc1' and (c.augment.mixup, c.augment.cutmix) == (0.8, 1.0)
    assert c.data.crop_pct == 1.0 and c.data.interpolation == 'bicubic' and not c.train.ema
    dist = load_config(ROOT / 'configs/xcit/xcit_small_24_p8_224_dist.yaml')
    assert dist.model.name == 'xcit_small_24_p8_224'  # PASSL's file had depth 12 here; ours inherits the variant
    assert (dist.distill.type, dist.distill.teacher, dist.data.batch_size) == ('dml', 'regnety_160', 128)


def test_official_recipe_overlay():
    c = load_config([ROOT / 'configs/xcit/xcit_small_12_p16_224.yaml', ROOT / 'configs/xcit/recipes/official.yaml'])
    assert c.optim.scale_lr and c.train.ema and c.augment.repeated_aug == 3 and c.model.drop_path_rate == 0.1
    assert c.optim.no_decay == 'official' and c.model.name == 'xcit_small_12_p16_224'


def test_misspelled_key_names_the_path_and_the_closest_key(tmp_path):
    path = _write(tmp_path / 'c.yaml', {'data': {'batchsize': 32}})
    with pytest.raises(ConfigError, match=r"unknown key 'data.batchsize'; did you mean 'data.batch_size'\?"):
        load_config(path)
    with pytest.raises(ConfigError, match="unknown key 'optim.learning_rate'"):
        load_config(_write(tmp_path / 'd.yaml', {}), ['optim.learning_rate=1'])


def test_wrong_type_and_range_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"'optim.lr'.*valid number.*'fast'"):
        load_config(_write(tmp_path / 'c.yaml', {'optim': {'lr': 'fast'}}))
    with pytest.raises(ConfigError, match="'data.batch_size'"):
        load_config(_write(tmp_path / 'd.yaml', {}), ['data.batch_size=0'])
    with pytest.raises(ConfigError, match='even'):
        load_config(_write(tmp_path / 'e.yaml', {'augment': {'mixup': 0.8}, 'data': {'batch_size': 7}}))


def test_base_inheritance_and_overrides(tmp_path):
    (tmp_path / 'sub').mkdir()
    _write(tmp_path / 'base.yaml', {'seed': 1, 'optim': {'lr': 0.1, 'weight_decay': 0.5}})
    child = _write(tmp_path / 'sub' / 'child.yaml', {'_base_': '../base.yaml', 'optim': {'lr': 0.2}})
    c = load_config(child, ['optim.weight_decay=0.25', 'augment.scale=(0.5, 1.0)', 'model.name=xcit_tiny_12_p8_224'])
    assert (c.seed, c.optim.lr, c.optim.weight_decay, c.augment.scale) == (1, 0.2, 0.25, (0.5, 1.0))
    assert c.model.name == 'xcit_tiny_12_p8_224' and c.experiment == 'child'
    loop = _write(tmp_path / 'loop.yaml', {'_base_': 'loop.yaml'})
    with pytest.raises(ConfigError, match='loop'):
        load_config(loop)
    with pytest.raises(ConfigError, match='not found'):
        load_config(_write(tmp_path / 'orphan.yaml', {'_base_': 'missing.yaml'}))


def test_overrides_are_literals_never_code(tmp_path):
    marker = tmp_path / 'ran'
    path, value = parse_override(f"experiment=__import__('pathlib').Path('{marker}').touch()")
    assert isinstance(value, str) and not marker.exists()
    assert parse_override('a.b=[1, 2]') == (['a', 'b'], [1, 2])
    assert parse_override('a=null') == (['a'], None)
    assert parse_override('model.kwargs.use_pos_embed=false') == (['model', 'kwargs', 'use_pos_embed'], False)
    assert parse_override('a=true') == (['a'], True) and parse_override('a=False') == (['a'], False)
    assert parse_override("a='false'") == (['a'], 'false')  # quoted: the string stays a string
    with pytest.raises(ConfigError, match='key.path=value'):
        parse_override('no_equals_sign')


def test_resolved_config_round_trips(tmp_path):
    c = load_config(ROOT / 'configs/demo/digits_xcit.yaml', ['optim.lr=0.002'])
    save_config(c, tmp_path / 'resolved.yaml')
    again = load_config(tmp_path / 'resolved.yaml')
    assert again.to_dict() == c.to_dict()


def test_non_digits_data_needs_a_root():
    with pytest.raises(ValueError, match='data.root'):
        Config.model_validate({'data': {'dataset': 'imagefolder'}})
