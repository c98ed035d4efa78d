"""Inference-only rewrites: BatchNorm folded into the convolution before it, then torch.compile."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torch.utils._pytree import tree_leaves

from .fastpath import time_paths_for_graphs
from .layers import fold_conv_bn


def fold_batchnorm(model: nn.Module) -> int:
    """Fold every BatchNorm that directly follows a convolution in a Sequential into that convolution.

    Exact in eval mode: BN's affine map folds into the conv's weights and bias.
    A BatchNorm after an activation (XCiT's LPI: conv -> GELU -> BN) is left alone:
    its shift cannot move into the next zero-padded conv without changing the borders.
    Returns the number of folds; the model's state dict changes shape, so fold after loading weights.
    """
    folded = 0
    for module in list(model.modules()):
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        for first, second in zip(names, names[1:]):
            conv, bn = module._modules[first], module._modules[second]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
                with torch.no_grad():
                    weight, bias = fold_conv_bn(conv, bn)
                fused = copy.deepcopy(conv)
                fused.weight = nn.Parameter(weight, requires_grad=conv.weight.requires_grad)
                fused.bias = nn.Parameter(bias, requires_grad=conv.weight.requires_grad)
                module._modules[first] = fused
                module._modules[second] = nn.Identity()
                folded += 1
    return folded


def compile_static(model: nn.Module, **kwargs) -> nn.Module:
    """torch.compile with one static graph per input shape, each taking the fast paths that are fastest compiled.

    Under dynamic shapes, inductor (torch 2.14) cannot order the strides of a
    channels_last view over symbolic sizes ("cannot determine truth value of
    Relational"); XCiT's LPI, its positional encoding and timm's XCiT all hit it
    once a second resolution or batch size makes dynamo go dynamic. A static graph
    per shape avoids it at the price of one recompilation per new shape.

    Before the first call with each new kind of input (shapes, dtypes, grad mode, train or
    eval), the model runs once eagerly while its 'auto' layers time their candidates
    compiled by the same backend (`time_paths_for_graphs`); the graph then takes the fastest of each.
    """
    compiled = torch.compile(model, dynamic=False, **kwargs)
    backend = kwargs.get('backend', 'inductor')
    seen = set()

    def time_paths_first(module, args, kwargs):
        signature = (model.training, torch.is_grad_enabled(), *(
            (tuple(t.shape), t.dtype, t.device) if isinstance(t, torch.Tensor) else type(t)
            for t in tree_leaves((args, kwargs))))
        if signature not in seen:
            time_paths_for_graphs(model, args, kwargs, backend)
            seen.add(signature)

    compiled.register_forward_pre_hook(time_paths_first, with_kwargs=True)
    return compiled


def optimize_for_inference(model: nn.Module, compile: bool = True) -> nn.Module:
    """The fastest inference version of `model` (same outputs within float32 rounding).

    Puts it in eval mode without gradients, folds BatchNorm into convolutions and,
    with `compile`, hands it to torch.compile, which fuses the elementwise work
    around the GEMMs (compilation takes a few seconds to a minute on a CPU, at the
    first call and for each new input shape).
    """
    model.eval().requires_grad_(False)
    fold_batchnorm(model)
    return compile_static(model) if compile else model
