"""Losses over the global batch under DDP: two gloo processes give what one process gives for the
whole batch: SimCLR's loss and gradients (negatives from every rank), DINO's Sinkhorn-Knopp targets."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from imgrec.engine.tasks.dino import sinkhorn_knopp
from imgrec.engine.tasks.simclr import nt_xent

WORLD, LOCAL_BATCH, DIM, TEMPERATURE = 2, 3, 5, 0.2


def embeddings() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(WORLD * LOCAL_BATCH, DIM, generator=generator), torch.randn(WORLD * LOCAL_BATCH, DIM, generator=generator)


def _rank_main(rank: int, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        z1, z2 = (z[rank * LOCAL_BATCH : (rank + 1) * LOCAL_BATCH].clone().requires_grad_() for z in embeddings())
        loss = nt_xent(z1, z2, TEMPERATURE)
        loss.backward()
        results[rank] = (loss.detach(), z1.grad, z2.grad)
    finally:
        dist.destroy_process_group()


def scores() -> torch.Tensor:
    return torch.randn(WORLD * LOCAL_BATCH, DIM, generator=torch.Generator().manual_seed(1)) * 4


def _sinkhorn_rank(rank: int, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        results[rank] = sinkhorn_knopp(scores()[rank * LOCAL_BATCH : (rank + 1) * LOCAL_BATCH] + rank)  # a different shift per rank too
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_nt_xent_gathers_negatives_across_ranks():
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank_main, args=(free_port(), results), nprocs=WORLD, join=True)
        results = dict(results)

    z1, z2 = (z.clone().requires_grad_() for z in embeddings())
    full = nt_xent(z1, z2, TEMPERATURE)
    full.backward()
    # Each rank averages over its own rows: the mean of the ranks' losses is the full batch's loss.
    assert torch.allclose(torch.stack([results[r][0] for r in range(WORLD)]).mean(), full, atol=1e-6)
    # all_gather's backward sums every rank's loss into each rank's rows: WORLD x the full batch's
    # gradient of the mean loss (DDP then averages parameter gradients over the ranks).
    for rank in range(WORLD):
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        assert torch.allclose(results[rank][1], WORLD * z1.grad[rows], atol=1e-5)
        assert torch.allclose(results[rank][2], WORLD * z2.grad[rows], atol=1e-5)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_sinkhorn_knopp_balances_the_prototypes_over_every_ranks_rows():
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_sinkhorn_rank, args=(free_port(), results), nprocs=WORLD, join=True)
        results = dict(results)
    rows = scores()
    rows[LOCAL_BATCH:] += 1
    whole = sinkhorn_knopp(rows)
    assert torch.allclose(torch.cat([results[r] for r in range(WORLD)]), whole, atol=1e-6)
    assert not torch.allclose(results[0], sinkhorn_knopp(rows[:LOCAL_BATCH]), atol=1e-3)  # one rank's rows alone balance otherwise
