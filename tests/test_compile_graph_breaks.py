"""torch.compile sees an XCiT forward as one graph: a break would split it and leave the pieces unfused.

Checked with torch._dynamo.explain, which traces without compiling (a few seconds on a CPU); the GPU
script (benchmarks/gpu.py, stage `explain`) records the same on CUDA.
"""
import contextlib

import pytest
import torch

import xcit


@pytest.mark.parametrize('mode, precision', [('infer', None), ('train', torch.bfloat16)])
def test_an_xcit_forward_is_one_graph_without_breaks(mode, precision):
    """Inference in float32 (the paths outside autocast) and a training forward under bf16 autocast (the
    float32 normalisation inside it); 'auto' fast paths, which take the reference while compiling."""
    torch._dynamo.reset()
    model = xcit.create_model('xcit_nano_12_p16_224', depth=2, num_classes=10).train(mode == 'train')
    x = torch.randn(2, 3, 48, 48)
    autocast = torch.autocast('cpu', dtype=precision) if precision else contextlib.nullcontext()
    with autocast, torch.inference_mode(mode == 'infer'):
        explained = torch._dynamo.explain(model)(x)
    torch._dynamo.reset()
    assert explained.graph_break_count == 0, [str(r) for r in explained.break_reasons]
    assert explained.graph_count == 1
    assert explained.op_count > 50  # the whole model was traced, not skipped
