"""Many processes, one run: PyTorch's own engine (torchrun + DistributedDataParallel).

``torchrun --nproc_per_node N -m imgrec train ...`` starts N copies of the command with RANK,
WORLD_SIZE, LOCAL_RANK and the rendezvous address in their environment; ``setup`` joins them in
one process group (NCCL on GPUs, gloo on CPUs) and gives each its device. Every rank reads its
own part of the data, DDP averages the gradients, and the helpers here reduce what the ranks
measured. Only rank 0 writes files. Outside torchrun every helper is the single-process identity.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from imgrec.hardware import resolve_device


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0: the one process that writes logs, checkpoints and the model directory."""
    return rank() == 0


def setup(device: str) -> torch.device:
    """Join torchrun's process group (when WORLD_SIZE > 1) and return this process's device.

    ``device`` is the run's setting: ``auto`` takes GPU ``LOCAL_RANK`` where there are GPUs (the
    CPU otherwise), ``cuda`` the same explicitly, ``cpu`` the CPU; ``cuda:N`` is refused with
    several processes, as every rank would take the same GPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return resolve_device(device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda:"):
        raise ValueError(f"--device {device} names one GPU, but torchrun started {world} processes: pass --device cuda (each rank takes GPU LOCAL_RANK)")
    resolved = resolve_device(device)
    if resolved.type == "cuda":
        resolved = torch.device("cuda", local_rank)
        torch.cuda.set_device(resolved)
    if not is_distributed():
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        dist.init_process_group(
            backend, store=rendezvous_store(world), rank=int(os.environ["RANK"]), world_size=world,
            timeout=TIMEOUT, device_id=resolved if resolved.type == "cuda" else None,
        )  # fmt: skip
    return resolved


TIMEOUT = datetime.timedelta(minutes=30)


def rendezvous_store(world: int) -> dist.Store:
    """torchrun's key-value store, seen through a prefix of its restart round.

    After ``torchrun --max-restarts`` restarts the workers, the store of the agent can still hold
    the previous round's entries, and a new rank may read a dead peer's address from it: gloo
    then fails to connect or hangs. A prefix per round (TORCHELASTIC_RESTART_COUNT) makes every
    round meet only its own peers.
    """
    agent_hosts_it = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
        is_master=not agent_hosts_it and int(os.environ["RANK"]) == 0, timeout=TIMEOUT,
    )  # fmt: skip
    return dist.PrefixStore(f"imgrec/round-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def teardown() -> None:
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every rank gets here (nothing to wait for in one process)."""
    if is_distributed():
        dist.barrier()


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """``tensor`` summed (``op="sum"``) or maximised (``"max"``) over the ranks, in place."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` concatenated along dim 0, in rank order; the ranks may hold different
    numbers of rows (an evaluation split of N images over R ranks)."""
    if not is_distributed():
        return tensor
    count = torch.tensor([tensor.shape[0]], device=tensor.device)
    counts = [torch.zeros_like(count) for _ in range(world_size())]
    dist.all_gather(counts, count)
    longest = int(max(c.item() for c in counts))
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[: int(c.item())] for part, c in zip(parts, counts)])


def gather_objects(value: Any) -> list[Any]:
    """Every rank's picklable ``value``, in rank order (on every rank)."""
    if not is_distributed():
        return [value]
    values: list[Any] = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def wrap(module: torch.nn.Module, device: torch.device, *, sync_bn: bool = False) -> torch.nn.Module:
    """``module`` in DistributedDataParallel when there are several ranks (itself otherwise), its
    batch norms synchronised across ranks with ``sync_bn``. Saving goes through the unwrapped module."""
    if sync_bn and world_size() > 1:
        if device.type != "cuda":
            raise ValueError("--sync-bn needs GPUs (PyTorch's SyncBatchNorm runs on CUDA only): drop it on CPU")
        module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if world_size() == 1:
        return module
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is true on some rank."""
    return bool(all_reduce(torch.tensor([float(flag)], device=device), op="max").item())


@contextlib.contextmanager
def process_group(device: str) -> Iterator[torch.device]:
    """``setup(device)`` for the block, and the process group left again after it if the block
    created it (a caller that set up its own group keeps it)."""
    created = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_distributed()
    try:
        yield setup(device)
    finally:
        if created:
            teardown()


__all__ = [
    "all_reduce",
    "gather_objects",
    "gather_rows",
    "is_distributed",
    "is_main",
    "any_rank",
    "barrier",
    "process_group",
    "rank",
    "setup",
    "teardown",
    "world_size",
    "wrap",
]
