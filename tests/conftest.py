"""Shared fixtures: tiny image folders built in tmp_path, including every odd file users have."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagefiles import photo, write_odd_files


@pytest.fixture
def odd_folder(tmp_path: Path) -> tuple[Path, set[str], set[str]]:
    """A dataset root with train/val classes, one class folder full of odd files."""
    root = tmp_path / "odd"
    good, bad = write_odd_files(root / "train" / "odd")
    for split in ("train", "val"):
        cls = root / split / "plain"
        cls.mkdir(parents=True)
        for i in range(3):
            photo(50, 40, 100 + i).save(cls / f"p{i}.jpg")
    (root / "val" / "odd").mkdir()
    photo(50, 40, 200).save(root / "val" / "odd" / "ok.jpg")
    return root, good, bad


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the module: the pretraining and probe tests run many tiny steps, which
    a second thread slows down on a busy 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_shapes(tmp_path_factory, one_thread) -> Path:
    """3 classes x (8 train + 4 val) synthetic shapes, 40-60 px, without clutter: read only."""
    from imgrec.data.synth import SynthSpec, write_synth_dataset

    spec = SynthSpec(classes=3, train_per_class=8, val_per_class=4, min_side=40, max_side=60, clutter=0.0)
    return write_synth_dataset(tmp_path_factory.mktemp("shapes") / "data", spec, workers=1)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """3 classes x (16 train + 5 val) synthetic shapes with clutter, 40-60 px: the fault and resume tests' data (read only)."""
    from imgrec.data.synth import SynthSpec, write_synth_dataset

    spec = SynthSpec(classes=3, train_per_class=16, val_per_class=5, seed=6, min_side=40, max_side=60)
    return write_synth_dataset(tmp_path_factory.mktemp("faults") / "data", spec, workers=1)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, one_thread) -> Path:
    """A model directory: test_resnet trained 2 epochs at 32 px on 3 synthetic classes (read only)."""
    from imgrec.data.synth import SynthSpec, write_synth_dataset
    from imgrec.engine.tasks.classify import train
    from runs import quiet

    root = tmp_path_factory.mktemp("export")
    data = write_synth_dataset(root / "data", SynthSpec(classes=3, train_per_class=24, val_per_class=12, seed=4, min_side=40, max_side=64), workers=1)
    return train(
        data=str(data), out=str(root / "run"), model="test_resnet", epochs=2, batch_size=8, device="cpu", precision="fp32",
        workers=0, tensorboard=False, data_config={"img_size": 32}, console=quiet(),
    )  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, one_thread) -> tuple[Path, Path]:
    """(model directory, dataset root): read only, shared by the module (copy it to change it)."""
    from serving import train_tiny_run

    root = tmp_path_factory.mktemp("serve")
    return train_tiny_run(root), root / "data"


@pytest.fixture(scope="module")
def classifier(tiny_run):
    """The tiny run's classifier, PyTorch fp32 on the CPU: the reference the server is checked against."""
    from imgrec.inference.predict import load

    return load(tiny_run[0], device="cpu", backend="eager")


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face Hub cache (tests/hubcache.py fills it), offline, for this process and its children."""
    from huggingface_hub import constants

    home = tmp_path / "hf"
    cache = home / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory) -> Path:
    """A resnet18 'training run' folder (random weights, a card with its own mean and std): a teacher."""
    import timm
    import torch

    from imgrec.card import ModelCard
    from imgrec.config import DataConfig
    from imgrec.models.directory import save_model_dir

    torch.manual_seed(7)
    model = timm.create_model("resnet18", num_classes=3)
    card = ModelCard("resnet18", DataConfig(img_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)), classes=["a", "b", "c"])
    out = tmp_path_factory.mktemp("teacher") / "run"
    out.mkdir()
    save_model_dir(out, {k: v.contiguous() for k, v in model.state_dict().items()}, card)
    return out
