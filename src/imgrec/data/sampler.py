"""The order in which a rank reads a folder dataset: a pure function of (seed, epoch, rank).

``EpochSampler`` draws one permutation of the whole dataset per epoch from (seed, epoch), the
same in every process, and deals it to the ranks by interleaving: rank r of R reads positions
r, r + R, r + 2R, ... So R ranks with batch B see, step by step, exactly the images one process
with batch R x B would see, and a run resumed in the middle of an epoch can skip what it has
already read (``skip``) and read the rest in the same order.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler[int]):
    """Indices of this rank's share of one epoch.

    ``shuffle`` draws a new permutation each epoch (``set_epoch``); without it the order is the
    dataset's. ``drop_last`` (training) cuts the epoch to a multiple of ``world`` so that every
    rank reads as many images; without it (evaluation) the ranks' shares partition the dataset,
    each index read exactly once, and differ in size by at most one. With ``weights`` (one per
    index) an epoch is ``length`` indices drawn with replacement in proportion to them, from the
    same (seed, epoch) generator: a class-balanced epoch (``class_balanced_weights``).
    """

    def __init__(
        self, length: int, *, seed: int = 0, rank: int = 0, world: int = 1, shuffle: bool = True, drop_last: bool = True, weights: Sequence[float] | None = None
    ):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in [0, {world})")
        if weights is not None and len(weights) != length:
            raise ValueError(f"{len(weights)} sampling weights for {length} images")
        self.length, self.seed, self.rank, self.world = length, seed, rank, world
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.shuffle, self.drop_last = shuffle, drop_last
        self.epoch, self.skipped = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.skipped = epoch, 0

    def skip(self, count: int) -> None:
        """Leave out the first ``count`` indices of this epoch's share (read before a resume)."""
        self.skipped = count

    def order(self) -> list[int]:
        """This epoch's order of the whole dataset (the same in every rank)."""
        if not self.shuffle:
            return list(range(self.length))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.weights is not None:
            return torch.multinomial(self.weights, self.length, replacement=True, generator=generator).tolist()
        return torch.randperm(self.length, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        order = self.order()
        if self.drop_last:
            order = order[: len(order) - len(order) % self.world]
        return iter(order[self.rank :: self.world][self.skipped :])

    def __len__(self) -> int:
        """The share's full size: the loader's batches per epoch do not shrink after a ``skip``."""
        if self.drop_last:
            return self.length // self.world
        return len(range(self.rank, self.length, self.world))


def class_balanced_weights(labels: Sequence[int]) -> list[float]:
    """One weight per image, the inverse of its class's count: every class drawn equally often."""
    counts = Counter(labels)
    return [1.0 / counts[label] for label in labels]


__all__ = ["EpochSampler", "class_balanced_weights"]
