"""`xcit eval --image-sizes 160,224,384`: one checkpoint's accuracy, speed and memory at each test resolution.

The XCiT paper's robustness-to-resolution study: a model trained at one size,
evaluated at others without fine-tuning. Each size gets the configured
evaluation transform (resize to size / crop_pct, center crop), so the sweep
sees what `xcit eval` sees at that size. A second checkpoint (`--compare-load`,
of ours or of a timm model such as a DeiT) is evaluated on the same data and
drawn on the same axes.
"""
from __future__ import annotations

import csv
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch.nn as nn

from ..config import Config
from ..engine import DistEnv, distributed_session, evaluate

MIN_SIZE, MAX_SIZE = 16, 4096
FILE_STEM = 'resolution'


@dataclass
class SizeResult:
    model: str
    image_size: int
    top1: float
    top5: float
    images_per_s: float  # the evaluation pass end to end, data loading included
    peak_mb: float | None  # above the weights: the CUDA allocator's peak, or the resident set's growth on a CPU
    count: int


def parse_sizes(text: str) -> list[int]:
    """'160,224,384' -> [160, 224, 384]; anything else is a ValueError that names the bad entry."""
    sizes = []
    for part in text.split(','):
        part = part.strip()
        try:
            size = int(part)
        except ValueError:
            raise ValueError(f'--image-sizes: {part!r} is not an integer (e.g. --image-sizes 160,224,384)') from None
        if not MIN_SIZE <= size <= MAX_SIZE:
            raise ValueError(f'--image-sizes: {size} is outside {MIN_SIZE} to {MAX_SIZE} pixels')
        sizes.append(size)
    return list(dict.fromkeys(sizes))


def comparison_model(config: Config, name: str | None, weights: str, num_classes: int) -> nn.Module:
    """The config's model with `weights`; or the registered model `name` with them (and its run's model
    arguments), else the timm model `name` loaded with them.

    A timm ViT is built with `dynamic_img_size` and `dynamic_img_pad`: its position embedding is
    interpolated to each size, and a size that is no multiple of its patch is padded to one.
    """
    from ..checkpoints.load import load_into, read_state_dict
    from ..factory import create_model
    from ..registry import is_model
    from ._weights import model_with_weights
    if name is None:
        return create_model(config.model.name, checkpoint_path=weights, num_classes=num_classes, **config.model.kwargs)
    if is_model(name):
        return model_with_weights(name, weights)[0]
    import timm
    if not timm.is_model(name):
        raise ValueError(f'--compare-model {name!r} is neither an xcit nor a timm model')
    try:
        model = timm.create_model(name, num_classes=num_classes, dynamic_img_size=True, dynamic_img_pad=True)
    except TypeError:  # a model of fixed-free input size (a CNN) takes no such argument
        model = timm.create_model(name, num_classes=num_classes)
    state_dict, label = read_state_dict(weights)
    load_into(model, state_dict, source=label)
    return model.eval()


def sweep_sizes(task, model: nn.Module, label: str, config: Config, sizes: list[int], env: DistEnv) -> list[SizeResult]:
    """`model` evaluated by `task` on its validation images at each size, with the model's own transform defaults."""
    from ..bench import step_peak_mb
    from ..data import build_eval_loader
    model.to(env.device).eval()
    results = []
    for size in sizes:
        sized = config.model_copy(update={'data': config.data.model_copy(update={'image_size': size})})
        task.val_loader = build_eval_loader(sized, getattr(model, 'pretrained_cfg', None) or {}, task.val_source,
                                            env.rank, env.world_size, pin_memory=env.device.type == 'cuda')
        outcome = {}

        def run_once():
            start = time.perf_counter()
            outcome['metrics'] = evaluate(task, model, env, config.train.amp)[0]
            outcome['seconds'] = time.perf_counter() - start

        peak = step_peak_mb(run_once, env.device.type)
        metrics = outcome['metrics']
        results.append(SizeResult(label, size, round(metrics['top1'], 3), round(metrics['top5'], 3),
                                  round(metrics['count'] / max(outcome['seconds'], 1e-9), 1), round(peak, 1),
                                  metrics['count']))
    return results


def run_sweep(config: Config, load: str, sizes: list[int], compare_load: str | None = None,
              compare_model: str | None = None) -> list[SizeResult]:
    """The checkpoint `load` (and `compare_load`) at each size, on the config's validation data."""
    from ..seeding import rng_scope
    from ..tasks import build_task
    if config.task != 'classification':
        raise ValueError(f'--image-sizes measures classification accuracy; this config runs task {config.task!r}')
    task = build_task(config, load, evaluate_only=True)
    # a bad name or file for the second model fails before anything is evaluated
    other = comparison_model(config, compare_model, compare_load, task.num_classes) if compare_load else None
    with distributed_session(config.train.device) as env:
        with rng_scope(config.seed):
            task.setup(env, fresh=True)
        results = sweep_sizes(task, task.model, f'{config.model.name} ({Path(load).name})', config, sizes, env)
        if other is not None:
            label = f'{compare_model or config.model.name} ({Path(compare_load).name})'
            results += sweep_sizes(task, other, label, config, sizes, env)
    return results


def format_table(results: list[SizeResult]) -> str:
    lines = [f"{'model':<44} {'size':>5} {'top-1':>7} {'top-5':>7} {'images/s':>9} {'peak MB':>8}"]
    for r in results:
        peak = '-' if r.peak_mb is None else f'{r.peak_mb:.1f}'
        lines.append(f'{r.model[:44]:<44} {r.image_size:>5} {r.top1:>7.2f} {r.top5:>7.2f} {r.images_per_s:>9.1f} {peak:>8}')
    return '\n'.join(lines)


def write_results(results: list[SizeResult], out: Path, trained_size: int | None = None) -> list[Path]:
    """resolution.json, resolution.csv and resolution.png (top-1 against size, one line per model) in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [asdict(r) for r in results]
    paths = [out / f'{FILE_STEM}.json', out / f'{FILE_STEM}.csv', out / f'{FILE_STEM}.png']
    paths[0].write_text(json.dumps(rows, indent=1) + '\n')
    with open(paths[1], 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot_top1(results, paths[2], trained_size)
    return paths


def plot_top1(results: list[SizeResult], path: Path, trained_size: int | None = None) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label in dict.fromkeys(r.model for r in results):
        series = [r for r in results if r.model == label]
        ax.plot([r.image_size for r in series], [r.top1 for r in series], 'o-', label=label)
    if trained_size:
        ax.axvline(trained_size, color='grey', linestyle=':', label=f'training size ({trained_size})')
    sizes = sorted({r.image_size for r in results})
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set(xlabel='test resolution (pixels)', ylabel='top-1 accuracy (%)', title='accuracy against test resolution')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
