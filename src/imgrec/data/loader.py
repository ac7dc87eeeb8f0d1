"""DataLoaders of uint8 batches: as many workers as cores, pinned memory when a GPU waits."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from imgrec.utils import available_cpus


def create_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    train: bool,
    num_workers: int | None = None,
    seed: int = 0,
    pin_memory: bool | None = None,
    persistent_workers: bool | None = None,
) -> DataLoader:
    """A DataLoader yielding (uint8 images [B, 3, H, W], int64 labels [B]).

    ``train`` shuffles (with a generator fixed by ``seed``) and drops the last partial batch so
    that every step sees ``batch_size`` images; evaluation keeps every image in order.
    Persistent workers (the default for training) save the workers' start-up each epoch; the
    training loop turns them off so that re-seeding ``loader.generator`` before each epoch fixes
    that epoch's order and augmentation, whatever epoch a resumed run starts at.
    """
    workers = available_cpus() if num_workers is None else num_workers
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train,
        drop_last=train and len(dataset) >= batch_size,
        num_workers=workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        persistent_workers=workers > 0 and (train if persistent_workers is None else persistent_workers),
        generator=generator,
        prefetch_factor=4 if workers > 0 else None,
    )
