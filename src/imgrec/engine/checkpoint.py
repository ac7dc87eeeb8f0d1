"""Atomic checkpoints for exact resume.

``RUN/last.pt`` holds everything needed to continue a run: model, optimizer, scheduler, EMA,
grad scaler, the epoch, every RNG state and the resolved config. It is written to a temporary
file in the same folder, fsynced, then renamed over the old one, so a crash at any moment
leaves either the old or the new checkpoint on disk, never a torn one. It is read with
``weights_only=True``: tensors and plain containers only, nothing unpickled runs code.

The trainer (``imgrec.engine.trainer``) decides what goes in; this module writes and reads it.
"""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imgrec.card import CHECKPOINT_NAME
from imgrec.utils import atomic_write


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    return atomic_write(path, lambda f: torch.save(state, f))


def snapshot(state: Any) -> Any:
    """``state`` with every tensor copied to the CPU: what a checkpoint written on a thread holds,
    while training goes on changing the originals (batch-norm statistics change in every forward)."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: snapshot(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(snapshot(v) for v in state)
    return state


class BackgroundWriter:
    """Writes one checkpoint at a time on a thread, so that the write overlaps the next step.

    ``write`` copies the state (``snapshot``) and starts the atomic write; ``wait`` finishes it,
    returns the ``OSError`` of a write that failed (disk full: the previous checkpoint stays) or
    None, and raises anything else the write raised. The trainer waits before every optimizer
    update, so a process killed at any point has lost no more steps than with a plain write.
    """

    def __init__(self) -> None:
        self.thread: threading.Thread | None = None
        self.failure: BaseException | None = None

    def write(
        self, path: Path, state: dict[str, Any], save: Callable[[Path, dict[str, Any]], Any] = save_checkpoint, before: Callable[[], Any] | None = None
    ) -> OSError | None:
        """Start writing ``state`` to ``path`` with ``save``, after ``before`` (another write, made
        from copies: the run's model files) if given; returns the failure of the write before, if
        any. A ``before`` that fails leaves the checkpoint unwritten too, so the checkpoint on disk
        never records outputs that are not."""
        failed = self.wait()
        copy = snapshot(state)

        def run() -> None:
            try:
                if before is not None:
                    before()
                save(path, copy)
            except BaseException as exc:  # re-raised (or reported, for an OSError) in the training thread
                self.failure = exc

        self.thread = threading.Thread(target=run, name="imgrec-checkpoint", daemon=False)
        self.thread.start()
        return failed

    def wait(self) -> OSError | None:
        if self.thread is None:
            return None
        self.thread.join()
        self.thread, failure, self.failure = None, self.failure, None
        if isinstance(failure, OSError):
            return failure
        if failure is not None:
            raise failure
        return None


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: a run writes {CHECKPOINT_NAME} at the end of each epoch")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot read checkpoint {path}: {exc}") from None


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states, in a form ``weights_only`` loads."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "gauss": gauss},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


__all__ = ["CHECKPOINT_NAME", "BackgroundWriter", "load_checkpoint", "rng_state", "save_checkpoint", "seed_everything", "set_rng_state", "snapshot"]
