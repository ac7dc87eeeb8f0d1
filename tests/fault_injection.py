"""Run ``imgrec`` with a fault injected, for the fault-tolerance tests (not a test module itself).

    python tests/fault_injection.py [options] -- train --data ... --out ...

--kill-at-step K       SIGKILL this process right after its K-th optimizer step
--kill-in-save N       SIGKILL this process half-way through writing its N-th checkpoint
--crash-once-at-step K --crash-rank R --marker FILE
                       rank R exits with status 1 after its K-th optimizer step, unless FILE
                       exists (it creates FILE first): a crash that happens once, for torchrun
                       --max-restarts
--signal-at-step K     send this process SIGTERM right after its K-th optimizer step
--check-ranks FILE     after every optimizer step, compare a hash of the weights across ranks;
                       rank 0 appends "STEP HASH..." lines to FILE, and the process fails on a mismatch

The steps are counted by a global optimizer hook (torch.optim), so any training loop is covered.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import sys
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook


def main() -> int:
    split = sys.argv.index("--")
    parser = argparse.ArgumentParser()
    parser.add_argument("--kill-at-step", type=int)
    parser.add_argument("--kill-in-save", type=int)
    parser.add_argument("--crash-once-at-step", type=int)
    parser.add_argument("--crash-rank", type=int, default=0)
    parser.add_argument("--marker")
    parser.add_argument("--signal-at-step", type=int)
    parser.add_argument("--check-ranks")
    options = parser.parse_args(sys.argv[1:split])
    steps = 0

    def after_step(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        nonlocal steps
        steps += 1
        rank = int(os.environ.get("RANK", "0"))
        if options.kill_at_step == steps:
            os.kill(os.getpid(), signal.SIGKILL)
        if options.signal_at_step == steps:
            os.kill(os.getpid(), signal.SIGTERM)
        if options.crash_once_at_step == steps and rank == options.crash_rank and not Path(options.marker).exists():
            Path(options.marker).write_text(f"rank {rank} crashed after step {steps}\n")
            os._exit(1)
        if options.check_ranks:
            import torch.distributed as dist

            digest = hashlib.sha256()
            for group in optimizer.param_groups:
                for param in group["params"]:
                    digest.update(param.detach().cpu().contiguous().numpy().tobytes())
            hashes = [None] * dist.get_world_size()
            dist.all_gather_object(hashes, digest.hexdigest())
            if rank == 0:
                with open(options.check_ranks, "a") as f:
                    f.write(f"{steps} {' '.join(hashes)}\n")
            if len(set(hashes)) != 1:
                raise AssertionError(f"the ranks' weights differ after step {steps}: {hashes}")

    register_optimizer_step_post_hook(after_step)
    if options.kill_in_save:
        saves = 0
        original = torch.save

        def torn_save(obj: object, f: object, *args: object, **kwargs: object) -> None:
            nonlocal saves
            saves += 1
            if saves != options.kill_in_save or not hasattr(f, "write"):
                return original(obj, f, *args, **kwargs)
            import io

            buffer = io.BytesIO()
            original(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)

        torch.save = torn_save

    from imgrec.cli import main as imgrec_main

    return imgrec_main(sys.argv[split + 1 :])


if __name__ == "__main__":
    sys.exit(main())
