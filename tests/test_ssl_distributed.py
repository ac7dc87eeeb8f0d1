"""Losses over the global batch under DDP: two gloo processes give what one process gives for the
whole batch: SimCLR's loss and gradients (negatives from every rank), DINO's Sinkhorn-Knopp targets."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from imgrec.engine.tasks.dino import sinkhorn_knopp
from imgrec.engine.tasks.simclr import nt_xent

WORLD, LOCAL_BATCH, DIM, TEMPERATURE = 2, 3, 5, 0.2

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def embeddings() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(WORLD * LOCAL_BATCH, DIM, generator=generator), torch.randn(WORLD * LOCAL_BATCH, DIM, generator=generator)


def scores() -> torch.Tensor:
    """Teacher scores of the whole batch; rank 1's rows shifted by 1 (each rank's exp shift differs)."""
    rows = torch.randn(WORLD * LOCAL_BATCH, DIM, generator=torch.Generator().manual_seed(1)) * 4
    rows[LOCAL_BATCH:] += 1
    return rows


def mine(rows: torch.Tensor, rank: int) -> torch.Tensor:
    return rows[rank * LOCAL_BATCH : (rank + 1) * LOCAL_BATCH]


def simclr_on_rank(rank: int) -> tuple[torch.Tensor, ...]:
    z1, z2 = (mine(z, rank).clone().requires_grad_() for z in embeddings())
    loss = nt_xent(z1, z2, TEMPERATURE)
    loss.backward()
    return loss.detach(), z1.grad, z2.grad


def sinkhorn_on_rank(rank: int) -> torch.Tensor:
    return sinkhorn_knopp(mine(scores(), rank))


def _rank_main(rank: int, port: int, work: Callable[[int], Any], results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        results[rank] = work(rank)
    finally:
        dist.destroy_process_group()


def on_two_ranks(work: Callable[[int], Any]) -> list[Any]:
    """``work(rank)`` in WORLD gloo processes; their results in rank order."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank_main, args=(port, work, results), nprocs=WORLD, join=True)
        return [results[r] for r in range(WORLD)]


def test_nt_xent_gathers_negatives_across_ranks():
    results = on_two_ranks(simclr_on_rank)
    z1, z2 = (z.clone().requires_grad_() for z in embeddings())
    full = nt_xent(z1, z2, TEMPERATURE)
    full.backward()
    # Each rank averages over its own rows: the mean of the ranks' losses is the full batch's loss.
    assert torch.allclose(torch.stack([r[0] for r in results]).mean(), full, atol=1e-6)
    # all_gather's backward sums every rank's loss into each rank's rows: WORLD x the full batch's
    # gradient of the mean loss (DDP then averages parameter gradients over the ranks).
    for rank, (_, grad1, grad2) in enumerate(results):
        assert torch.allclose(grad1, WORLD * mine(z1.grad, rank), atol=1e-5)
        assert torch.allclose(grad2, WORLD * mine(z2.grad, rank), atol=1e-5)


def test_sinkhorn_knopp_balances_the_prototypes_over_every_ranks_rows():
    results = on_two_ranks(sinkhorn_on_rank)
    whole = sinkhorn_knopp(scores())
    assert torch.allclose(torch.cat(results), whole, atol=1e-6)
    assert not torch.allclose(results[0], sinkhorn_knopp(mine(scores(), 0)), atol=1e-3)  # one rank's rows alone balance otherwise
