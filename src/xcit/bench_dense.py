"""Dense scaling benchmark: forward time and peak memory of a detector's backbone and FPN against image size.

What Mask R-CNN's RPN and heads consume, the backbone's stride 4/8/16/32 maps through a 256-channel
FeaturePyramidNetwork with the extra max-pooled level, for XCiT (as our registered `maskrcnn_` detector
builds it), torchvision's ResNet-50-FPN and torchvision's Swin-T with the Swin Mask R-CNN recipe's FPN.

- Every model sees the same image at each size, zero-padded at the bottom and right to a multiple of 32
  as the detector's transform batches images, so that every level's stride is exact (Swin's window
  attention pads its maps to whole windows itself).
- The models are built once, with random weights, in eval mode; at each size each is warmed up and
  timed in turn, batch 1, float32, under `torch.inference_mode`.
- Peak memory is that of one warmed-up forward above the weights and the image: on a CPU in a fresh
  process per (model, size), as `bench.peak_memory_mb` measures it; on CUDA the allocator's peak.
"""
from __future__ import annotations

import statistics
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .bench import _timed, in_fresh_process, plot_growth, step_peak_mb

BASELINES = ('resnet50', 'swin_t')  # torchvision's, with their FPNs
DEFAULT_MODELS = ('xcit_small_12_p16', 'resnet50', 'swin_t')
DEFAULT_SIZES = (512, 640, 800, 1024, 1280, 1600)
MAX_SIZE = 4096
SIZE_DIVISOR = 32  # the coarsest stride, to which torchvision's detection transform pads a batch


@dataclass
class DenseResult:
    model: str
    img_size: int  # side of the square image
    input_size: int  # the side padded to a multiple of SIZE_DIVISOR: what the backbone sees
    pixels: int  # input_size ** 2
    tokens: int | None  # XCiT's patch tokens; None for the convolutional and windowed baselines
    step_time_ms: float  # median over the timed forwards
    step_time_spread_ms: float  # half their range
    peak_mb: float | None
    param_count_m: float  # backbone and FPN
    levels: dict[str, list[int]]  # FPN level -> (channels, height, width)
    batch_size: int
    device: str


class SwinFPN(nn.Module):
    """torchvision's Swin-T, each stage's output layer-normed, into a 256-channel FPN with the max-pooled level:
    the backbone and neck of the Swin Mask R-CNN recipe, which torchvision does not ship."""

    def __init__(self, out_channels: int = 256):
        super().__init__()
        from torchvision.models import swin_t
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
        self.body = swin_t(weights=None).features  # patch embedding, then stage, merging, ..., stage
        embed_dim = self.body[0][0].out_channels
        widths = [embed_dim * 2 ** i for i in range(4)]  # 96 / 192 / 384 / 768 at strides 4 / 8 / 16 / 32
        self.norms = nn.ModuleList(nn.LayerNorm(width) for width in widths)
        self.fpn = FeaturePyramidNetwork(widths, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        features = OrderedDict()
        for i, layer in enumerate(self.body):
            x = layer(x)
            if i % 2:  # the end of a stage, (B, H, W, C)
                level = len(features)
                features[str(level)] = self.norms[level](x).permute(0, 3, 1, 2).contiguous()
        return self.fpn(features)


def check_models(names: Sequence[str]) -> None:
    from .registry import is_model
    unknown = [n for n in names if n not in BASELINES and not is_model(f'maskrcnn_{n}')]
    if unknown or not names:
        raise ValueError(f"unknown dense model(s): {', '.join(unknown) or 'none given'}; choose from "
                         f"{', '.join(BASELINES)} or an XCiT backbone with a maskrcnn_ detector (e.g. xcit_small_12_p16)")


def check_sizes(sizes: Sequence[int]) -> None:
    bad = [s for s in sizes if not 1 <= s <= MAX_SIZE]
    if bad or not sizes:
        raise ValueError(f"image sizes must be from 1 to {MAX_SIZE} pixels, got {', '.join(map(str, bad)) or 'none'}")


def build_pyramid(name: str) -> nn.Module:
    """Backbone and FPN of `name` in eval mode, random weights: (B, 3, H, W) -> {'0', '1', '2', '3', 'pool'}."""
    check_models([name])
    if name == 'resnet50':
        from torchvision.models.detection import maskrcnn_resnet50_fpn
        return maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).backbone.eval()
    if name == 'swin_t':
        return SwinFPN().eval()
    from .factory import create_model
    return create_model(f'maskrcnn_{name}').backbone.eval()  # the registered detector's own backbone


def padded_image(img_size: int, device: str = 'cpu') -> torch.Tensor:
    """The same random image for every model at this size, zero-padded as a detector batch is."""
    generator = torch.Generator().manual_seed(img_size)
    image = torch.randn(1, 3, img_size, img_size, generator=generator)
    pad = -img_size % SIZE_DIVISOR
    return F.pad(image, (0, pad, 0, pad)).to(device)


def _tokens(model: nn.Module, input_size: int) -> int | None:
    patch = getattr(getattr(model, 'body', None), 'patch_size', None)  # XCiT's trunk; the baselines have none
    return (input_size // patch) ** 2 if isinstance(patch, int) else None


def _forward(model: nn.Module, image: torch.Tensor) -> Callable[[], None]:
    def step():
        with torch.inference_mode():
            model(image)
    return step


def _measure_peak_mb(name: str, img_size: int, device: str, fast_paths: dict) -> float:
    from .models.fastpath import CHOOSER
    CHOOSER.load_state_dict(fast_paths)  # the paths the timed run took
    torch.manual_seed(0)
    step = _forward(build_pyramid(name).to(device), padded_image(img_size, device))
    step()
    return step_peak_mb(step, device)


def dense_sweep(models: Sequence[str] = DEFAULT_MODELS, resolutions: Sequence[int] = DEFAULT_SIZES,
                iters: int = 3, warmup: int = 1, device: str = 'cpu', memory: bool = True) -> list[DenseResult]:
    """Every model at each size in turn, timed in this process; peak memory in a fresh process per point on a CPU."""
    from .models.fastpath import CHOOSER
    check_models(models)
    check_sizes(resolutions)
    if iters < 1 or warmup < 1:
        raise ValueError('iters and warmup must be at least 1')
    built = {}
    for name in models:
        torch.manual_seed(0)
        built[name] = build_pyramid(name).to(device)
    results = []
    for size in resolutions:
        image = padded_image(size, device)
        input_size = image.shape[-1]
        for name, model in built.items():
            with torch.inference_mode():  # the first warm-up forward, whose levels are recorded
                levels = {key: list(level.shape[1:]) for key, level in model(image).items()}
            step = _forward(model, image)
            _timed(step, warmup - 1, device)
            times = _timed(step, iters, device)
            peak = None
            if memory:
                peak = (step_peak_mb(step, device) if device.startswith('cuda') else
                        in_fresh_process(_measure_peak_mb, name, size, device, CHOOSER.state_dict()))
            results.append(DenseResult(
                name, size, input_size, input_size ** 2, _tokens(model, input_size),
                step_time_ms=round(statistics.median(times), 2),
                step_time_spread_ms=round((max(times) - min(times)) / 2, 2),
                peak_mb=None if peak is None else round(peak, 1),
                param_count_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
                levels=levels, batch_size=1, device=device))
    return results


def plot_dense(results: Sequence[DenseResult], path) -> None:
    """Time and memory against pixels, log-log, one line per model, with linear growth drawn from each first point."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    series: dict[str, list[DenseResult]] = {}
    for r in results:
        series.setdefault(r.model, []).append(r)
    for ax, key, label in ((axes[0], 'step_time_ms', 'backbone + FPN forward (ms per image)'),
                           (axes[1], 'peak_mb', 'peak memory (MB)')):
        if not any(getattr(r, key) for r in results):
            ax.text(0.5, 0.5, 'not measured', ha='center', va='center', transform=ax.transAxes)
        plot_growth(ax, series, 'pixels', key)
        ax.set(xscale='log', yscale='log', xlabel='pixels (side of the padded image, squared)', ylabel=label)
        sizes = sorted({(r.pixels, r.input_size) for r in results})
        ax.set_xticks([n for n, _ in sizes], [f'{side}\u00b2' for _, side in sizes])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(alpha=0.3, which='both')
    axes[0].plot([], [], 'k:', label='linear in pixels')
    axes[0].legend(fontsize=8)
    axes[0].set_title('inference time, batch 1')
    axes[1].set_title('inference peak memory')
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
