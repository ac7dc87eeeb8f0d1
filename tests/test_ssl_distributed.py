"""SimCLR's negatives come from every rank: two gloo processes give the loss and gradients of one big batch."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

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
