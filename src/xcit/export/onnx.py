"""ONNX and TorchScript export.

Exported graphs use PyTorch's portable ops only: the model is put on its
reference path (`set_fast_path(model, 'reference')`: F.linear instead of the
oneDNN custom ops) for the export and back on its own path afterwards, so any
ONNX runtime can execute the graph. Export uses torch.export (symbolic shapes),
so the batch size, and with `dynamic_size` the height and width, stay free.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn

from ..models.fastpath import FastPathModule, set_fast_path


@contextmanager
def reference_path(model: nn.Module) -> Iterator[nn.Module]:
    """`model` on its reference path inside the block, each module back on its own path after it."""
    saved = [(module, module.impl) for module in model.modules() if isinstance(module, FastPathModule)]
    set_fast_path(model, 'reference')
    try:
        yield model
    finally:
        for module, impl in saved:
            module.impl = impl


def export_onnx(model: nn.Module, path: str | os.PathLike, image_size: tuple[int, int] = (224, 224),
                dynamic_size: bool = False, opset: int = 18) -> Path:
    """Write `model` (in eval mode) as ONNX: input `image` (B, 3, H, W), output `logits`."""
    try:
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError:
        raise ValueError('ONNX export needs the onnx and onnxscript packages: pip install onnx onnxscript') from None
    model.eval()
    example = torch.randn(2, 3, *image_size)
    shapes = {0: torch.export.Dim('batch', min=1, max=4096)}
    if dynamic_size:
        shapes[2] = torch.export.Dim('height', min=32, max=4096)
        shapes[3] = torch.export.Dim('width', min=32, max=4096)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), reference_path(model):
        program = torch.onnx.export(model, (example,), dynamo=True, input_names=['image'], output_names=['logits'],
                                    dynamic_shapes=({**shapes},), opset_version=opset, verbose=False)
    program.save(str(path))
    return path


def export_torchscript(model: nn.Module, path: str | os.PathLike, image_size: tuple[int, int] = (224, 224)) -> Path:
    """A traced TorchScript module for inputs of `image_size` (shapes are fixed by tracing)."""
    model.eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), reference_path(model):
        traced = torch.jit.trace(model, torch.randn(1, 3, *image_size))
    traced.save(str(path))
    return path
