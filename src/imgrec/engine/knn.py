"""Classifiers on frozen features: weighted k-nearest neighbours and a linear softmax probe.

Both take features already extracted (``imgrec.engine.probe`` extracts and caches them) and
return class scores for the queries, from which ``classification_metrics`` gives top-1/top-5.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from imgrec.data.folder import class_balanced_subset


def knn_scores(
    bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, num_classes: int, *, k: int = 20, temperature: float = 0.07, chunk: int = 1024
) -> torch.Tensor:
    """Class scores [Q, C] of a weighted kNN vote (Wu et al., 2018; the DINO / solo-learn monitor).

    Similarity is the cosine of the features; each query's ``k`` most similar bank entries vote
    for their class with weight ``exp(cosine / temperature)``. Queries go in chunks so that the
    similarity matrix stays small whatever the bank's size.
    """
    if bank.shape[0] != bank_labels.shape[0]:
        raise ValueError(f"{bank.shape[0]} bank features but {bank_labels.shape[0]} labels")
    if bank.shape[0] == 0:
        raise ValueError("the kNN memory bank is empty: no labelled training features")
    k = min(k, bank.shape[0])
    chunk = max(1, min(chunk, 2**28 // bank.shape[0]))  # similarity blocks of at most 2^28 values (1 GiB)
    bank = F.normalize(bank.float(), dim=1)
    labels = bank_labels.to(bank.device, torch.int64)
    scores = []
    for start in range(0, queries.shape[0], chunk):
        query = F.normalize(queries[start : start + chunk].float().to(bank.device), dim=1)
        similarity, index = (query @ bank.T).topk(k, dim=1)
        weights = (similarity / temperature).exp()
        votes = torch.zeros(query.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
        scores.append(votes.scatter_add_(1, labels[index], weights))
    return torch.cat(scores).cpu() if scores else torch.zeros(0, num_classes)


def linear_probe(
    train: torch.Tensor,
    train_labels: torch.Tensor,
    queries: torch.Tensor,
    num_classes: int,
    *,
    epochs: int = 100,
    batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> torch.Tensor:
    """Logits [Q, C] of a linear softmax classifier trained on ``train`` features.

    The features are standardised with the training set's mean and standard deviation (the
    batch-norm-without-affine of MAE's linear probe), then one ``Linear`` layer is trained with
    cross-entropy, AdamW and a cosine schedule, in mini-batches drawn by ``seed``. On cached
    features this takes seconds. ``choose_probe_lr`` picks ``lr`` for features of unknown scale.
    """
    if train.shape[0] != train_labels.shape[0]:
        raise ValueError(f"{train.shape[0]} training features but {train_labels.shape[0]} labels")
    if train.shape[0] == 0:
        raise ValueError("the linear probe has no training features")
    train, queries = train.float(), queries.float()
    mean, std = train.mean(0), train.std(0, unbiased=False).clamp_min(1e-6)
    x, q = (train - mean) / std, (queries - mean) / std
    y = train_labels.to(torch.int64)
    generator = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(x.shape[1], num_classes)
    with torch.no_grad():
        layer.weight.normal_(0, 0.01, generator=generator)
        layer.bias.zero_()
    layer.to(x.device)
    steps_per_epoch = math.ceil(x.shape[0] / batch_size)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=lr, weight_decay=weight_decay)
    total = epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=generator).to(x.device)
        for start in range(0, x.shape[0], batch_size):
            index = order[start : start + batch_size]
            loss = F.cross_entropy(layer(x[index]), y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    with torch.no_grad():
        return layer(q).cpu()


# Searched by ``choose_probe_lr``: one fixed rate under-trains some backbones' probes (DINO's
# by 0.9-3 points at 1e-3 on fashion-mnist, SimCLR's by 0.1-0.4; BENCHMARKS.md).
PROBE_LRS = (1e-3, 3e-3, 1e-2, 3e-2)


def choose_probe_lr(
    train: torch.Tensor,
    train_labels: torch.Tensor,
    num_classes: int,
    *,
    lrs: Sequence[float] = PROBE_LRS,
    holdout: float = 0.2,
    epochs: int = 100,
    batch_size: int = 256,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> tuple[float, dict[float, float]]:
    """(the learning rate, {rate: held-out top-1 %}) for ``linear_probe`` on these features.

    Each rate trains a probe on the training features less ``holdout`` of each class (``seed``
    draws them, at least one a class) and is scored on the ones held out; the best top-1 wins,
    the first in ``lrs`` among equals (the lowest, in ``PROBE_LRS``). The query set plays no
    part. With fewer than 5 training items a class on average, too few to hold any out: the
    first rate, and an empty score table.
    """
    if not lrs:
        raise ValueError("choose_probe_lr needs at least one learning rate")
    if train_labels.numel() < 5 * num_classes:
        return float(lrs[0]), {}
    held = torch.tensor(class_balanced_subset(train_labels.tolist(), holdout, seed), dtype=torch.int64, device=train.device)
    kept = torch.ones(train_labels.numel(), dtype=torch.bool, device=train.device)
    kept[held] = False
    x, y, q, qy = train[kept], train_labels[kept], train[held], train_labels[held].cpu()
    scores = {}
    for lr in lrs:
        predicted = linear_probe(x, y, q, num_classes, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, seed=seed).argmax(dim=1)
        scores[float(lr)] = (predicted == qy).double().mean().item() * 100
    return max(scores, key=scores.__getitem__), scores  # max keeps the first of equals


__all__ = ["PROBE_LRS", "choose_probe_lr", "knn_scores", "linear_probe"]
