"""Inference-only rewrites: BatchNorm folded into the convolution before it, then torch.compile."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torch.utils._pytree import tree_leaves

from . import fastpath
from .fastpath import GRAPH, buffers_put_back, has_auto_paths, mode_tag, time_paths_for_graphs
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
    """torch.compile with one static graph per input shape, each taking the fast paths that are fastest compiled,
    and for a model with 'auto' fast paths run only where it beats the model run eagerly (`StaticGraphs`)."""
    return StaticGraphs(model, **kwargs)


def _signature(training: bool, args: tuple, kwargs: dict) -> tuple:
    return (training, torch.is_grad_enabled(), *(
        (tuple(t.shape), t.dtype, t.device) if isinstance(t, torch.Tensor) else type(t)
        for t in tree_leaves((args, kwargs))))


def _timed_run(fn, args: tuple, kwargs: dict, params: list[torch.Tensor]):
    """A zero-argument call of `fn(*args, **kwargs)`, with the backward pass to `params` where there are any
    (through autograd.grad: no .grad is touched)."""
    if not params:
        return lambda: fn(*args, **kwargs)

    def run():
        outs = [t for t in tree_leaves(fn(*args, **kwargs)) if isinstance(t, torch.Tensor) and t.requires_grad]
        return torch.autograd.grad(outs, params, [torch.ones_like(t) for t in outs], allow_unused=True)
    return run


class StaticGraphs(nn.Module):
    """`model` compiled by torch.compile with one static graph per input shape.

    Under dynamic shapes, inductor (torch 2.14) cannot order the strides of a
    channels_last view over symbolic sizes ("cannot determine truth value of
    Relational"); XCiT's LPI, its positional encoding and timm's XCiT all hit it
    once a second resolution or batch size makes dynamo go dynamic. A static graph
    per shape avoids it at the price of one recompilation per new shape.

    Before the first call with each new kind of input (shapes, dtypes, grad mode, train or
    eval), the model runs once eagerly while its 'auto' layers time their candidates
    compiled by the same backend (`time_paths_for_graphs`); the graph takes the fastest of
    each. Where the model has 'auto' layers, the whole graph is then one more choice: it is
    timed against the model run eagerly, forward and backward alike, and runs only where it
    is the faster (a CPU's compiled training step can be the slower: BENCHMARKS.md). The
    decision is kept with the layers' (`fast_path_decisions`, checkpoints), under
    '<class> <mode> <input shapes> | graph'. Under DDP the graph always runs: timing it
    would need the reducer's backward.
    """

    def __init__(self, model: nn.Module, **compile_kwargs):
        super().__init__()
        self._orig_mod = model  # torch.compile's name: whatever unwraps a compiled module unwraps this one
        # outside the module tree: the graph holds the same parameters, which must not be listed twice
        self.__dict__['graphs'] = torch.compile(model, dynamic=False, **compile_kwargs)
        self.__dict__['backend'] = compile_kwargs.get('backend', 'inductor')
        self.__dict__['runs'] = {}  # input signature -> the graphs or the model itself

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # the model's own attributes, as through torch.compile's wrapper
            return getattr(self._orig_mod, name)

    def forward(self, *args, **kwargs):
        signature = _signature(self._orig_mod.training, args, kwargs)
        run = self.runs.get(signature)
        if run is None:
            time_paths_for_graphs(self._orig_mod, args, kwargs, self.backend)
            run = self.runs[signature] = self._graph_or_eager(args, kwargs)
        return run(*args, **kwargs)

    def _graph_or_eager(self, args: tuple, kwargs: dict):
        model = self._orig_mod
        if isinstance(model, nn.parallel.DistributedDataParallel) or not has_auto_paths(model):
            return self.graphs
        params = [p for p in model.parameters() if p.requires_grad] if torch.is_grad_enabled() else []
        shapes = ' '.join(str(tuple(t.shape)) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor))
        key = f'{type(model).__name__} {mode_tag(model.training, bool(params))} {shapes}{GRAPH}'
        runs = {} if fastpath.CHOOSER.known(key) else dict(graph=_timed_run(self.graphs, args, kwargs, params),
                                                   eager=_timed_run(model, args, kwargs, params))
        with buffers_put_back(model):
            return self.graphs if fastpath.CHOOSER.choose(key, runs) == 'graph' else model


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
