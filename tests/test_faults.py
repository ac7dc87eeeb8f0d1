"""Many processes and faults: torchrun + DDP on CPU (gloo), SIGKILL at random steps and in the middle
of a checkpoint write, SIGTERM, a crashed rank restarted by torchrun, broken files, non-finite
losses, an output folder that cannot hold the run.

The runs are real ``imgrec`` processes (``tests/fault_injection.py`` adds the fault) on a tiny
synth dataset; they are the suite's longest tests (about a minute and a half together).
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from imgrec.data.sampler import EpochSampler
from imgrec.engine.checkpoint import load_checkpoint
from runs import quiet, read_metrics, untimed

HERE = Path(__file__).parent
INJECT = [sys.executable, str(HERE / "fault_injection.py")]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
EPOCHS, STEPS_PER_EPOCH = 2, 6  # 48 training images, batch 8
TOTAL_STEPS = EPOCHS * STEPS_PER_EPOCH
TRAIN = ["train", "--model", "test_convnext", "--img-size", "32", "--precision", "fp32", "--no-tensorboard", "--lr", "0.01", "--epochs", str(EPOCHS)]
# One kill right after an epoch's last step (before its checkpoint), the others at random steps.
KILL_STEPS = sorted([STEPS_PER_EPOCH, *random.Random(2026).sample([s for s in range(1, TOTAL_STEPS) if s != STEPS_PER_EPOCH], 2)])

pytestmark = pytest.mark.slow


def run(command: list[str], *, check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300, cwd=cwd)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def single(data: Path, out: Path, *extra: str, inject: tuple[str, ...] = (), workers: int = 0, check: bool = True) -> subprocess.CompletedProcess:
    """One process, batch 8, deterministic, a checkpoint every 2 steps. Each image's augmentation
    depends on (seed, epoch, image) only, so runs with different loader workers are equal too."""
    command = [*INJECT, *inject, "--", *TRAIN, "--data", str(data), "--out", str(out), "--batch-size", "8", "--workers", str(workers)]
    return run([*command, "--deterministic", "--checkpoint-every", "2", *extra], check=check)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """The uninterrupted run every resumed one is compared with."""
    out = tmp_path_factory.mktemp("reference") / "run"
    single(data, out)
    return out


# Two ranks sum the same gradients in another order (two half-batches, averaged): float noise that
# grows over the steps and depends on the CPU's kernels, up to ~6e-5 in a weight after these runs on
# an AMD EPYC and ~2.5e-4 on an Intel Xeon (AVX-512); one process at the half batch (what ranks that
# did not average would train) ends ~1e-1 away.
DDP_ATOL = 1e-3


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model.safetensors"))


def assert_bitwise_equal(run_dir: Path, reference: Path) -> None:
    a, b = weights(run_dir), weights(reference)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "the model directory's weights differ"
    last, last_ref = load_checkpoint(run_dir / "last.pt"), load_checkpoint(reference / "last.pt")
    assert all(torch.equal(last["model"][k], last_ref["model"][k]) for k in last["model"])
    assert untimed(run_dir) == untimed(reference)


def global_step(checkpoint: dict) -> int:
    return checkpoint["epoch"] * STEPS_PER_EPOCH + checkpoint["step"]


# --- exact resume after SIGKILL ------------------------------------------------------------------


@pytest.mark.parametrize("kill_step", KILL_STEPS)
def test_a_run_killed_at_a_step_resumes_bitwise_equal(data, reference, tmp_path, kill_step):
    out = tmp_path / "run"
    killed = single(data, out, inject=("--kill-at-step", str(kill_step)), workers=2 if kill_step == KILL_STEPS[0] else 0, check=False)
    assert killed.returncode == -9
    saved = (out / "last.pt").exists()
    checkpoint = load_checkpoint(out / "last.pt") if saved else {"epoch": 0, "step": 0}
    assert kill_step - 2 <= global_step(checkpoint) <= kill_step  # at most --checkpoint-every steps of work lost
    resumed = single(data, out, "--resume", "auto")  # the same command again, as torchrun --max-restarts would
    if saved:
        assert f"resumed {out} after epoch {checkpoint['epoch']}" in resumed.stdout
    assert_bitwise_equal(out, reference)


def test_a_run_on_the_file_pipeline_killed_mid_epoch_resumes_bitwise_equal(data, tmp_path_factory, tmp_path):
    """The same guarantee where the images are read from their files each epoch (--no-cache: the
    path of datasets too large to cache), with two loader workers."""
    reference = tmp_path_factory.mktemp("files-reference") / "run"
    single(data, reference, "--no-cache", workers=2)
    out = tmp_path / "run"
    killed = single(data, out, "--no-cache", inject=("--kill-at-step", "9"), workers=2, check=False)
    assert killed.returncode == -9 and 7 <= global_step(load_checkpoint(out / "last.pt")) <= 9
    single(data, out, "--no-cache", "--resume", "auto", workers=2)
    assert_bitwise_equal(out, reference)
    assert load_checkpoint(out / "last.pt")["config"]["cache"] is False


def test_a_kill_while_writing_a_checkpoint_leaves_the_previous_one_readable(data, reference, tmp_path):
    out = tmp_path / "run"
    killed = single(data, out, inject=("--kill-in-save", "3"), check=False)  # saves: step 2, step 4, end of epoch 1
    assert killed.returncode == -9
    assert list(out.glob(".last.pt.tmp-*")), "the torn write should be a temporary file beside last.pt"
    checkpoint = load_checkpoint(out / "last.pt")
    assert (checkpoint["epoch"], checkpoint["step"]) == (0, 4)
    run([sys.executable, "-m", "imgrec", "train", "--resume", str(out)])
    assert not list(out.glob(".last.pt.tmp-*"))  # the stale temporary file is cleaned up on start
    assert_bitwise_equal(out, reference)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(data, reference, tmp_path):
    out = tmp_path / "run"
    stopped = single(data, out, "--checkpoint-every", "100", inject=("--signal-at-step", "8"), check=False)
    assert stopped.returncode == 128 + 15, stopped.stderr[-2000:]
    assert "Traceback" not in stopped.stderr
    assert f"--resume {out}" in stopped.stdout
    checkpoint = load_checkpoint(out / "last.pt")
    assert global_step(checkpoint) == 9  # the signal came during step 8; the loop stops after the next one
    run([sys.executable, "-m", "imgrec", "train", "--resume", str(out)])
    assert_bitwise_equal(out, reference)


def test_without_deterministic_a_resumed_run_matches_within_float_tolerance(data, reference, tmp_path):
    out = tmp_path / "run"
    command = [*INJECT, "--kill-at-step", "7", "--", *TRAIN, "--data", str(data), "--out", str(out), "--batch-size", "8", "--workers", "0"]
    assert run([*command, "--checkpoint-every", "2"], check=False).returncode == -9
    run([sys.executable, "-m", "imgrec", "train", "--resume", str(out)])
    a, b = weights(out), weights(reference)
    assert all(torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4) for k in a)


def test_pretraining_killed_mid_epoch_resumes_bitwise_equal(data, tmp_path):
    command = ["pretrain", "--data", str(data), "--model", "test_convnext", "--method", "simclr", "--img-size", "32", "--epochs", "2",
               "--batch-size", "8", "--workers", "0", "--precision", "fp32", "--no-tensorboard", "--opt", "adamw", "--lr", "0.001",
               "--deterministic", "--checkpoint-every", "3", "--knn-every", "0"]  # fmt: skip
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run([*INJECT, "--", *command, "--out", str(straight)])
    assert run([*INJECT, "--kill-at-step", "11", "--", *command, "--out", str(killed)], check=False).returncode == -9
    checkpoint = load_checkpoint(killed / "last.pt")
    assert (checkpoint["epoch"], checkpoint["step"]) == (1, 3)  # global step 9 of 12: mid-epoch
    run([sys.executable, "-m", "imgrec", "pretrain", "--resume", str(killed)])
    a, b = load_file(str(straight / "backbone.safetensors")), load_file(str(killed / "backbone.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- DDP with torchrun -------------------------------------------------------------------------


@pytest.mark.parametrize("cache", ["--cache", "--no-cache"])
def test_two_ranks_match_one_process_with_twice_the_batch(data, tmp_path, cache):
    one, two, hashes = tmp_path / "one", tmp_path / "two", tmp_path / "hashes.txt"
    common = [*TRAIN, "--data", str(data), "--workers", "0", cache]
    run([sys.executable, "-m", "imgrec", *common, "--batch-size", "8", "--out", str(one)])
    done = run([*TORCHRUN, "--nproc_per_node", "2", *INJECT[1:], "--check-ranks", str(hashes), "--", *common, "--batch-size", "4", "--out", str(two)])
    assert "batch 4x1 per rank on 2 ranks" in done.stdout
    a, b = weights(one), weights(two)
    assert all(torch.allclose(a[k], b[k], atol=DDP_ATOL, rtol=1e-4) for k in a)
    lines = hashes.read_text().splitlines()
    assert len(lines) == TOTAL_STEPS  # every optimizer step compared both ranks' weights...
    assert all(len(set(line.split()[1:])) == 1 for line in lines)  # ...and found them identical
    for row_one, row_two in zip(untimed(one), untimed(two), strict=True):
        assert row_two["val_images"] == row_one["val_images"] == 15  # 8 + 7: every val image once
        assert row_two["val_top1"] == row_one["val_top1"]
        assert row_two["train_loss"] == pytest.approx(row_one["train_loss"], rel=1e-5)
    config = (two / "config.yaml").read_text()
    assert "lr: 0.01" in config  # as given; without --lr it would scale with the global batch, 2 x 4


def test_two_torchrun_agents_meet_as_two_nodes_through_the_c10d_rendezvous(data, tmp_path):
    """Multi-node as on a cluster (--nnodes 2, --rdzv-backend c10d, one endpoint), both "nodes" on loopback."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "run"
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d",
             "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes", "-m", "imgrec", *TRAIN, "--epochs", "1",
             "--data", str(data), "--workers", "0", "--batch-size", "4", "--out", str(out)],
            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        for _ in range(2)
    ]
    logs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs
    assert sum("per rank on 2 ranks" in log for log in logs) == 1  # rank 0 speaks, on whichever node it landed
    assert untimed(out)[0]["val_images"] == 15


def test_torchrun_restarts_a_crashed_rank_from_the_latest_checkpoint(data, reference, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "crashed"
    inject = ["--crash-once-at-step", "5", "--crash-rank", "1", "--marker", str(marker)]
    command = [*TRAIN, "--data", str(data), "--workers", "0", "--batch-size", "4", "--checkpoint-every", "2", "--resume", "auto", "--out", str(out)]
    done = run([*TORCHRUN, "--nproc_per_node", "2", "--max-restarts", "1", *INJECT[1:], *inject, "--", *command])
    assert marker.read_text().startswith("rank 1 crashed after step 5")
    assert "resumed" in done.stdout and "step 4 of epoch 1" in done.stdout
    assert [row["epoch"] for row in untimed(out)] == list(range(1, EPOCHS + 1))
    a, b = weights(out), weights(reference)  # the same data order and global batch as the 1-process reference
    assert all(torch.allclose(a[k], b[k], atol=DDP_ATOL, rtol=1e-4) for k in a)


@pytest.mark.parametrize("method", ["simclr", "dino", "dino-ema-koleo", "distill"])
def test_ddp_pretraining_keeps_the_ranks_identical(data, tmp_path, method):
    out, hashes = tmp_path / "run", tmp_path / "hashes.txt"
    dino = ["--local-crops", "2", "--proj-hidden-dim", "32"]
    extra = {"simclr": [], "dino": dino, "dino-ema-koleo": [*dino, "--centering", "ema", "--koleo-weight", "0.1"],
             "distill": ["--teacher", str(teacher_run(tmp_path / "teacher"))]}[method]  # fmt: skip
    method = method.split("-")[0]
    command = ["pretrain", "--data", str(data), "--model", "test_convnext", "--method", method, "--img-size", "32", "--epochs", "1",
               "--batch-size", "4", "--workers", "0", "--precision", "fp32", "--no-tensorboard", "--opt", "adamw", "--out", str(out), *extra]  # fmt: skip
    done = run([*TORCHRUN, "--nproc_per_node", "2", *INJECT[1:], "--check-ranks", str(hashes), "--", *command])
    assert "per rank on 2 ranks" in done.stdout
    lines = hashes.read_text().splitlines()
    assert len(lines) == STEPS_PER_EPOCH and all(len(set(line.split()[1:])) == 1 for line in lines)
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["knn_top1"] >= 0 and torch.isfinite(torch.tensor(row["loss"]))
    assert (out / "backbone.safetensors").is_file()


def teacher_run(out: Path) -> Path:
    """A run folder holding random test_resnet weights and their card: a distillation teacher."""
    import timm

    from imgrec.card import ModelCard
    from imgrec.config import DataConfig
    from imgrec.models.directory import save_model_dir

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=0)
    out.mkdir(parents=True)
    save_model_dir(out, {k: v.contiguous() for k, v in model.state_dict().items()}, ModelCard("test_resnet", DataConfig(img_size=32)))
    return out


def test_broken_files_under_ddp_are_skipped_and_listed_once(tmp_path):
    from imagefiles import write_odd_files
    from imgrec.data.synth import SynthSpec, write_synth_dataset

    data = write_synth_dataset(tmp_path / "data", SynthSpec(classes=3, train_per_class=200, val_per_class=4, seed=1, min_side=24, max_side=40), workers=1)
    good, bad = write_odd_files(tmp_path / "odd")
    classes = sorted(p.name for p in (data / "train").iterdir())
    moved = set()
    for i, path in enumerate(sorted(good | bad)):
        target = data / "train" / classes[i % 3] / Path(path).name
        shutil.move(path, target)
        if path in bad:
            moved.add(str(target))
    images = sum(1 for p in (data / "train").rglob("*") if p.is_file())
    assert len(moved) / images < 0.01  # about 1% broken: 6 of 617
    out = tmp_path / "run"
    command = [*TRAIN, "--data", str(data), "--workers", "1", "--batch-size", "32", "--out", str(out)]
    run([*TORCHRUN, "--nproc_per_node", "2", "-m", "imgrec", *command])
    assert [row["epoch"] for row in untimed(out)] == [1, 2]
    logged = [json.loads(line)["path"] for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert sorted(logged) == sorted(moved)  # each broken file once, whichever rank, worker or epoch met it


# --- faults found before or during training, in-process --------------------------------------------


def test_an_output_folder_that_cannot_be_a_folder_is_refused_before_training(data, tmp_path):
    from imgrec.engine.tasks.classify import train

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match="cannot write to the output folder .*file/run"):
        train(data=str(data), out=str(blocker / "run"), model="test_convnext", epochs=1, device="cpu", workers=0, console=quiet())


def test_an_output_folder_without_room_for_two_checkpoints_is_refused_before_training(data, tmp_path, monkeypatch):
    from imgrec.engine import run_dir
    from imgrec.engine.tasks.classify import train

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(run_dir.shutil, "disk_usage", lambda path: usage._replace(free=100_000))
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"has 0\.1 MiB free; the run needs about"):
        train(data=str(data), out=str(out), model="test_convnext", epochs=1, device="cpu", workers=0, tensorboard=False, console=quiet())
    assert not (out / "metrics.jsonl").exists() and not (out / "last.pt").exists()


def nan_run(data: Path, out: Path, monkeypatch, nan_calls: set[int], **options):
    monkeypatch.setattr(NaNAndSignal, "nan_calls", nan_calls)
    monkeypatch.setattr(NaNAndSignal, "calls", 0)
    monkeypatch.setattr(NaNAndSignal, "signal_call", 0)
    return small_train(monkeypatch, data=str(data), out=str(out), epochs=2, **options)


def test_non_finite_losses_skip_their_steps_and_are_counted(data, tmp_path, monkeypatch):
    out = nan_run(data, tmp_path / "run", monkeypatch, {3, 4})
    rows = untimed(out)
    assert [row["skipped_steps"] for row in rows] == [2, 2]
    assert all(torch.isfinite(torch.tensor(row["train_loss"])) for row in rows)
    model = weights(out)
    assert all(torch.isfinite(t).all() for t in model.values())


def test_too_many_non_finite_losses_in_a_row_stop_the_run_and_keep_the_last_good_checkpoint(data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError, match=r"3 steps in a row had a loss that is not finite \(epoch 1, step 4\)"):
        nan_run(data, out, monkeypatch, set(range(2, 100)), max_bad_steps=3, checkpoint_every=2)
    checkpoint = load_checkpoint(out / "last.pt")
    assert (checkpoint["epoch"], checkpoint["step"]) == (0, 2)  # saved at step 2, with the weights of step 1: steps 2-4 were skipped
    assert all(torch.isfinite(t).all() for t in checkpoint["model"].values())


def test_resume_auto_starts_a_new_run_then_continues_it(data, tmp_path):
    from imgrec.engine.tasks.classify import train

    out = tmp_path / "run"
    options = dict(data=str(data), out=str(out), model="test_convnext", batch_size=8, device="cpu", workers=0, tensorboard=False, data_config={"img_size": 32})
    train(resume="auto", epochs=1, console=quiet(), **options)
    assert load_checkpoint(out / "last.pt")["epoch"] == 1
    console = Console(file=io.StringIO())
    train(resume="auto", epochs=2, console=console, **options)
    assert "resumed" in console.file.getvalue()
    assert [row["epoch"] for row in untimed(out)] == [1, 2]


# --- the sampler that makes it exact -----------------------------------------------------------------


def test_epoch_sampler_partitions_an_epoch_and_skips_what_was_read():
    full = EpochSampler(10, seed=3, shuffle=True, drop_last=True)
    full.set_epoch(2)
    order = list(full)
    assert sorted(order) == list(range(10))
    ranks = [EpochSampler(10, seed=3, rank=r, world=3, shuffle=True, drop_last=True) for r in range(3)]
    for sampler in ranks:
        sampler.set_epoch(2)
    assert [list(s) for s in ranks] == [order[:9][r::3] for r in range(3)]  # interleaved: step k of R ranks = step k of one
    evaluation = [EpochSampler(10, rank=r, world=3, shuffle=False, drop_last=False) for r in range(3)]
    assert sorted(i for s in evaluation for i in s) == list(range(10)) and [len(s) for s in evaluation] == [4, 3, 3]
    ranks[1].skip(2)
    assert list(ranks[1]) == order[:9][1::3][2:] and len(ranks[1]) == 3
    ranks[1].set_epoch(3)
    assert len(list(ranks[1])) == 3  # a new epoch reads its whole share again


def test_augmentation_depends_on_the_sample_not_on_the_reader(data):
    from imgrec.config import DataConfig
    from imgrec.data.folder import ImageFolderDataset
    from imgrec.data.transforms import train_transform

    dataset = ImageFolderDataset(data / "train", train_transform(DataConfig(img_size=32)))
    dataset.set_epoch(1)
    first = dataset[5][0]
    torch.manual_seed(123)
    for i in (3, 4, 9):
        dataset[i]
    assert torch.equal(dataset[5][0], first)  # whatever was read before, by whom
    dataset.set_epoch(2)
    assert not torch.equal(dataset[5][0], first)  # a new epoch, a new crop


# --- the count of skipped (non-finite) steps survives a resume ---------------------------------------


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
    """``imgrec.train`` of test_convnext at 32 px, batch 8, with ``NaNAndSignal`` as the loss."""
    from imgrec.engine.tasks.classify import train

    monkeypatch.setattr(torch.nn, "CrossEntropyLoss", NaNAndSignal)
    common = dict(model="test_convnext", batch_size=8, lr=0.01, device="cpu", precision="fp32", workers=0, tensorboard=False)
    if options.get("resume") in (None, "auto"):
        options = {**common, "data_config": {"img_size": 32}, **options}
    return train(console=quiet(), **options)


def test_skipped_steps_survive_a_mid_epoch_resume(data, tmp_path, monkeypatch):
    from imgrec.engine.trainer import TrainingInterrupted

    monkeypatch.setattr(NaNAndSignal, "nan_calls", {3, 4})
    monkeypatch.setattr(NaNAndSignal, "calls", 0)
    straight = small_train(monkeypatch, data=str(data), out=str(tmp_path / "straight"), epochs=2)
    assert [row.get("skipped_steps") for row in read_metrics(straight)] == [2, 2]

    monkeypatch.setattr(NaNAndSignal, "calls", 0)
    monkeypatch.setattr(NaNAndSignal, "signal_call", 8)  # step 2 of epoch 2 (6 steps per epoch)
    out = tmp_path / "killed"
    with pytest.raises(TrainingInterrupted):
        small_train(monkeypatch, data=str(data), out=str(out), epochs=2)
    monkeypatch.setattr(NaNAndSignal, "signal_call", 0)
    small_train(monkeypatch, resume=str(out))
    assert [row.get("skipped_steps") for row in read_metrics(out)] == [2, 2]


# --- the free-space check lets a run resume that has the room it needs ---------------------------


def test_a_run_that_fit_on_its_disk_can_be_resumed(data, tmp_path, monkeypatch):
    from imgrec.config import TrainConfig
    from imgrec.engine import run_dir
    from imgrec.engine.run_dir import OPTIMIZER_COPIES, state_bytes
    from imgrec.models.factory import create_model

    model = create_model("test_convnext", num_classes=3)
    checkpoint = state_bytes(model) * (1 + OPTIMIZER_COPIES.get(TrainConfig.opt, 2))
    capacity = 2 * checkpoint + state_bytes(model) + 2**20  # what the check asks of a new run, plus 1 MiB (small files, pickling overhead)
    out = tmp_path / "run"
    real = shutil.disk_usage(tmp_path)

    def disk_usage(path):  # a disk of ``capacity`` bytes holding only the run's files
        used = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) if out.exists() else 0
        return real._replace(free=capacity - used)

    monkeypatch.setattr(run_dir.shutil, "disk_usage", disk_usage)
    monkeypatch.setattr(NaNAndSignal, "nan_calls", set())
    monkeypatch.setattr(NaNAndSignal, "signal_call", 0)
    small_train(monkeypatch, data=str(data), out=str(out), epochs=1)  # starts, writes last.pt and model.safetensors
    assert disk_usage(out).free >= (out / "last.pt").stat().st_size  # still room for the next checkpoint beside the last
    small_train(monkeypatch, resume=str(out), epochs=2)  # refused: "the run needs about ..."
    assert [row["epoch"] for row in read_metrics(out)] == [1, 2]


# --- --resume auto after a kill before the first checkpoint ------------------------------------------


class Killed(BaseException):
    """Stands for SIGKILL: the process is gone, nothing after it runs."""


def test_resume_auto_restarts_a_run_killed_before_its_first_checkpoint(data, tmp_path, monkeypatch):
    from imgrec.engine import trainer

    def killed(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(NaNAndSignal, "nan_calls", set())
    monkeypatch.setattr(NaNAndSignal, "signal_call", 0)
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(trainer, "save_checkpoint", killed)  # killed while writing the first checkpoint (end of epoch 1)
        with pytest.raises(Killed):
            small_train(monkeypatch, data=str(data), out=str(out), epochs=1, resume="auto")
    assert (out / "metrics.jsonl").exists() and not (out / "last.pt").exists()
    small_train(monkeypatch, data=str(data), out=str(out), epochs=1, resume="auto")  # the same command again
    assert [row["epoch"] for row in read_metrics(out)] == [1]



# --- a signal during the last epoch's validation does not report a finished run as interrupted -----


def test_a_signal_during_the_last_validation_does_not_interrupt_a_finished_run(data, tmp_path, monkeypatch):
    from imgrec.engine.tasks.classify import ClassifyTask

    validate = ClassifyTask.validate

    def validate_and_signal(self, epoch, stats):
        os.kill(os.getpid(), signal.SIGTERM)
        return validate(self, epoch, stats)

    monkeypatch.setattr(ClassifyTask, "validate", validate_and_signal)
    monkeypatch.setattr(NaNAndSignal, "nan_calls", set())
    monkeypatch.setattr(NaNAndSignal, "signal_call", 0)
    out = small_train(monkeypatch, data=str(data), out=str(tmp_path / "run"), epochs=1)  # raises TrainingInterrupted
    assert [row["epoch"] for row in read_metrics(out)] == [1]
