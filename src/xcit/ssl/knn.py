"""Label-efficient read-outs of frozen features: DINO's weighted k-NN and a linear probe.

Both work on feature matrices already extracted (`extract_features`), so one pass of the
backbone over the labelled train and val splits serves every k, temperature and probe.
"""
from __future__ import annotations

import copy
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.swa_utils import update_bn


@torch.no_grad()
def extract_features(backbone: nn.Module, batches: Iterable, device: torch.device | str = 'cpu'
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) float32 features of `backbone` (in eval mode) and the (N,) labels, over batches of (images, targets)."""
    backbone.eval()
    features, labels = [], []
    for batch in batches:
        images, targets = batch[0], batch[1]
        if not len(targets):
            continue
        features.append(backbone(images.to(device)).float().cpu())
        labels.append(targets.cpu())
    if not features:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(features), torch.cat(labels)


def with_data_statistics(backbone: nn.Module, batches: Iterable, device: torch.device | str = 'cpu') -> nn.Module:
    """A copy of `backbone` whose BatchNorm running statistics are the average over `batches` of (images, targets).

    A new network's statistics (mean 0, variance 1) describe no data, and the first steps of any training,
    even at a learning rate of 0, replace them: a random-init baseline read out without this credits
    pretraining with that calibration alone (k-NN 86 -> 92 % on the plain digits)."""
    calibrated = copy.deepcopy(backbone)
    update_bn((batch[0] for batch in batches if len(batch[1])), calibrated, device)
    return calibrated.eval()


@torch.no_grad()
def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, features: torch.Tensor, k: int = 20,
                temperature: float = 0.07, num_classes: int | None = None, chunk: int = 1024) -> torch.Tensor:
    """Class scores (M, C) of weighted k-NN (DINO's eval_knn): cosine similarity to the train features, the k
    nearest vote for their class with weight exp(similarity / temperature)."""
    num_classes = num_classes or int(train_labels.max()) + 1
    train = F.normalize(train_features.float(), dim=1)  # (N, D)
    k = min(k, len(train))
    scores = []
    for rows in F.normalize(features.float(), dim=1).split(chunk):  # (m, D)
        similarity, index = (rows @ train.T).topk(k, dim=1)  # (m, k)
        votes = torch.zeros(len(rows), num_classes, dtype=torch.float32)
        votes.scatter_add_(1, train_labels[index], (similarity / temperature).exp())
        scores.append(votes)
    return torch.cat(scores) if scores else torch.zeros(0, num_classes)


def knn_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor, features: torch.Tensor,
                 labels: torch.Tensor, k: int = 20, temperature: float = 0.07) -> float:
    """Top-1 (%) of `knn_predict` on (`features`, `labels`)."""
    num_classes = int(max(train_labels.max(), labels.max())) + 1
    scores = knn_predict(train_features, train_labels, features, k, temperature, num_classes)
    return 100.0 * (scores.argmax(dim=1) == labels).float().mean().item()


def linear_probe_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor, features: torch.Tensor,
                          labels: torch.Tensor, epochs: int = 100, lr: float = 0.01, batch_size: int = 256,
                          seed: int = 0) -> float:
    """Top-1 (%) of a linear classifier trained on the frozen train features (cross-entropy, SGD with momentum
    0.9 and a cosine lr, no weight decay: DINO's eval_linear over cached features). The features are
    standardised with the train split's statistics, so one lr suits any backbone."""
    g = torch.Generator().manual_seed(seed)
    mean, std = train_features.mean(0), train_features.std(0).clamp_min(1e-6)
    train, test = (train_features - mean) / std, (features - mean) / std
    num_classes = int(max(train_labels.max(), labels.max())) + 1
    probe = nn.Linear(train.shape[1], num_classes)
    nn.init.normal_(probe.weight, std=0.01, generator=g)
    nn.init.zeros_(probe.bias)
    optimizer = torch.optim.SGD(probe.parameters(), lr=lr, momentum=0.9)
    steps_per_epoch = max(1, -(-len(train) // batch_size))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(len(train), generator=g)
            for rows in order.split(batch_size):
                loss = F.cross_entropy(probe(train[rows]), train_labels[rows])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
    with torch.no_grad():
        return 100.0 * (probe(test).argmax(dim=1) == labels).float().mean().item()
