"""Review of the DDP / exact-resume change (issue 6): each test guards against a bug that review found (all fixed)."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from rich.console import Console
from torch.utils.data import DataLoader

from test_faults import data  # noqa: F401  (the tiny synth dataset fixture)


def quiet() -> Console:
    return Console(file=io.StringIO())


class SourceName:
    """A transform that does not decode: the sample's name."""

    takes_source = True

    def __call__(self, source, max_pixels):
        return source.name


def names(batch):
    return [name for name, _ in batch]


@pytest.fixture(scope="module")
def shards(data, tmp_path_factory) -> Path:  # noqa: F811
    from imgrec.data.shard_writer import write_shards

    out = tmp_path_factory.mktemp("review6-shards") / "train"
    write_shards(data / "train", out, max_side=48, shard_size=12_000, workers=1)
    return out


# --- 1. shards: mid-epoch skip with several loader workers ---------------------------------------


def test_shard_skip_with_two_workers_continues_the_straight_order(shards):
    from imgrec.data.shards import ShardDataset

    dataset = ShardDataset(shards, SourceName(), shuffle=4, seed=3)

    def epoch(skipped: int) -> list[list[str]]:
        dataset.set_epoch(1)
        if skipped:
            dataset.skip(skipped, 4)
        loader = DataLoader(dataset, batch_size=4, num_workers=2, collate_fn=names, drop_last=True)
        return list(loader)

    straight = epoch(0)
    assert len(straight) >= 6
    resumed = epoch(3)  # a checkpoint after step 3 (accum_steps 1)
    assert resumed[:3] == straight[3:6]


# --- 2. the count of skipped (non-finite) steps is not in the checkpoint ---------------------------


class NaNAndSignal(torch.nn.CrossEntropyLoss):
    """Cross-entropy that is NaN on the calls in ``nan_calls`` and sends this process SIGTERM on ``signal_call``."""

    nan_calls: set[int] = set()
    signal_call = 0
    calls = 0

    def forward(self, logits, targets):
        type(self).calls += 1
        loss = super().forward(logits, targets)
        if type(self).calls == self.signal_call:
            os.kill(os.getpid(), signal.SIGTERM)  # the loop's StopSignals turns it into "checkpoint, then stop"
        return loss * float("nan") if type(self).calls in self.nan_calls else loss


def small_train(monkeypatch, **options):
    from imgrec.engine import train as train_module

    monkeypatch.setattr(train_module.torch.nn, "CrossEntropyLoss", NaNAndSignal)
    common = dict(model="test_convnext", batch_size=8, lr=0.01, device="cpu", precision="fp32", workers=0, tensorboard=False)
    if options.get("resume") in (None, "auto"):
        options = {**common, "data_config": {"img_size": 32}, **options}
    return train_module.train(console=quiet(), **options)


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_skipped_steps_survive_a_mid_epoch_resume(data, tmp_path, monkeypatch):  # noqa: F811
    from imgrec.engine.resume import TrainingInterrupted

    monkeypatch.setattr(NaNAndSignal, "nan_calls", {3, 4})
    monkeypatch.setattr(NaNAndSignal, "calls", 0)
    straight = small_train(monkeypatch, data=str(data), out=str(tmp_path / "straight"), epochs=2)
    assert [row.get("skipped_steps") for row in rows(straight)] == [2, 2]

    monkeypatch.setattr(NaNAndSignal, "calls", 0)
    monkeypatch.setattr(NaNAndSignal, "signal_call", 8)  # step 2 of epoch 2 (6 steps per epoch)
    out = tmp_path / "killed"
    with pytest.raises(TrainingInterrupted):
        small_train(monkeypatch, data=str(data), out=str(out), epochs=2)
    monkeypatch.setattr(NaNAndSignal, "signal_call", 0)
    small_train(monkeypatch, resume=str(out))
    assert [row.get("skipped_steps") for row in rows(out)] == [2, 2]


# --- 3. the free-space check refuses to resume a run that has the room it needs ------------------


def test_a_run_that_fit_on_its_disk_can_be_resumed(data, tmp_path, monkeypatch):  # noqa: F811
    from imgrec.config import TrainConfig
    from imgrec.engine import resume
    from imgrec.engine.resume import OPTIMIZER_COPIES, state_bytes
    from imgrec.models.factory import create_model

    model = create_model("test_convnext", num_classes=3)
    checkpoint = state_bytes(model) * (1 + OPTIMIZER_COPIES.get(TrainConfig.opt, 2))
    capacity = 2 * checkpoint + state_bytes(model) + 2**20  # what the check asks of a new run, plus 1 MiB (small files, pickling overhead)
    out = tmp_path / "run"
    real = shutil.disk_usage(tmp_path)

    def disk_usage(path):  # a disk of ``capacity`` bytes holding only the run's files
        used = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) if out.exists() else 0
        return real._replace(free=capacity - used)

    monkeypatch.setattr(resume.shutil, "disk_usage", disk_usage)
    monkeypatch.setattr(NaNAndSignal, "nan_calls", set())
    monkeypatch.setattr(NaNAndSignal, "signal_call", 0)
    small_train(monkeypatch, data=str(data), out=str(out), epochs=1)  # starts, writes last.pt and model.safetensors
    assert disk_usage(out).free >= (out / "last.pt").stat().st_size  # still room for the next checkpoint beside the last
    small_train(monkeypatch, resume=str(out), epochs=2)  # refused: "the run needs about ..."
    assert [row["epoch"] for row in rows(out)] == [1, 2]


# --- 4. --resume auto after a kill before the first checkpoint ------------------------------------


class Killed(BaseException):
    """Stands for SIGKILL: the process is gone, nothing after it runs."""


def test_resume_auto_restarts_a_run_killed_before_its_first_checkpoint(data, tmp_path, monkeypatch):  # noqa: F811
    from imgrec.engine import resume

    def killed(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(NaNAndSignal, "nan_calls", set())
    monkeypatch.setattr(NaNAndSignal, "signal_call", 0)
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(resume, "save_checkpoint", killed)  # killed while writing the first checkpoint (end of epoch 1)
        with pytest.raises(Killed):
            small_train(monkeypatch, data=str(data), out=str(out), epochs=1, resume="auto")
    assert (out / "metrics.jsonl").exists() and not (out / "last.pt").exists()
    small_train(monkeypatch, data=str(data), out=str(out), epochs=1, resume="auto")  # the same command again
    assert [row["epoch"] for row in rows(out)] == [1]



# --- 5. a signal during the last epoch's validation reports a finished run as interrupted ---------


def test_a_signal_during_the_last_validation_does_not_interrupt_a_finished_run(data, tmp_path, monkeypatch):  # noqa: F811
    from imgrec.engine import train as train_module

    validate = train_module.Run.validate

    def validate_and_signal(self, model=None):
        os.kill(os.getpid(), signal.SIGTERM)
        return validate(self, model)

    monkeypatch.setattr(train_module.Run, "validate", validate_and_signal)
    monkeypatch.setattr(NaNAndSignal, "nan_calls", set())
    monkeypatch.setattr(NaNAndSignal, "signal_call", 0)
    out = small_train(monkeypatch, data=str(data), out=str(tmp_path / "run"), epochs=1)  # raises TrainingInterrupted
    assert [row["epoch"] for row in rows(out)] == [1]
