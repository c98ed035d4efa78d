import math

import pytest
import torch

import xcit
from xcit.config import load_config
from xcit.engine.optim import WarmupDecay, build_schedule, decay_groups, peak_lr


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
    s = WarmupDecay(peak_lr=1.0, total_steps=110, warmup_steps=10, warmup_lr=0.0, min_lr=0.1)
    assert s(0) == 0.0 and math.isclose(s(5), 0.5) and math.isclose(s(10), 1.0)
    assert math.isclose(s(60), 0.55) and math.isclose(s(110), 0.1) and math.isclose(s(500), 0.1)
    assert all(s(i) >= s(i + 1) for i in range(10, 110))


def test_layernorm_rule_of_the_dense_recipes(model):
    exempt = _exempt(model, 'layernorm')
    layernorms = {n for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    assert exempt == {f'{n}.{p}' for n in layernorms for p in ('weight', 'bias')}
    assert 'blocks.0.norm1.weight' in exempt and 'blocks.0.norm3.bias' in exempt
    batchnorm = next(n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert f'{batchnorm}.weight' not in exempt and 'blocks.0.attn.qkv.bias' not in exempt
    assert 'cls_token' not in exempt and 'blocks.0.gamma1' not in exempt


def test_layer_decay_lowers_the_lr_with_depth_and_the_schedule_applies_it(model):
    groups = decay_groups(model, 0.05, 'official', layer_decay=0.5)
    scale = {name: g['lr_scale'] for g in groups for p in g['params'] for name, q in model.named_parameters() if p is q}
    assert len(scale) == len(list(model.parameters()))  # each parameter once
    assert scale['head.weight'] == 1.0 and scale['cls_attn_blocks.0.attn.qkv.weight'] == 1.0
    assert scale['blocks.11.attn.qkv.weight'] == 0.5 and scale['blocks.0.attn.qkv.weight'] == 0.5 ** 12
    assert scale['patch_embed.proj.0.0.weight'] == scale['cls_token'] == 0.5 ** 13
    assert {g['weight_decay'] for g in groups if any(p is model.blocks[3].attn.qkv.bias for p in g['params'])} == {0.0}
    optimizer = torch.optim.AdamW(groups, lr=1.0)
    WarmupDecay(peak_lr=2.0, total_steps=10, warmup_steps=0, warmup_lr=0.0, min_lr=0.0).apply(optimizer, 0)
    assert sorted({g['lr'] for g in optimizer.param_groups}) == [2.0 * 0.5 ** k for k in range(13, -1, -1)]


def test_layer_decay_needs_numbered_blocks():
    with pytest.raises(ValueError, match='blocks.N'):
        decay_groups(torch.nn.Linear(2, 2), 0.05, layer_decay=0.9)


def test_step_and_poly_decay():
    step = build_schedule(load_config([], ['schedule.epochs=36', 'schedule.decay=step', 'schedule.milestones=[27,33]',
                                           'schedule.warmup_steps=5', 'schedule.warmup_lr=0.001']).schedule, 1.0, 10)
    assert step.warmup_steps == 5 and math.isclose(step(0), 0.001) and step(5) == step(269) == 1.0
    assert math.isclose(step(270), 0.1) and math.isclose(step(329), 0.1) and math.isclose(step(330), 0.01)
    poly = WarmupDecay(peak_lr=1.0, total_steps=110, warmup_steps=10, warmup_lr=0.0, min_lr=0.0, decay='poly', power=2.0)
    assert poly(10) == 1.0 and math.isclose(poly(60), 0.25) and poly(110) == 0.0
    linear = WarmupDecay(peak_lr=1.0, total_steps=100, warmup_steps=0, warmup_lr=0.0, min_lr=0.0, decay='poly')
    assert all(math.isclose(linear(i), 1 - i / 100) for i in range(101))


@pytest.mark.parametrize('overrides, message', [
    (['schedule.decay=step'], 'needs milestones'),
    (['schedule.milestones=[3]'], 'for decay: step'),
    (['schedule.decay=step', 'schedule.epochs=10', 'schedule.milestones=[8,4]'], 'must increase'),
    (['schedule.decay=step', 'schedule.epochs=10', 'schedule.milestones=[12]'], 'must increase'),
])
def test_bad_milestones_are_named(overrides, message):
    with pytest.raises(Exception, match=message):
        load_config([], overrides)


def test_linear_lr_scaling():
    config = load_config([], ['optim.scale_lr=True', 'optim.lr=5e-4', 'optim.lr_base_batch=512'])
    assert math.isclose(peak_lr(config.optim, global_batch=128 * 2 * 2), 5e-4 * 512 / 512)
    assert math.isclose(peak_lr(config.optim, global_batch=128 * 4 * 2), 1e-3)
    fixed = load_config([], ['optim.lr=5e-4'])
    assert peak_lr(fixed.optim, global_batch=4096) == 5e-4
    schedule = build_schedule(load_config([], ['schedule.epochs=10', 'schedule.warmup_epochs=0.5']).schedule, 1.0, 20)
    assert (schedule.total_steps, schedule.warmup_steps) == (200, 10)


def test_dino_rule_decays_the_class_token_and_temperatures(model):
    exempt = _exempt(model, 'dino')
    assert 'cls_token' not in exempt and not any(n.endswith('temperature') for n in exempt)
    assert {n for n, p in model.named_parameters() if p.ndim <= 1} <= exempt


def test_weight_decay_follows_a_cosine_in_the_decayed_groups_only(model):
    config = load_config([], ['optim.weight_decay=0.04', 'optim.weight_decay_end=0.4', 'schedule.epochs=10',
                              'schedule.warmup_epochs=2'])
    schedule = build_schedule(config.schedule, 1e-3, 10, config.optim)
    optimizer = torch.optim.AdamW(decay_groups(model, 0.04, 'dino'))
    for step, expected in ((0, 0.04), (50, 0.22), (100, 0.4)):
        schedule.apply(optimizer, step)
        decayed, plain = optimizer.param_groups
        assert decayed['weight_decay'] == pytest.approx(expected) and plain['weight_decay'] == 0.0


def test_per_parameter_clipping_caps_each_gradient_on_its_own():
    from xcit.engine.loop import clip_gradients
    layer = torch.nn.Linear(3, 2)
    layer.weight.grad, layer.bias.grad = torch.full((2, 3), 10.0), torch.tensor([0.3, 0.4])
    clip_gradients(layer, 1.0, 'per_parameter')
    assert layer.weight.grad.norm().item() == pytest.approx(1.0, rel=1e-5)
    assert torch.equal(layer.bias.grad, torch.tensor([0.3, 0.4]))  # norm 0.5: left alone
    layer.weight.grad, layer.bias.grad = torch.full((2, 3), 10.0), torch.tensor([0.3, 0.4])
    clip_gradients(layer, 1.0, 'norm')
    assert torch.cat([layer.weight.grad.flatten(), layer.bias.grad]).norm().item() == pytest.approx(1.0, rel=1e-5)
