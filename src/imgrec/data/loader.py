"""DataLoaders of uint8 batches: as many workers as cores, pinned memory when a GPU waits."""

from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

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
    low_priority_workers: bool = False,
    skip_none: bool = False,
) -> DataLoader:
    """A DataLoader yielding (uint8 images [B, 3, H, W], int64 labels [B]).

    ``train`` shuffles (with a generator fixed by ``seed``) and drops the last partial batch so
    that every step sees ``batch_size`` images; evaluation keeps every image in order.
    Persistent workers (the default for training) save the workers' start-up each epoch; the
    training loop turns them off so that re-seeding ``loader.generator`` before each epoch fixes
    that epoch's order and augmentation, whatever epoch a resumed run starts at.

    ``low_priority_workers`` is for training on the CPU, where the workers share the cores with
    the model's compute threads: a worker that preempts one of them stalls every thread at the
    next barrier, so the workers run only on otherwise idle cores (SCHED_IDLE); they still get
    the CPU whenever the model waits for data. On 2 cores that made a resnet18 step about 5% faster.
    ``skip_none`` drops the ``None`` samples of a dataset built with ``replace_bad=False``.
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
        worker_init_fn=lower_worker_priority if low_priority_workers and workers > 0 else None,
        collate_fn=collate_skipping_none if skip_none else None,
    )


def collate_skipping_none(batch: list) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Collate the samples that loaded (a dataset with ``replace_bad=False`` gives ``None`` for a
    bad file); ``None`` for a batch of nothing but bad files."""
    kept = [sample for sample in batch if sample is not None]
    return default_collate(kept) if kept else None


def lower_worker_priority(worker_id: int) -> None:
    """Run this worker only when a core would otherwise idle (Linux), or at the lowest nice level."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        try:
            os.nice(19)
        except (AttributeError, OSError):
            pass
