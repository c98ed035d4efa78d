"""Per-epoch records of a run: summary.csv, metrics.jsonl, optional TensorBoard, a PNG of the curves,
and the list of samples that could not be read.

Rows hold whatever the task's evaluation returns (`eval_top1`, `eval_mIoU`, ...),
so the columns are those of the rows, in the order they first appear.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import yaml

# written first, in this order, when present; the task's metrics follow
LEADING_FIELDS = ['epoch', 'lr', 'train_loss']
TRAILING_FIELDS = ['epoch_time_s', 'train_images_per_s', 'skipped_images']


def _columns(rows: list[dict]) -> list[str]:
    seen = dict.fromkeys(LEADING_FIELDS)
    for row in rows:
        seen.update(dict.fromkeys(k for k in row if k not in TRAILING_FIELDS))
    seen.update(dict.fromkeys(TRAILING_FIELDS))
    return [k for k in seen if any(k in row for row in rows)]


class RunLog:
    def __init__(self, run_dir: Path, tensorboard: bool = False):
        self.run_dir = run_dir
        self.summary = run_dir / 'summary.csv'
        self.jsonl = run_dir / 'metrics.jsonl'
        self.unreadable = run_dir / 'unreadable.txt'
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError('train.tensorboard needs the tensorboard package (pip install tensorboard)') from None
            self.writer = SummaryWriter(str(run_dir / 'tensorboard'))

    def write_config(self, config: dict) -> None:
        (self.run_dir / 'config.yaml').write_text(yaml.safe_dump(config, sort_keys=False))

    def rows(self) -> list[dict]:
        if not self.jsonl.exists():
            return []
        return [json.loads(line) for line in self.jsonl.read_text().splitlines() if line.strip()]

    def _write(self, rows: list[dict]) -> None:
        self.jsonl.write_text(''.join(json.dumps(r) + '\n' for r in rows))
        with open(self.summary, 'w', newline='') as f:
            writer = csv.DictWriter(f, _columns(rows), extrasaction='ignore')
            writer.writeheader()
            writer.writerows(rows)

    def forget_from(self, epoch: int) -> None:
        """Drop records of `epoch` and later: a resumed run writes them again."""
        rows = self.rows()
        if any(r['epoch'] >= epoch for r in rows):
            self._write([r for r in rows if r['epoch'] < epoch])

    def log_epoch(self, row: dict) -> None:
        # rewritten whole: a metric first evaluated in a later epoch still gets its column
        self._write(self.rows() + [row])
        if self.writer is not None:
            for key, value in row.items():
                if key != 'epoch' and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, row['epoch'])
            self.writer.flush()

    def note_unreadable(self, names: set[str]) -> Path:
        """Add `names` to unreadable.txt (one per line, sorted, each once over the whole run)."""
        known = set(self.unreadable.read_text().splitlines()) if self.unreadable.exists() else set()
        self.unreadable.write_text(''.join(f'{name}\n' for name in sorted(known | names)))
        return self.unreadable

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def epoch_line(row: dict, epochs: int) -> str:
    """'epoch 3/15: train loss 0.4210, eval loss 0.3011, top1 91.20, ..., 540 img/s, 12.3s'."""
    text = f"epoch {row['epoch'] + 1}/{epochs}: train loss {row['train_loss']:.4f}"
    for key, value in row.items():
        if key.startswith(('eval_', 'ema_')) and isinstance(value, float):
            name = key.replace('eval_', '').replace('ema_', 'EMA ').replace('_', ' ')
            text += f', {name} {value:.4f}' if 'loss' in key else f', {name} {value:.2f}'
    return text + f", {row['train_images_per_s']:.0f} img/s, {row['epoch_time_s']:.1f}s"


def plot_curves(rows: list[dict], path: Path, metric: str) -> Path | None:
    """Losses, and the task's evaluation metric (and its EMA's), against epochs; baselines a task records
    beside its metric (`eval_<name>_<metric>`: DINO's random init and raw pixels) as dashed lines."""
    if not rows:
        return None
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, keys in ((ax_loss, ['train_loss', 'eval_loss']), (ax_metric, [f'eval_{metric}', f'ema_{metric}'])):
        for key in keys:
            points = [(r['epoch'] + 1, r[key]) for r in rows if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker='o' if key.startswith(('train', 'eval')) else '.',
                        label=key.replace('_', ' '))
        if ax is ax_metric:
            suffix = f'_{metric}'
            baselines = {k: v for r in rows for k, v in r.items() if k.startswith('eval_') and k.endswith(suffix)
                         and k not in keys and isinstance(v, (int, float))}
            for key, value in sorted(baselines.items()):
                ax.axhline(value, linestyle='--', color='gray' if 'init' in key else 'tab:red', alpha=0.8,
                           label=f"{key[len('eval_'):-len(suffix)].replace('_', ' ')} ({value:.1f})")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    ax_loss.set(xlabel='epoch', ylabel='loss', title='loss')
    ax_metric.set(xlabel='epoch', ylabel=metric, title=f'validation {metric}')
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
