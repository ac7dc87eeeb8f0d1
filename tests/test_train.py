"""The training loop end to end on tiny images: learning, files written, exact resume, recipes, errors.

Every run uses timm's ``test_resnet`` at 32 px on a 3-class synthetic dataset (24 train, 12 val
images), fp32 and mostly ``workers=0``, so the whole file takes about 15 s on 2 cores.
Runs that several tests read (a plain 3-epoch run; an EMA run with tensorboard) are module-scoped.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
import yaml
from rich.console import Console

import imgrec.engine.checkpoint
import imgrec.engine.tasks.classify as classify_module
import imgrec.engine.trainer as trainer_module
from imgrec.config import DataConfig, TrainConfig
from imgrec.data.synth import SynthSpec, write_synth_dataset
from imgrec.engine.checkpoint import load_checkpoint, save_checkpoint
from imgrec.engine.optim import cosine_schedule, param_groups, scaled_lr
from imgrec.engine.tasks.classify import train
from imgrec.engine.trainer import Trainer
from imgrec.hardware import cpu_has_native_bf16, resolve_device, resolve_precision
from runs import quiet, read_metrics, without_timing

DATA_CONFIG = {"img_size": 32, "crop_pct": 1.0, "scale": (0.8, 1.0)}
COMMON = {
    "model": "test_resnet", "device": "cpu", "precision": "fp32", "workers": 0, "tensorboard": False, "batch_size": 8, "data_config": DATA_CONFIG,
    "base_lr": 1e-3, "warmup_epochs": 1.0,  # fixed here: these tests are about the loop, the recipe has its own (test_recipe.py)
}  # fmt: skip
METRIC_KEYS = {"epoch", "train_loss", "val_loss", "val_top1", "val_top5", "lr", "seconds", "images_per_s", "val_images"}
CLASSES = ["circle", "square", "triangle"]  # sorted folder names; the synth order is circle, triangle, square
N_TRAIN, N_VAL = 24, 12


def run_train(data: Path, out: Path, **overrides) -> Path:
    return train(data=str(data), out=str(out), console=quiet(), **{**COMMON, **overrides})


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    spec = SynthSpec(classes=3, train_per_class=8, val_per_class=4, seed=0, min_side=32, max_side=48)
    return write_synth_dataset(root, spec, workers=1)


@pytest.fixture(scope="module")
def plain_run(synth, tmp_path_factory) -> Path:
    """3 epochs straight through, seed 0, no EMA: run A of the resume test and the subject of the file tests."""
    return run_train(synth, tmp_path_factory.mktemp("plain") / "run", epochs=3, seed=0)


@pytest.fixture(scope="module")
def ema_run(synth, tmp_path_factory) -> Path:
    return run_train(synth, tmp_path_factory.mktemp("ema") / "run", epochs=2, ema_decay=0.9, tensorboard=True)


# --- learning ---------------------------------------------------------------------------------


def test_overfits_a_tiny_dataset(synth, tmp_path):
    """Validating on the training images themselves, without augmentation, must reach 100 % top-1."""
    root = tmp_path / "overfit"
    for cls in ("circle", "triangle"):
        for split in ("train", "val"):
            (root / split / cls).mkdir(parents=True)
        for image in sorted((synth / "train" / cls).glob("*.jpg"))[:4]:
            for split in ("train", "val"):
                shutil.copy(image, root / split / cls / image.name)
    no_augmentation = {"img_size": 32, "crop_pct": 1.0, "scale": (1.0, 1.0), "ratio": (1.0, 1.0), "hflip": 0.0}
    run = run_train(
        root, tmp_path / "run", epochs=40, opt="adamw", lr=1e-2, weight_decay=0.0, warmup_epochs=0, label_smoothing=0.0,
        data_config=no_augmentation,
    )  # fmt: skip
    rows = read_metrics(run)
    assert [r["epoch"] for r in rows] == list(range(1, 41))
    assert rows[-1]["val_top1"] == 100.0
    assert rows[-1]["train_loss"] < 0.3 * rows[0]["train_loss"]
    assert rows[-1]["val_loss"] < 0.1


# --- metrics.jsonl, model directory, config.yaml ----------------------------------------------


def test_metrics_rows(plain_run):
    rows = read_metrics(plain_run)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert set(row) == METRIC_KEYS
        assert 0 <= row["val_top1"] <= row["val_top5"] <= 100
        assert row["val_top5"] == 100.0  # top-5 of 3 classes is top-3: always right
        assert row["val_top1"] * N_VAL / 100 == pytest.approx(round(row["val_top1"] * N_VAL / 100))  # a count of 12 images
        assert math.isfinite(row["train_loss"]) and row["train_loss"] > 0
        assert math.isfinite(row["val_loss"]) and row["val_loss"] > 0
        assert row["seconds"] > 0 and row["images_per_s"] > 0
    # lr = 1e-3 * 8 / 256 (adamw, batch 8); after the 3 warmup steps of epoch 1 it peaks, and the cosine ends at min_lr 0.
    assert rows[0]["lr"] == pytest.approx(1e-3 * 8 / 256)
    assert 0 < rows[1]["lr"] < rows[0]["lr"]
    assert rows[2]["lr"] == 0.0


def test_metrics_rows_with_ema(ema_run):
    rows = read_metrics(ema_run)
    assert [r["epoch"] for r in rows] == [1, 2]
    for row in rows:
        assert set(row) == METRIC_KEYS | {"ema_top1"}
        assert 0 <= row["ema_top1"] <= 100
        assert 0 <= row["val_top1"] <= row["val_top5"] <= 100


def test_model_directory_loads_in_bare_timm(synth, plain_run):
    info = json.loads((plain_run / "model.json").read_text(encoding="utf-8"))
    rows = read_metrics(plain_run)
    best = max(r["val_top1"] for r in rows)
    assert info["architecture"] == "test_resnet"
    assert info["classes"] == sorted(p.name for p in (synth / "train").iterdir() if p.is_dir()) == CLASSES
    assert info["num_classes"] == 3
    assert info["input_size"] == [3, 32, 32]
    assert info["img_size"] == 32
    assert info["crop_pct"] == 1.0
    assert info["interpolation"] == "bilinear"  # test_resnet's pretrained config
    assert info["mean"] == [0.5, 0.5, 0.5] and info["std"] == [0.5, 0.5, 0.5]
    assert info["top1"] == best
    assert info["epoch"] == next(r["epoch"] for r in rows if r["val_top1"] == best)  # the first epoch to reach it
    assert info["weights"] == "model"
    assert json.loads((plain_run / "classes.json").read_text(encoding="utf-8"))["classes"] == CLASSES

    # No imgrec code: timm and safetensors alone, strict loading.
    bare = timm.create_model(info["architecture"], num_classes=len(info["classes"]))
    bare.load_state_dict(safetensors.torch.load_file(str(plain_run / "model.safetensors")))
    bare.eval()
    from imgrec.inference.predict import load

    classifier = load(plain_run, device="cpu", precision="fp32")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = bare(x)
        got = classifier.model(x)
    assert expected.shape == (2, 3)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_model_directory_holds_the_trained_weights(synth, tmp_path):
    run = run_train(synth, tmp_path / "run", epochs=1, steps_per_epoch=1)  # one epoch: it is the best one
    info = json.loads((run / "model.json").read_text(encoding="utf-8"))
    assert info["epoch"] == 1 and info["weights"] == "model" and info["top1"] == read_metrics(run)[0]["val_top1"]
    saved = safetensors.torch.load_file(str(run / "model.safetensors"))
    trained = load_checkpoint(run / "last.pt")["model"]
    assert saved.keys() == trained.keys()
    for key, tensor in trained.items():
        assert torch.equal(saved[key], tensor), key


def test_config_yaml_holds_resolved_values(plain_run):
    saved = yaml.safe_load((plain_run / "config.yaml").read_text(encoding="utf-8"))
    assert saved["model"] == "test_resnet"
    assert saved["epochs"] == 3 and saved["batch_size"] == 8 and saved["seed"] == 0
    # What the run used: lr scaled from adamw's base 1e-3 by batch 8 / 256, adamw's decay, the precision asked for.
    assert saved["lr"] == pytest.approx(1e-3 * 8 / 256) and saved["weight_decay"] == 0.05
    assert saved["precision"] == "fp32" and saved["channels_last"] is True and saved["workers"] == 0
    assert saved["out"] == str(plain_run)
    dc = saved["data_config"]
    assert set(dc) == {f for f in DataConfig.__dataclass_fields__}
    assert dc["img_size"] == 32 and dc["crop_pct"] == 1.0 and dc["scale"] == [0.8, 1.0]
    assert dc["interpolation"] == "bilinear"
    assert dc["mean"] == [0.5, 0.5, 0.5] and dc["std"] == [0.5, 0.5, 0.5]  # the model's, not ImageNet's
    assert dc["hflip"] == 0.5 and dc["ratio"] == pytest.approx([3 / 4, 4 / 3])  # defaults filled in
    assert load_checkpoint(plain_run / "last.pt")["config"] == saved


# --- exact resume -----------------------------------------------------------------------------


def interrupted_then_resumed(data: Path, out: Path, monkeypatch, **overrides) -> Path:
    """Run 3 epochs, killed by KeyboardInterrupt right after epoch 2's checkpoint, then resumed."""
    original = Trainer.save_checkpoint
    saved_epochs = []

    def save_then_interrupt(self, *args, **kwargs):
        original(self, *args, **kwargs)
        saved_epochs.append(self.state.epoch)
        if len(saved_epochs) == 2:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "save_checkpoint", save_then_interrupt)
        with pytest.raises(KeyboardInterrupt):
            run_train(data, out, epochs=3, seed=0, **overrides)
    assert saved_epochs == [1, 2]
    assert [r["epoch"] for r in read_metrics(out)] == [1, 2]
    assert load_checkpoint(out / "last.pt")["epoch"] == 2
    return train(resume=str(out), console=quiet())


def assert_same_run(a: Path, b: Path) -> None:
    ca, cb = load_checkpoint(a / "last.pt"), load_checkpoint(b / "last.pt")
    assert ca["epoch"] == cb["epoch"] == 3
    assert ca["model"].keys() == cb["model"].keys()
    for key, tensor in ca["model"].items():
        assert torch.equal(tensor, cb["model"][key]), key
    state_a, state_b = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert state_a.keys() == state_b.keys() and len(state_a) > 0
    for index in state_a:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state_a[index][name], state_b[index][name]), (index, name)
    assert ca["scheduler"]["last_epoch"] == cb["scheduler"]["last_epoch"] == 9
    rows_a, rows_b = read_metrics(a), read_metrics(b)
    assert [r["epoch"] for r in rows_b] == [1, 2, 3]
    assert rows_b[2]["val_top1"] == rows_a[2]["val_top1"]
    assert without_timing(rows_b) == without_timing(rows_a)  # losses and lr too, bit for bit


def test_resume_is_bitwise_exact(synth, plain_run, tmp_path, monkeypatch):
    resumed = interrupted_then_resumed(synth, tmp_path / "b", monkeypatch)
    assert resumed == tmp_path / "b"
    assert_same_run(plain_run, resumed)


@pytest.mark.slow
def test_resume_is_bitwise_exact_with_workers(synth, tmp_path, monkeypatch):
    straight = run_train(synth, tmp_path / "a", epochs=3, seed=0, workers=2)
    resumed = interrupted_then_resumed(synth, tmp_path / "b", monkeypatch, workers=2)
    assert_same_run(straight, resumed)


def test_resume_with_more_epochs_continues(synth, tmp_path):
    run = run_train(synth, tmp_path / "run", epochs=1, steps_per_epoch=1)
    train(resume=str(run), epochs=2, console=quiet())
    assert [r["epoch"] for r in read_metrics(run)] == [1, 2]
    checkpoint = load_checkpoint(run / "last.pt")
    assert checkpoint["epoch"] == 2 and checkpoint["config"]["epochs"] == 2
    assert checkpoint["scheduler"]["last_epoch"] == 2


def test_resume_with_more_epochs_uses_the_new_schedule_from_the_first_step(synth, tmp_path, monkeypatch):
    run = run_train(synth, tmp_path / "run", epochs=2)  # 3 steps per epoch, 3 warmup steps: ends at lr 0
    assert read_metrics(run)[-1]["lr"] == 0.0
    original = Trainer.epoch
    first_step_lr = {}

    def record(trainer, epoch):
        first_step_lr[epoch] = trainer.optimizer.param_groups[0]["lr"]  # the lr of the epoch's first optimizer step
        return original(trainer, epoch)

    monkeypatch.setattr(Trainer, "epoch", record)
    train(resume=str(run), epochs=3, console=quiet())
    # The 9-step schedule at step 6: warmup 3, cosine progress (6 - 3) / (9 - 3) = 0.5, so half the peak lr.
    assert first_step_lr[3] == pytest.approx(0.5 * 1e-3 * 8 / 256)


def test_interrupt_while_saving_the_checkpoint_does_not_duplicate_metrics(synth, plain_run, tmp_path, monkeypatch):
    original = trainer_module.save_checkpoint
    calls = []

    def interrupted_write(path, state):
        calls.append(state["epoch"])
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C while epoch 2's last.pt is written: the old one (epoch 1) stays
        return original(path, state)

    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(trainer_module, "save_checkpoint", interrupted_write)
        with pytest.raises(KeyboardInterrupt):
            run_train(synth, out, epochs=3, seed=0)
    assert load_checkpoint(out / "last.pt")["epoch"] == 1
    train(resume=str(out), console=quiet())
    assert [r["epoch"] for r in read_metrics(out)] == [1, 2, 3]  # got [1, 2, 2, 3]
    assert without_timing(read_metrics(out)) == without_timing(read_metrics(plain_run))


# --- atomic checkpoint ------------------------------------------------------------------------


def test_failed_checkpoint_write_keeps_the_old_one(synth, tmp_path, monkeypatch):
    run = run_train(synth, tmp_path / "run", epochs=1, steps_per_epoch=1)
    path = run / "last.pt"
    before_bytes = path.read_bytes()
    before = load_checkpoint(path)
    changed = {**before, "model": {k: torch.zeros_like(v) for k, v in before["model"].items()}, "epoch": 99}

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"\x00garbage" * 4096)
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(imgrec.engine.checkpoint.torch, "save", full_disk)
        with pytest.raises(OSError, match="disk full"):
            save_checkpoint(path, changed)
    assert path.read_bytes() == before_bytes
    after = load_checkpoint(path)
    assert after["epoch"] == 1
    assert after["model"].keys() == before["model"].keys()
    assert all(torch.equal(after["model"][k], v) for k, v in before["model"].items())
    assert sorted(p.name for p in run.glob(".last.pt.tmp-*")) == []

    # The same call without the failure replaces the checkpoint (so the test above could have seen a change).
    save_checkpoint(path, changed)
    assert load_checkpoint(path)["epoch"] == 99
    assert sorted(p.name for p in run.iterdir() if ".tmp-" in p.name) == []


def test_the_writer_thread_writes_a_copy_the_outputs_first_and_no_checkpoint_after_a_failed_output(tmp_path) -> None:
    from imgrec.engine.checkpoint import BackgroundWriter

    writer, order = BackgroundWriter(), []
    weights = torch.ones(3)
    state = {"model": {"w": weights}, "epoch": 1}

    def save(path, saved):
        order.append("checkpoint")
        torch.save(saved, path)

    assert writer.write(tmp_path / "last.pt", state, save, before=lambda: order.append("outputs")) is None
    weights.add_(1)  # training goes on changing the tensors while the thread writes
    assert writer.wait() is None and order == ["outputs", "checkpoint"]
    assert torch.equal(torch.load(tmp_path / "last.pt")["model"]["w"], torch.ones(3))

    def full_disk():
        raise OSError(28, "No space left on device", str(tmp_path / "model.safetensors"))

    writer.write(tmp_path / "last.pt", {**state, "epoch": 2}, save, before=full_disk)
    failure = writer.wait()
    assert isinstance(failure, OSError) and failure.filename.endswith("model.safetensors")
    assert torch.load(tmp_path / "last.pt")["epoch"] == 1 and order == ["outputs", "checkpoint"]  # the checkpoint of epoch 1 stays


# --- EMA, freezing, accumulation, mixup -------------------------------------------------------


def test_ema_weights_in_checkpoint_and_model_json(ema_run):
    checkpoint = load_checkpoint(ema_run / "last.pt")
    model, ema = checkpoint["model"], checkpoint["ema"]
    assert isinstance(ema, dict) and ema.keys() == model.keys()
    assert any(v.is_floating_point() and not torch.equal(v, model[k]) for k, v in ema.items())
    assert all(ema[k].shape == v.shape for k, v in model.items())

    # model.json picks the best of model and EMA, the model on ties, the first epoch to reach it.
    best = {"top1": -1.0}
    for row in read_metrics(ema_run):
        source, top1 = max([("model", row["val_top1"]), ("ema", row["ema_top1"])], key=lambda c: c[1])
        if top1 > best["top1"]:
            best = {"top1": top1, "epoch": row["epoch"], "weights": source}
    info = json.loads((ema_run / "model.json").read_text(encoding="utf-8"))
    assert {k: info[k] for k in best} == best
    assert checkpoint["best"]["top1"] == best["top1"]


def test_freeze_backbone_trains_only_the_classifier(synth, tmp_path):
    torch.manual_seed(7)
    pretrained = {k: v.clone().contiguous() for k, v in timm.create_model("test_resnet", num_classes=3).state_dict().items()}
    weights = tmp_path / "pretrained.safetensors"
    safetensors.torch.save_file(pretrained, str(weights))

    run = run_train(synth, tmp_path / "run", epochs=2, freeze_backbone=True, pretrained=str(weights), lr=1e-2)
    trained = load_checkpoint(run / "last.pt")["model"]
    assert trained.keys() == pretrained.keys()
    head = {"fc.weight", "fc.bias"}
    frozen = [k for k in pretrained if k not in head]
    assert any("running_mean" in k for k in frozen) and any("running_var" in k for k in frozen)
    for key in frozen:
        assert torch.equal(trained[key], pretrained[key]), key
    assert not torch.equal(trained["fc.weight"], pretrained["fc.weight"])


def test_gradient_accumulation_steps(synth, tmp_path):
    run = run_train(synth, tmp_path / "accum", epochs=2, batch_size=4, accum_steps=2)
    assert load_checkpoint(run / "last.pt")["scheduler"]["last_epoch"] == 2 * (N_TRAIN // 4) // 2
    capped = run_train(synth, tmp_path / "capped", epochs=2, batch_size=4, accum_steps=2, steps_per_epoch=1)
    assert load_checkpoint(capped / "last.pt")["scheduler"]["last_epoch"] == 2 * 1


def test_mixup_and_cutmix_train(synth, tmp_path):
    run = run_train(synth, tmp_path / "run", epochs=1, mixup=0.2, cutmix=1.0)
    [row] = read_metrics(run)
    assert math.isfinite(row["train_loss"]) and row["train_loss"] > 0
    assert math.isfinite(row["val_loss"])


def test_mixup_needs_an_even_batch(synth, tmp_path):
    with pytest.raises(ValueError, match="even"):
        run_train(synth, tmp_path / "run", epochs=1, mixup=0.2, batch_size=7)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# --- optimiser and schedule -------------------------------------------------------------------


def test_param_groups_exclude_biases_and_norms_from_decay():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Linear(4, 2))
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert sorted(names[id(p)] for p in decay["params"]) == ["0.weight", "3.weight"]
    assert sorted(names[id(p)] for p in no_decay["params"]) == ["0.bias", "1.bias", "1.weight", "3.bias"]

    model[0].weight.requires_grad_(False)  # frozen parameters are left out
    groups = param_groups(model, 0.05)
    assert sorted(names[id(p)] for g in groups for p in g["params"]) == ["0.bias", "1.bias", "1.weight", "3.bias", "3.weight"]


def test_scaled_lr():
    assert scaled_lr("sgd", 512) == 0.2
    assert scaled_lr("adamw", 128) == 5e-4
    assert scaled_lr("adamw", 256, base_lr=4e-3) == 4e-3


def test_cosine_schedule_shape():
    base, min_lr, total, warmup = 0.1, 1e-3, 20, 4
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    scheduler = cosine_schedule(optimizer, total, warmup, min_lr)
    lrs = [optimizer.param_groups[0]["lr"]]  # lrs[i] is the lr of optimizer step i; lrs[total] the one after the last
    for _ in range(total):
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[:warmup] == pytest.approx([base * (i + 1) / (warmup + 1) for i in range(warmup)])
    rises = [b - a for a, b in itertools.pairwise(lrs[: warmup + 1])]
    assert rises == pytest.approx([base / (warmup + 1)] * warmup)  # linear, up to the peak
    assert lrs[warmup] == pytest.approx(base) and max(lrs) == pytest.approx(base)
    after = lrs[warmup:]
    assert all(b <= a for a, b in itertools.pairwise(after))
    assert after[1] < after[0]
    assert lrs[total] == pytest.approx(min_lr)
    assert min(lrs) >= min_lr - 1e-12


# --- hardware, output folder, tensorboard, bad files ------------------------------------------


def test_precision_and_device_resolution():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == ("bf16" if cpu_has_native_bf16() else "fp32")
    assert resolve_precision("fp32", cpu) == "fp32"
    with pytest.raises(ValueError, match="fp16"):
        resolve_precision("fp16", cpu)
    assert resolve_device("cpu") == cpu


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_a_gpu_is_refused():
    with pytest.raises(ValueError, match="no CUDA GPU"):
        resolve_device("cuda")


def test_unwritable_output_fails_before_training(synth, tmp_path, monkeypatch):
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    out = blocker / "run"

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the output folder was checked")

    monkeypatch.setattr(classify_module, "create_model", no_model)
    with pytest.raises(ValueError, match="output folder") as info:
        run_train(synth, out, epochs=1)
    assert str(out) in str(info.value)
    assert blocker.read_text() == "not a folder" and not out.exists()


def test_tensorboard_event_files(ema_run):
    events = list((ema_run / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) >= 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(ema_run / "tensorboard"))
    accumulator.Reload()
    rows = read_metrics(ema_run)
    top1 = accumulator.Scalars("val_top1")
    assert [e.step for e in top1] == [1, 2]
    assert [e.value for e in top1] == pytest.approx([r["val_top1"] for r in rows])
    assert {"train_loss", "val_loss", "lr", "ema_top1"} <= set(accumulator.Tags()["scalars"])


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_training_file_is_skipped_and_logged(synth, tmp_path, workers):
    data = tmp_path / "data"
    shutil.copytree(synth, data)
    broken = data / "train" / "square" / "broken.jpg"
    broken.write_bytes(b"\x13\x37 this is not a jpeg" * 20)
    console = Console(file=io.StringIO(), width=200)
    # 25 images in batches of 5: every image, the broken one too, is drawn in each of the 2 epochs.
    run = train(data=str(data), out=str(tmp_path / "run"), console=console, **{
        **COMMON, "epochs": 2, "batch_size": 5, "workers": workers, "data_config": {**DATA_CONFIG, "max_bad_fraction": 0.5},
    })  # fmt: skip
    assert [r["epoch"] for r in read_metrics(run)] == [1, 2]
    entries = [json.loads(line) for line in (run / "skipped.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [Path(e["path"]).resolve() for e in entries] == [broken.resolve()]
    assert entries[0]["reason"]
    assert "1 unreadable file(s) were skipped" in console.file.getvalue()


@pytest.mark.slow
def test_compiled_model_saves_plain_weights(synth, tmp_path):
    """--compile trains through torch.compile, but every file holds the unwrapped model's keys."""
    run = run_train(synth, tmp_path / "run", epochs=1, steps_per_epoch=2, compile=True)
    weights = safetensors.torch.load_file(str(run / "model.safetensors"))
    assert not any(key.startswith("_orig_mod.") for key in weights)
    assert set(load_checkpoint(run / "last.pt")["model"]) == set(weights)
    plain = timm.create_model("test_resnet", num_classes=3)
    plain.load_state_dict(weights)  # strict: loads into the uncompiled architecture


def test_yaml_style_numbers_are_read_as_numbers():
    config = TrainConfig(lr="1e-3", epochs="10")  # YAML 1.1 reads 1e-3 as a string
    assert config.lr == 1e-3 and config.epochs == 10
    with pytest.raises(ValueError, match="lr must be a number or 'auto' .*, got 'fast'"):
        TrainConfig(lr="fast")
    with pytest.raises(ValueError, match="epochs must be a whole number"):
        TrainConfig(epochs=2.5)


def test_resume_on_other_classes_is_refused_before_touching_the_run(synth, tmp_path):
    run = run_train(synth, tmp_path / "run", epochs=1)
    before = {name: (run / name).read_bytes() for name in ("classes.json", "config.yaml", "last.pt")}
    shutil.rmtree(synth.parent / "fewer", ignore_errors=True)
    fewer = shutil.copytree(synth, tmp_path / "fewer")
    for split in ("train", "val"):
        shutil.rmtree(fewer / split / "triangle")
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["data"] = str(fewer)
    checkpoint = load_checkpoint(run / "last.pt")
    checkpoint["config"]["data"] = str(fewer)
    save_checkpoint(run / "last.pt", checkpoint)
    before["last.pt"] = (run / "last.pt").read_bytes()
    with pytest.raises(ValueError, match="differ from those of the run"):
        train(resume=str(run), epochs=2, console=quiet())
    assert {name: (run / name).read_bytes() for name in before} == before


def test_a_new_run_refuses_an_out_that_holds_one(plain_run, synth):
    with pytest.raises(ValueError, match="already holds a training run"):
        run_train(synth, plain_run, epochs=1)


def test_bad_val_files_count_once_and_train_and_val_limits_are_separate(synth, tmp_path):
    """A bad val image is left out of validation (not replaced by its neighbour), and bad files of
    train/ do not count against val/'s limit although both share the run's skip log."""
    data = shutil.copytree(synth, tmp_path / "data")
    (data / "val" / "circle" / "broken.jpg").write_bytes(b"not an image")
    (data / "train" / "circle" / "broken.jpg").write_bytes(b"not an image either")
    (data / "train" / "square" / "broken.jpg").write_bytes(b"nor this")
    # 2 bad of 26 train (7.7%) and 1 bad of 13 val (7.7%): under a 10% limit each, 3 together would not be.
    run = run_train(data, tmp_path / "run", epochs=1, batch_size=13, data_config={**DATA_CONFIG, "max_bad_fraction": 0.1})
    logged = {Path(json.loads(line)["path"]).name for line in (run / "skipped.jsonl").read_text().splitlines()}
    assert logged == {"broken.jpg"} and len((run / "skipped.jsonl").read_text().splitlines()) == 3
    top1 = read_metrics(run)[0]["val_top1"]
    assert round(top1 * 12 / 100, 6).is_integer()  # a share of the 12 good val images, not of 13


# --- the trainer's step ---------------------------------------------------------------------------


def test_an_epoch_that_ends_mid_accumulation_leaves_no_stale_gradients(tmp_path) -> None:
    """Shards whose bad samples were skipped can run dry in the middle of an accumulation: the
    gradients of the unfinished step must not carry into the next epoch's first step."""
    from imgrec.config import TrainConfig
    from imgrec.engine.tasks.base import OptimizerSettings, Task
    from imgrec.engine.checkpoint import BackgroundWriter
    from imgrec.engine.trainer import EpochSums, LoopState, StopSignals

    class Linear(Task):
        def __init__(self, model):
            self.module, self.criterion = model, torch.nn.CrossEntropyLoss()

        def loss(self, batch, forward):
            inputs, targets = batch
            return self.criterion(forward(inputs), targets), inputs.shape[0]

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = iter([(torch.randn(3, 4), torch.tensor([0, 1, 0])) for _ in range(3)])  # 3 of the 4 planned micro-batches
    trainer = object.__new__(Trainer)  # the parts a step uses, without a dataset or a run folder
    trainer.config = TrainConfig(data="x", accum_steps=2, epochs=1, checkpoint_minutes=0)
    trainer.task, trainer.forward, trainer.device, trainer.console, trainer.out = Linear(model), model, torch.device("cpu"), quiet(), tmp_path
    trainer.settings, trainer.optimizer = OptimizerSettings("sgd"), optimizer
    trainer.scaler = torch.amp.GradScaler("cpu", enabled=False)
    trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    trainer.state, trainer.signals, trainer.steps_per_epoch, trainer.total_steps, trainer.must_agree_on_end = LoopState(), StopSignals(), 2, 2, False
    trainer.saver = BackgroundWriter()
    sums = EpochSums.resume({}, trainer.device)
    assert trainer.step(1, 1, batches, sums) is True
    assert trainer.step(1, 2, batches, sums) is False  # one batch, then the data ran out
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    assert (sums.batches, sums.images, trainer.state.step) == (2, 9, 1)
