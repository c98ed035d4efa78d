"""PASSL's RegNet, the teacher of its XCiT distillation recipe, read into timm's RegNet.

PASSL's `RegNet` backbone (`passl_v110/modeling/backbones/regnet.py`) with a `ClasHead`
names its layers `conv` (the stem) and `s{stage}_b{block}.{conv0, conv1, se_block, conv2,
short}`; each conv is a `ConvBNLayer` of `_conv` (with a bias) and `_batch_norm`, the SE
layer is two Linears, and the classifier is `head.fc_cls`. The maths is timm's RegNetY
block for block (1x1, grouped 3x3 with the stride, SE on the block's input width, 1x1,
projection shortcut on each stage's first block), but timm's convolutions have no bias:
BatchNorm(conv(x) + c) is BatchNorm(conv(x)) with its running mean moved by c, so the
bias folds exactly into `running_mean`.

By the time a state dict reaches here, `extract_state_dict` has put it in PyTorch's
conventions (the `backbone.` / `head.fc_cls` wrappers off, Linear weights [out, in],
BatchNorm statistics renamed), so the names below are PASSL's module names without them.
"""
from __future__ import annotations

import functools
import math
import re
from typing import Sequence

import torch
import torch.nn as nn

from ..registry import CheckpointAdapter, WeightsGuess, register_checkpoint_adapter

_PASSL_BLOCK = re.compile(r'^s(\d+)_b(\d+)\.(.+)$')
_TIMM_BLOCK = re.compile(r'^s(\d+)\.b(\d+)\.(.+)$')
_CONVS = {'conv0': 'conv1', 'conv1': 'conv2', 'conv2': 'conv3', 'short': 'downsample'}  # PASSL's -> timm's
_SE = {'se_block.squeeze': 'se.fc1', 'se_block.excitation': 'se.fc2'}
_BN_ENTRIES = ('weight', 'bias', 'running_mean', 'running_var')


def is_passl_regnet(state_dict: dict) -> bool:
    return 'conv._conv.weight' in state_dict and any(
        _PASSL_BLOCK.match(k) and k.endswith('.conv0._conv.weight') for k in state_dict)


def _is_timm_regnet(state_dict: dict) -> bool:
    return 'stem.conv.weight' in state_dict and 's1.b1.conv1.conv.weight' in state_dict


def _conv_bn(state_dict: dict, passl: str, timm: str, out: dict, used: set) -> None:
    """One ConvBNLayer: the conv without its bias, the bias folded into the BatchNorm's running mean."""
    weight_key = f'{passl}._conv.weight'
    out[f'{timm}.conv.weight'] = state_dict[weight_key]
    used.add(weight_key)
    for entry in _BN_ENTRIES:
        key = f'{passl}._batch_norm.{entry}'
        out[f'{timm}.bn.{entry}'] = state_dict[key]
        used.add(key)
    bias_key = f'{passl}._conv.bias'
    if bias_key in state_dict:  # BN(conv(x) + c) == BN with running_mean - c, exactly
        out[f'{timm}.bn.running_mean'] = out[f'{timm}.bn.running_mean'] - state_dict[bias_key]
        used.add(bias_key)
    out[f'{timm}.bn.num_batches_tracked'] = torch.tensor(0, dtype=torch.long)


def passl_regnet_to_timm(state_dict: dict) -> dict[str, torch.Tensor]:
    """PASSL's RegNet + ClasHead (PyTorch conventions) in timm's `RegNet` layout; raises KeyError naming
    any entry it does not know."""
    out, used = {}, set()
    _conv_bn(state_dict, 'conv', 'stem', out, used)
    blocks = sorted({m.group(1, 2) for m in map(_PASSL_BLOCK.match, state_dict) if m}, key=lambda sb: tuple(map(int, sb)))
    for stage, block in blocks:
        passl, timm = f's{stage}_b{block}', f's{stage}.b{block}'
        for ours, theirs in _CONVS.items():
            if f'{passl}.{ours}._conv.weight' in state_dict:
                _conv_bn(state_dict, f'{passl}.{ours}', f'{timm}.{theirs}', out, used)
        for ours, theirs in _SE.items():  # a Linear on the pooled features is timm's 1x1 conv
            for entry in ('weight', 'bias'):
                key = f'{passl}.{ours}.{entry}'
                if key in state_dict:
                    value = state_dict[key]
                    out[f'{timm}.{theirs}.{entry}'] = value[:, :, None, None] if entry == 'weight' else value
                    used.add(key)
    for head in ('head', 'fc_cls'):  # with PASSL's ClasHead wrapper taken off, or a bare classifier
        for entry in ('weight', 'bias'):
            if f'{head}.{entry}' in state_dict:
                out[f'head.fc.{entry}'] = state_dict[f'{head}.{entry}']
                used.add(f'{head}.{entry}')
    unknown = [k for k in state_dict if k not in used]
    if unknown:
        raise KeyError(f"not part of PASSL's RegNet: {', '.join(k[:80] for k in unknown[:5])}")
    return out


def regnet_layout(state_dict: dict) -> tuple:
    """(stage widths, stage depths, group widths, SE, classes) of a state dict in timm's RegNet layout."""
    stages: dict[int, list[int]] = {}
    for key in state_dict:
        m = _TIMM_BLOCK.match(key)
        if m and m.group(3) == 'conv2.conv.weight':
            stages.setdefault(int(m.group(1)), []).append(int(m.group(2)))
    widths, depths, groups = [], [], []
    for stage in sorted(stages):
        last = max(stages[stage])
        widths.append(state_dict[f's{stage}.b{last}.conv3.conv.weight'].shape[0])
        depths.append(len(stages[stage]))
        groups.append(state_dict[f's{stage}.b1.conv2.conv.weight'].shape[1])
    se = 's1.b1.se.fc1.weight' in state_dict
    classes = state_dict['head.fc.weight'].shape[0] if 'head.fc.weight' in state_dict else 0
    return tuple(widths), tuple(depths), tuple(groups), se, classes


def _describe(layout: tuple) -> str:
    widths, depths, groups, se, classes = layout
    group = f'group width {groups[0]}' if len(set(groups)) == 1 else f"group widths {'/'.join(map(str, groups))}"
    return (f"RegNet{'Y' if se else 'X'}: widths {'/'.join(map(str, widths))}, depths {'/'.join(map(str, depths))}, "
            f'{group}, {classes} classes')


@functools.lru_cache(maxsize=1)
def _timm_layouts() -> dict[tuple, str]:
    """Every timm RegNet's layout (without the class count) -> its name, from models built on the meta device."""
    import timm
    layouts = {}
    for name in timm.list_models('regnet[xy]_*'):
        with torch.device('meta'):
            layout = regnet_layout(timm.create_model(name).state_dict())
        layouts.setdefault(layout[:4], name)
    return layouts


def regnet_stages(w_a: float, w_0: int, w_m: float, d: int, group_w: int, q: int = 8
                  ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(stage widths, depths, group widths) of the RegNet design space (Radosavovic et al. 2020), the
    parameters PASSL's and pycls's configs give: block j is w_0 + w_a * j wide, snapped to w_0 * w_m^k and
    to a multiple of q; equal widths form a stage; each width is rounded to a multiple of its group width
    (bottleneck ratio 1)."""
    widths = []
    for j in range(d):
        k = round(math.log((w_0 + w_a * j) / w_0) / math.log(w_m))
        widths.append(int(round(w_0 * w_m ** k / q) * q))
    stage_widths = sorted(set(widths))
    depths = tuple(widths.count(w) for w in stage_widths)
    groups = tuple(min(group_w, w) for w in stage_widths)
    return tuple(int(round(w / g) * g) for w, g in zip(stage_widths, groups)), depths, groups


def timm_regnet_name(widths: Sequence[int], depths: Sequence[int], groups: Sequence[int], se: bool) -> str | None:
    """The timm RegNet with these stages (None if timm has none)."""
    return _timm_layouts().get((tuple(widths), tuple(depths), tuple(groups), se))


def guess_regnet(state_dict: dict) -> WeightsGuess | None:
    """Which timm RegNet a PASSL or timm RegNet state dict is (None if it is not a RegNet)."""
    if is_passl_regnet(state_dict):
        state_dict = passl_regnet_to_timm(state_dict)
    elif not _is_timm_regnet(state_dict):
        return None
    layout = regnet_layout(state_dict)
    return WeightsGuess(_timm_layouts().get(layout[:4]), layout[4], _describe(layout))


def _to_timm(state_dict: dict, model: nn.Module) -> dict:
    return passl_regnet_to_timm(state_dict) if is_passl_regnet(state_dict) else state_dict


register_checkpoint_adapter(['timm.models.regnet.RegNet'],
                            CheckpointAdapter(filter_fn=_to_timm, guess_fn=guess_regnet, timm_fn=dict))
