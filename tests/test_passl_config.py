"""PaddlePaddle PASSL's YAML configs read as they are: every XCiT and CvT config of PASSL's repository
(written here from what those files say) translates, each XCiT variant to our shipped file of the same
name, and a translated config trains; what cannot be carried over is named."""
import copy
import re
from pathlib import Path

import pytest
import yaml

from conftest import cli, run_cli
from xcit.config import ConfigError, load_config
from xcit.passl_config import translate_passl_config

CONFIGS = Path(__file__).resolve().parents[1] / 'configs'
NORMALIZE = {'name': 'Normalize', 'mean': [123.675, 116.28, 103.53], 'std': [58.395, 57.12, 57.375]}

# PASSL configs/xcit/<variant>.yaml: (patch, embed_dim, depth, heads, eta, tokens_norm), per-GPU batch.
# PyYAML reads 1e-5 (no decimal point) as a string, as PASSL's own loader does: kept as such here.
XCIT = {
    'xcit_nano_12_p8_224': ((8, 128, 12, 4, 1.0, False), 128),
    'xcit_nano_12_p16_224': ((16, 128, 12, 4, 1.0, False), 128),
    'xcit_tiny_12_p8_224': ((8, 192, 12, 4, 1.0, True), 128),
    'xcit_tiny_12_p16_224': ((16, 192, 12, 4, 1.0, True), 128),
    'xcit_tiny_24_p8_224': ((8, 192, 24, 4, '1e-5', True), 64),
    'xcit_tiny_24_p16_224': ((16, 192, 24, 4, '1e-5', True), 64),
    'xcit_small_12_p8_224': ((8, 384, 12, 8, 1.0, True), 64),
    'xcit_small_12_p16_224': ((16, 384, 12, 8, 1.0, True), 64),
    'xcit_small_24_p8_224': ((8, 384, 24, 8, '1e-5', True), 32),
    'xcit_small_24_p16_224': ((16, 384, 24, 8, '1e-5', True), 32),
    'xcit_medium_24_p8_224': ((8, 512, 24, 8, '1e-5', True), 16),
    'xcit_medium_24_p16_224': ((16, 512, 24, 8, '1e-5', True), 16),
    'xcit_large_24_p8_224': ((8, 768, 24, 16, '1e-5', True), 16),
    'xcit_large_24_p16_224': ((16, 768, 24, 16, '1e-5', True), 16),
}
# PASSL configs/xcit/<variant>_dist.yaml (p8 only): the student's architecture, as written there. Two are
# not the variant their name says: tiny_12_p8_dist has patch 16, small_24_p8_dist depth 12 and eta 1.0.
DIST = {
    'xcit_nano_12_p8_224': ((8, 128, 12, 4, 1.0, False), 'xcit_nano_12_p8_224'),
    'xcit_tiny_12_p8_224': ((16, 192, 12, 4, 1.0, True), 'xcit_tiny_12_p16_224'),
    'xcit_tiny_24_p8_224': ((8, 192, 24, 4, '1e-5', True), 'xcit_tiny_24_p8_224'),
    'xcit_small_12_p8_224': ((8, 384, 12, 8, 1.0, True), 'xcit_small_12_p8_224'),
    'xcit_small_24_p8_224': ((8, 384, 12, 8, 1.0, True), 'xcit_small_12_p8_224'),
    'xcit_medium_24_p8_224': ((8, 512, 24, 8, '1e-5', True), 'xcit_medium_24_p8_224'),
    'xcit_large_24_p8_224': ((8, 768, 24, 16, '1e-5', True), 'xcit_large_24_p8_224'),
}
REGNETY_160 = {'name': 'RegNet', 'w_a': 106.23, 'w_0': 200, 'w_m': 2.48, 'd': 18, 'group_w': 112, 'bot_mul': 1.0,
               'q': 8, 'se_on': True}


def _architecture(values, img_size=None):
    patch, dim, depth, heads, eta, tokens_norm = values
    arch = {'name': 'XCiT', 'patch_size': patch, 'embed_dim': dim, 'depth': depth, 'num_heads': heads, 'eta': eta,
            'tokens_norm': tokens_norm}
    return {'name': 'XCiT', 'img_size': img_size, **arch} if img_size else arch


def _loader(train: bool, batch: int, nested_workers: bool, center_crop: bool) -> dict:
    if train:
        transforms = [
            {'name': 'RandomResizedCrop', 'size': 224, 'scale': [0.08, 1.0], 'interpolation': 'bicubic'},
            {'name': 'RandomHorizontalFlip'},
            {'name': 'AutoAugment', 'config_str': 'rand-m9-mstd0.5-inc1', 'interpolation': 'bicubic',
             'img_size': 224},
            {'name': 'Transpose'}, NORMALIZE,
            {'name': 'RandomErasing', 'prob': 0.25, 'mode': 'pixel', 'max_count': 1}]
    else:
        transforms = [{'name': 'Resize', 'size': 224, 'interpolation': 'bicubic'}]
        transforms += [{'name': 'CenterCrop', 'size': 224}] if center_crop else []
        transforms += [{'name': 'Transpose'}, NORMALIZE]
    dataset = {'name': 'ImageNet', 'dataroot': 'data/ILSVRC2012/train/' if train else 'data/ILSVRC2012/val',
               'return_label': True, 'transforms': transforms}
    if train:
        dataset['batch_transforms'] = [{'name': 'Mixup', 'mixup_alpha': 0.8, 'prob': 1.0, 'switch_prob': 0.5,
                                        'mode': 'batch', 'cutmix_alpha': 1.0}]
    part = {'sampler': {'batch_size': batch, 'shuffle': train, 'drop_last': train}, 'dataset': dataset}
    if nested_workers:  # PASSL's newer files; the older ones put num_workers on the loader itself
        part['loader'] = {'num_workers': 8, 'use_shared_memory': True}
    else:
        part['num_workers'] = 8
    return part


def passl_xcit_config(architecture: dict, batch: int, dist: bool = False, newer_layout: bool = True) -> dict:
    """A PASSL configs/xcit/*.yaml file, as PASSL's repository has it."""
    head = {'name': 'SwinTransformerClsHead', 'in_channels': architecture['embed_dim'], 'num_classes': 1000}
    student = {'name': 'SwinWrapper', 'architecture': architecture, 'head': head}
    if dist:
        model = {'name': 'DistillationWrapper', 'models': [
            {'Teacher': {'name': 'Classification', 'backbone': dict(REGNETY_160),
                         'head': {'name': 'ClasHead', 'in_channels': 3024, 'num_classes': 1000}}},
            {'Student': student}],
            'pretrained_list': ['regnety_160.pdparams', None], 'freeze_params_list': [True, False],
            'infer_model_key': 'Student', 'dml_loss_weight': 0.5, 'head_loss_weight': 0.5}
    else:
        model = student
    config = {'epochs': 400, 'output_dir': 'output_dir', 'seed': 0}
    if newer_layout:
        config['device'] = 'gpu'
    config.update({
        'model': model,
        'dataloader': {'train': _loader(True, batch, newer_layout, True),
                       'val': _loader(False, 128, newer_layout, center_crop=not dist)},  # no crop in any _dist
        'lr_scheduler': {'name': 'LinearWarmup', 'learning_rate': {
            'name': 'CosineAnnealingDecay', 'learning_rate': '5e-4', 'T_max': 400, 'eta_min': '1e-5'},
            'warmup_steps': 5, 'start_lr': '1e-6', 'end_lr': '5e-4'},
        'optimizer': {'name': 'AdamW', 'beta1': 0.9, 'beta2': 0.999, 'weight_decay': 0.05,
                      'exclude_from_weight_decay': ['temperature', 'pos_embed', 'cls_token', 'dist_token']},
        'log_config': {'name': 'LogHook', 'interval': 10},
        'checkpoint': {'name': 'CheckpointHook', 'by_epoch': True, 'interval': 1, 'max_keep_ckpts': 50},
        'custom_config': [{'name': 'EvaluateHook'}],
    })
    return config


# PASSL configs/cvt/*.yaml: (embed_dim, depth, num_heads, crop size); cvt_w24_384's crop is 224 (sic)
CVT = {
    'cvt_13_224': (([64, 192, 384], [1, 2, 10], [1, 3, 6]), 224),
    'cvt_13_384': (([64, 192, 384], [1, 2, 10], [1, 3, 6]), 384),
    'cvt_21_224': (([64, 192, 384], [1, 4, 16], [1, 3, 6]), 224),
    'cvt_21_384': (([64, 192, 384], [1, 4, 16], [1, 3, 6]), 384),
    'cvt_w24_384': (([192, 768, 1024], [2, 2, 20], [3, 12, 16]), 224),
}


def passl_cvt_config(name: str, normalize_127: bool = False) -> dict:
    (dims, depths, heads), size = CVT[name]
    normalize = ({'name': 'Normalize', 'mean': [127.5] * 3, 'std': [127.5] * 3} if normalize_127 else
                 {'name': 'NormalizeImage', 'scale': '1.0/255.0', 'mean': [0.485, 0.456, 0.406],
                  'std': [0.229, 0.224, 0.225]})
    return {
        'epochs': 300, 'output_dir': 'output_dir',
        'model': {'name': 'CvTWrapper', 'architecture': {'name': 'CvT', 'embed_dim': dims, 'depth': depths,
                                                         'num_heads': heads},
                  'head': {'name': 'CvTClsHead', 'num_classes': 1000, 'in_channels': dims[-1]}},
        'dataloader': {'train': {'num_workers': 0, 'sampler': {'batch_size': 128, 'shuffle': True, 'drop_last': True},
                                 'dataset': {'name': 'ImageNet', 'dataroot': 'data/ILSVRC2012/train/',
                                             'return_label': True, 'transforms': [
                                                 {'name': 'ToRGB'},
                                                 {'name': 'RandomResizedCrop', 'size': size, 'scale': [0.75, 1.0],
                                                  'ratio': [1.0, 1.0], 'interpolation': 'bicubic'},
                                                 {'name': 'Transpose'}, normalize]}}},
        'lr_scheduler': {'name': 'CosineWarmup', 'learning_rate': 0.003, 'T_max': 93835, 'warmup_steps': 10000,
                         'start_lr': 0.00003, 'end_lr': 0.003},
        'optimizer': {'name': 'AdamW', 'beta1': 0.9, 'beta2': 0.999, 'weight_decay': 0.3,
                      'grad_clip': {'name': 'global_norm', 'value': 1.0}},
        'log_config': {'name': 'LogHook', 'interval': 10},
    }


def _write(tmp_path, name, config):
    path = tmp_path / f'{name}.yaml'
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# not recipe values: where runs are written, and the class count PASSL writes out (ours: the dataset's, 1000)
NOT_RECIPE = {('output_dir',), ('model', 'num_classes')}


def _differences(ours: dict, theirs: dict, prefix=()) -> list[str]:
    out = []
    for key in ours.keys() | theirs.keys():
        path = (*prefix, key)
        if path in NOT_RECIPE:
            continue
        a, b = ours.get(key), theirs.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, path)
        elif a != b:
            out.append(f"{'.'.join(path)}: translated {a!r}, shipped {b!r}")
    return out


@pytest.mark.parametrize('newer_layout', [True, False], ids=['loader-section', 'older-layout'])
@pytest.mark.parametrize('name', list(XCIT))
def test_passl_xcit_config_translates_to_our_shipped_file(name, newer_layout, tmp_path):
    values, batch = XCIT[name]
    path = _write(tmp_path, name, passl_xcit_config(_architecture(values), batch, newer_layout=newer_layout))
    translated = load_config(path).to_dict()
    assert translated['model']['num_classes'] == 1000
    assert _differences(translated, load_config(CONFIGS / 'xcit' / f'{name}.yaml').to_dict()) == []


@pytest.mark.parametrize('name', list(DIST))
def test_passl_distillation_config_translates_to_our_shipped_file(name, tmp_path):
    """Equal to ours in every recipe value; where PASSL's file builds another student than its name says,
    the translation builds what the file says (the one intended difference)."""
    values, student = DIST[name]
    img_size = 224 if name in ('xcit_nano_12_p8_224', 'xcit_tiny_12_p8_224') else None
    config = passl_xcit_config(_architecture(values, img_size), 128, dist=True, newer_layout=name != 'xcit_small_12_p8_224')
    translated = load_config(_write(tmp_path, f'{name}_dist', config)).to_dict()
    shipped = load_config(CONFIGS / 'xcit' / f'{name}_dist.yaml').to_dict()
    assert translated['model']['name'] == student
    if student != name:
        shipped['model']['name'] = student
    assert _differences(translated, shipped) == []
    assert translated['distill']['teacher'] == 'regnety_160'


@pytest.mark.parametrize('normalize_127', [False, True], ids=['NormalizeImage', 'Normalize-127.5'])
@pytest.mark.parametrize('name', list(CVT))
def test_every_passl_cvt_config_translates(name, normalize_127, tmp_path):
    config = load_config(_write(tmp_path, name, passl_cvt_config(name, normalize_127)))
    assert config.model.name == name
    assert config.model.kwargs == ({'img_size': 224} if name == 'cvt_w24_384' else {})  # its crop, as written
    assert config.optim.lr == 0.003 and config.optim.clip_grad == 1.0 and config.optim.no_decay_names == []
    assert config.schedule.warmup_epochs == pytest.approx(300 * 10000 / 93835, abs=1e-3)  # steps, as epochs
    assert config.augment.ratio == (1.0, 1.0) and config.augment.hflip == 0 and config.augment.mixup == 0
    expected = ((0.5,) * 3, (0.5,) * 3) if normalize_127 else (None, None)  # ImageNet's: the model's default
    assert (config.data.mean, config.data.std) == expected


def test_what_is_not_carried_over_is_listed_once(tmp_path):
    values, _ = DIST['xcit_nano_12_p8_224']
    _, notes = translate_passl_config(passl_xcit_config(_architecture(values), 128, dist=True))
    keys = [note.split(':')[0] for note in notes]
    assert sorted(keys) == sorted(set(keys))
    assert {'device', 'dataloader.val.dataset.transforms'} <= set(keys)  # the _dist files' val has no crop


def test_translated_configs_train_an_epoch_on_the_digits(tmp_path):
    """A PASSL XCiT config and a PASSL distillation config (teacher: a small PASSL RegNet file), pointed at
    the built-in digits with -o overrides, each train one epoch end to end."""
    import numpy as np
    from test_passl_regnet import passl_regnet_arrays
    from xcit.checkpoints.paddle import write_paddle_pickle
    from xcit.checkpoints.regnet import regnet_stages
    teacher = tmp_path / 'regnety_small.pdparams'
    write_paddle_pickle(passl_regnet_arrays(*regnet_stages(36.44, 24, 2.49, 13, 8), num_classes=10), teacher)
    values, _ = XCIT['xcit_nano_12_p8_224']
    small = ['-o', 'data.dataset=digits', '-o', 'data.digits_size=16', '-o', 'data.image_size=16',
             '-o', 'data.batch_size=32', '-o', 'data.num_workers=0', '-o', 'model.num_classes=10',
             '-o', "model.kwargs={'depth': 1}", '-o', 'schedule.epochs=1', '-o', 'schedule.warmup_epochs=0',
             '-o', f'output_dir={tmp_path / "runs"}', '-o', 'train.progress=False', '-o', 'train.device=cpu']
    for dist in (False, True):
        config = passl_xcit_config(_architecture(values), 128, dist=dist)
        extra = ['-o', 'distill.teacher=regnety_002', '-o', f'distill.teacher_weights={teacher}'] if dist else []
        done = run_cli('train', '-c', _write(tmp_path, f'passl_{dist}', config), *small, *extra, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        assert 'final evaluation: top-1' in done.stdout
        assert np.isfinite(float(done.stdout.split('loss ')[1].split()[0]))


def _broken(path_parts, value):
    values, batch = XCIT['xcit_nano_12_p8_224']
    config = passl_xcit_config(_architecture(values), batch)
    node = config
    for part in path_parts[:-1]:
        node = node[part]
    node[path_parts[-1]] = value
    return config


@pytest.mark.parametrize('parts, value, named', [
    (('model', 'architecture', 'name'), 'ResNet', 'model.architecture.name'),  # a backbone we do not have
    (('model', 'architecture', 'window_size'), 7, 'model.architecture.window_size'),  # matches no family
    (('custom_config',), [{'name': 'EvaluateHook'}, {'name': 'EMAHook'}], 'custom_config[1].name'),
    (('optimizer', 'name'), 'Momentum', 'optimizer.name'),
    (('lr_scheduler', 'end_lr'), '1e-3', 'lr_scheduler.end_lr'),
], ids=['backbone', 'architecture', 'hook', 'optimizer', 'warmup-end'])
def test_untranslatable_keys_are_one_line_naming_them(parts, value, named, tmp_path, capsys):
    path = _write(tmp_path, 'bad', _broken(parts, value))
    with pytest.raises(ConfigError, match=re.escape(f'PASSL key {named}')):
        load_config(path)
    code, _, err = cli(capsys, 'train', '-c', path)
    assert code == 2 and len(err) == 1 and named in err[0], err


def test_config_import_writes_ours_and_show_resolves_a_stack(tmp_path, capsys):
    values, batch = XCIT['xcit_small_12_p16_224']
    passl = _write(tmp_path, 'xcit_small_12_p16_224', passl_xcit_config(_architecture(values), batch))
    ours = tmp_path / 'ours.yaml'
    code, _, err = cli(capsys, 'config', 'import', passl, '--output', ours)
    assert code == 0, err
    assert any('not carried over: device' in line for line in err), err
    written = yaml.safe_load(ours.read_text())
    assert 'dataloader' not in written and written['model']['name'] == 'xcit_small_12_p16_224'
    direct = load_config(passl).to_dict()
    assert load_config(ours).to_dict() == dict(direct, experiment='ours')
    code, shown, err = cli(capsys, 'config', 'show', '-c', ours, '-c', CONFIGS / 'xcit' / 'recipes' / 'official.yaml',
                           '-o', 'optim.lr=1e-3')
    assert code == 0, err
    resolved = yaml.safe_load('\n'.join(shown))
    official = yaml.safe_load((CONFIGS / 'xcit' / 'recipes' / 'official.yaml').read_text())
    assert resolved['optim']['lr'] == 1e-3 and resolved['train']['ema'] == official['train']['ema']
    assert resolved['model']['name'] == 'xcit_small_12_p16_224'
    code, _, err = cli(capsys, 'config', 'import', CONFIGS / 'xcit' / 'xcit_nano_12_p8_224.yaml', '--output', ours)
    assert code == 2 and len(err) == 1 and 'not a PASSL config' in err[0], err


def test_passl_configs_are_not_changed_by_translation():
    config = passl_xcit_config(_architecture(XCIT['xcit_nano_12_p8_224'][0]), 128, dist=True)
    before = copy.deepcopy(config)
    translate_passl_config(config)
    assert config == before
