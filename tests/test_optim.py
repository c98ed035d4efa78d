import math

import pytest
import torch

import xcit
from xcit.config import load_config
from xcit.engine.optim import WarmupCosine, build_schedule, decay_groups, peak_lr


@pytest.fixture(scope='module')
def model():
    return xcit.create_model('xcit_nano_12_p16_224')


def _exempt(model, rule):
    groups = decay_groups(model, 0.05, rule, ['temperature', 'pos_embed', 'cls_token', 'dist_token'])
    ids = {id(p) for p in groups[1]['params']}
    assert groups[1]['weight_decay'] == 0 and groups[0]['weight_decay'] == 0.05
    return {name for name, p in model.named_parameters() if id(p) in ids}


def test_official_rule(model):
    exempt = _exempt(model, 'official')
    assert 'cls_token' in exempt and 'blocks.0.gamma1' in exempt and 'blocks.0.norm1.weight' in exempt
    assert 'blocks.0.attn.qkv.bias' in exempt
    assert 'blocks.0.attn.temperature' not in exempt  # (h, 1, 1): decayed, as in the official runs
    assert 'pos_embeder.token_projection.weight' not in exempt and 'blocks.0.attn.qkv.weight' not in exempt


def test_passl_rule(model):
    exempt = _exempt(model, 'passl')
    assert {'cls_token', 'blocks.0.attn.temperature', 'pos_embeder.token_projection.weight'} <= exempt
    assert 'blocks.0.gamma1' not in exempt and 'blocks.0.norm1.weight' not in exempt  # decayed in PASSL
    assert not any(n.endswith('qkv.bias') for n in exempt)


def test_every_parameter_is_in_exactly_one_group(model):
    groups = decay_groups(model, 0.05, 'official')
    ids = [id(p) for g in groups for p in g['params']]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


def test_warmup_cosine():
    s = WarmupCosine(peak_lr=1.0, total_steps=110, warmup_steps=10, warmup_lr=0.0, min_lr=0.1)
    assert s(0) == 0.0 and math.isclose(s(5), 0.5) and math.isclose(s(10), 1.0)
    assert math.isclose(s(60), 0.55) and math.isclose(s(110), 0.1) and math.isclose(s(500), 0.1)
    assert all(s(i) >= s(i + 1) for i in range(10, 110))


def test_linear_lr_scaling():
    config = load_config([], ['optim.scale_lr=True', 'optim.lr=5e-4', 'optim.lr_base_batch=512'])
    assert math.isclose(peak_lr(config.optim, global_batch=128 * 2 * 2), 5e-4 * 512 / 512)
    assert math.isclose(peak_lr(config.optim, global_batch=128 * 4 * 2), 1e-3)
    fixed = load_config([], ['optim.lr=5e-4'])
    assert peak_lr(fixed.optim, global_batch=4096) == 5e-4
    schedule = build_schedule(load_config([], ['schedule.epochs=10', 'schedule.warmup_epochs=0.5']).schedule, 1.0, 20)
    assert (schedule.total_steps, schedule.warmup_steps) == (200, 10)
