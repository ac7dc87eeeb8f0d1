"""Dynamic batching: concurrent requests share one forward pass.

Requests wait in a queue; the batching task takes the first, then whatever arrives within
``max_wait`` seconds up to ``max_batch`` images, runs them as one batch on a single inference
thread (the event loop keeps accepting and decoding meanwhile) and hands each request its rows.
Under load the queue fills while a batch runs, so the next batch forms without waiting at all;
alone, a request waits at most ``max_wait``. A request of more than ``max_batch`` images runs
alone, in chunks of ``max_batch``. With ``pad``, the network runs only at batch sizes 1, 2, 4, ...
``max_batch``: a batch is padded with zeros up to the next size and its padding dropped from
the answer (the rows of a network in eval mode do not see one another). Every ``TRIM_SECONDS``
the inference thread hands the C heap's free pages back to the system (glibc's ``malloc_trim``):
a server that allocates and frees the same large buffers at every batch (bf16 autocast casts
the weights at each call) otherwise keeps a growing heap it does not use.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch


TRIM_SECONDS = 5.0


def _malloc_trim() -> ctypes._CFuncPtr | None:
    """glibc's malloc_trim, or None where the C library has none (musl, macOS, Windows)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


class DynamicBatcher:
    def __init__(
        self,
        forward: Callable[[torch.Tensor], torch.Tensor],
        *,
        max_batch: int = 16,
        max_wait: float = 0.005,
        on_batch: Callable[[int, float], None] | None = None,
        pad: bool = False,
    ):
        if max_batch < 1 or max_wait < 0:
            raise ValueError(f"max_batch must be >= 1 and max_wait >= 0, got {max_batch} and {max_wait}")
        self.forward, self.max_batch, self.max_wait, self.on_batch = forward, max_batch, max_wait, on_batch
        # with pad, the network sees only these batch sizes (a batch is padded with zeros up to the next)
        self.sizes = sorted({min(1 << k, max_batch) for k in range(max_batch.bit_length() + 1)}) if pad else None
        self.queue: asyncio.Queue[tuple[torch.Tensor, asyncio.Future]] | None = None
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="imgrec-inference")
        self.task: asyncio.Task | None = None
        self.held: tuple[torch.Tensor, asyncio.Future] | None = None  # a request that did not fit the last batch
        self.trim, self.trimmed_at = _malloc_trim(), time.monotonic()

    async def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.create_task(self._run(), name="imgrec-batcher")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        self.executor.shutdown(wait=True)

    async def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        """The logits of ``inputs`` [n, 3, S, S] (normalised float), computed in some batch."""
        if self.queue is None:
            raise RuntimeError("the batcher is not started (DynamicBatcher.start)")
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((inputs, future))
        return await future

    async def _next_batch(self) -> list[tuple[torch.Tensor, asyncio.Future]]:
        first = self.held or await self.queue.get()
        self.held = None
        items, count = [first], len(first[0])
        deadline = time.monotonic() + self.max_wait
        while count < self.max_batch:
            try:
                item = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self.queue.get(), remaining)
                except TimeoutError:
                    break
            if count + len(item[0]) > self.max_batch:
                self.held = item  # first in the next batch
                break
            items.append(item)
            count += len(item[0])
        return items

    def _forward_chunks(self, batch: torch.Tensor) -> torch.Tensor:
        outputs = []
        for chunk in batch.split(self.max_batch):
            rows = len(chunk)
            size = next(s for s in self.sizes if s >= rows) if self.sizes else rows
            if size > rows:  # a few shapes only: the kernels' caches (oneDNN's per shape) stop growing
                chunk = torch.cat([chunk, chunk.new_zeros((size - rows, *chunk.shape[1:]))])
            outputs.append(self.forward(chunk)[:rows])
        if self.trim is not None and time.monotonic() - self.trimmed_at > TRIM_SECONDS:
            self.trim(0)
            self.trimmed_at = time.monotonic()
        return torch.cat(outputs)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [(x, f) for x, f in await self._next_batch() if not f.done()]  # a client that left is not computed for
            if not items:
                continue
            started = time.perf_counter()
            try:
                batch = torch.cat([x for x, _ in items])
                logits = await loop.run_in_executor(self.executor, self._forward_chunks, batch)
                if len(logits) != len(batch):
                    raise RuntimeError(f"the model gave {len(logits)} rows of logits for a batch of {len(batch)}")
                parts = logits.split([len(x) for x, _ in items])
            except Exception as exc:  # every request of the batch hears of it; the batcher goes on
                for _, future in items:
                    if not future.done():
                        future.set_exception(exc)
                continue
            if self.on_batch is not None:
                self.on_batch(len(batch), time.perf_counter() - started)
            for (_, future), rows in zip(items, parts):
                if not future.done():
                    future.set_result(rows)


__all__ = ["DynamicBatcher"]
