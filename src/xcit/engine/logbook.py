"""Per-epoch records of a run: summary.csv, metrics.jsonl, optional TensorBoard, and a PNG of the curves."""
from __future__ import annotations

import csv
import json
from pathlib import Path

FIELDS = ['epoch', 'lr', 'train_loss', 'eval_loss', 'eval_top1', 'eval_top5', 'ema_top1', 'epoch_time_s',
          'train_images_per_s', 'skipped_images']


class RunLog:
    def __init__(self, run_dir: Path, tensorboard: bool = False):
        self.run_dir = run_dir
        self.summary = run_dir / 'summary.csv'
        self.jsonl = run_dir / 'metrics.jsonl'
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError('train.tensorboard needs the tensorboard package (pip install tensorboard)') from None
            self.writer = SummaryWriter(str(run_dir / 'tensorboard'))

    def forget_from(self, epoch: int) -> None:
        """Drop records of `epoch` and later: a resumed run writes them again."""
        if self.jsonl.exists():
            rows = [r for r in self.rows() if r['epoch'] < epoch]
            self.jsonl.write_text(''.join(json.dumps(r) + '\n' for r in rows))
            with open(self.summary, 'w', newline='') as f:
                writer = csv.DictWriter(f, FIELDS, extrasaction='ignore')
                writer.writeheader()
                writer.writerows(rows)

    def rows(self) -> list[dict]:
        if not self.jsonl.exists():
            return []
        return [json.loads(line) for line in self.jsonl.read_text().splitlines() if line.strip()]

    def log_epoch(self, row: dict) -> None:
        new_file = not self.summary.exists()
        with open(self.summary, 'a', newline='') as f:
            writer = csv.DictWriter(f, FIELDS, extrasaction='ignore')
            if new_file:
                writer.writeheader()
            writer.writerow(row)
        with open(self.jsonl, 'a') as f:
            f.write(json.dumps(row) + '\n')
        if self.writer is not None:
            for key, value in row.items():
                if key != 'epoch' and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, row['epoch'])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_curves(rows: list[dict], path: Path) -> Path | None:
    """Loss and top-1 against epochs."""
    if not rows:
        return None
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    epochs = [r['epoch'] + 1 for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r['train_loss'] for r in rows], marker='o', label='train')
    evaluated = [(e, r) for e, r in zip(epochs, rows) if r.get('eval_loss') is not None]
    if evaluated:
        ax_loss.plot([e for e, _ in evaluated], [r['eval_loss'] for _, r in evaluated], marker='o', label='eval')
        ax_acc.plot([e for e, _ in evaluated], [r['eval_top1'] for _, r in evaluated], marker='o', label='top-1')
        ax_acc.plot([e for e, _ in evaluated], [r['eval_top5'] for _, r in evaluated], marker='.', label='top-5')
        ema = [(e, r['ema_top1']) for e, r in evaluated if r.get('ema_top1') is not None]
        if ema:
            ax_acc.plot(*zip(*ema), marker='.', label='EMA top-1')
    ax_loss.set(xlabel='epoch', ylabel='loss', title='loss')
    ax_acc.set(xlabel='epoch', ylabel='accuracy (%)', title='validation accuracy')
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
