"""Imbalanced classes: the run says how imbalanced they are; --balance sampler draws each class
equally often (seeded, resumable), --balance loss weights each class's loss by its rarity."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest

from imgrec.data.sampler import EpochSampler, class_balanced_weights
from imgrec.data.stats import DataStats
from imgrec.engine.tasks.classify import balance_line

LABELS = [0] * 90 + [1] * 9 + [2] * 3  # 30x between the largest and the smallest class


def test_the_balanced_sampler_draws_each_class_equally_often():
    sampler = EpochSampler(len(LABELS), seed=3, weights=class_balanced_weights(LABELS))
    drawn = Counter()
    for epoch in range(60):
        sampler.set_epoch(epoch)
        drawn.update(LABELS[i] for i in sampler)
    total = sum(drawn.values())
    assert total == 60 * len(LABELS)
    for label in (0, 1, 2):
        assert drawn[label] / total == pytest.approx(1 / 3, abs=0.03)
    # Without weights the epoch is a permutation: the classes as they are.
    plain = EpochSampler(len(LABELS), seed=3)
    assert sorted(plain) == list(range(len(LABELS)))


def test_a_balanced_epoch_is_fixed_by_seed_and_epoch_and_resumes_where_it_stopped():
    weights = class_balanced_weights(LABELS)
    a, b = EpochSampler(len(LABELS), seed=1, weights=weights), EpochSampler(len(LABELS), seed=1, weights=weights)
    a.set_epoch(4)
    b.set_epoch(4)
    full = list(a)
    b.skip(40)
    assert list(b) == full[40:]
    a.set_epoch(5)
    assert list(a) != full


def test_the_run_states_the_imbalance_and_the_remedy():
    stats = DataStats(images=102, classes=3, smallest_class=3, largest_class=90, short_side=32, long_side=32, grey=0.0)
    assert "3 to 90 training images each (30.0x); imbalanced: --balance sampler or --balance loss" in balance_line(stats, None)
    assert "each class is drawn equally often" in balance_line(stats, "sampler")
    even = DataStats(images=100, classes=2, smallest_class=50, largest_class=50, short_side=32, long_side=32, grey=0.0)
    assert balance_line(even, None).endswith("(1.0x)")


@pytest.fixture(scope="module")
def imbalanced(tiny_shapes, tmp_path_factory) -> Path:
    """The tiny shapes with one class cut to 2 training images (8, 8, 2)."""
    root = tmp_path_factory.mktemp("imbalanced") / "data"
    shutil.copytree(tiny_shapes, root)
    rare = sorted((root / "train").iterdir())[0]
    for extra in sorted(rare.iterdir())[2:]:
        extra.unlink()
    return root


@pytest.mark.parametrize("balance", ["sampler", "loss"])
def test_training_with_balance(imbalanced, tmp_path, balance):
    import torch
    from rich.console import Console

    from imgrec.engine.tasks.classify import ClassifyTask
    from imgrec.engine.trainer import Trainer, start_or_resume

    out = tmp_path / balance
    config, _ = start_or_resume(ClassifyTask, None, None, dict(data=str(imbalanced), model="test_resnet", data_config={"img_size": 32}, batch_size=6, epochs=1, out=str(out), balance=balance))
    trainer = Trainer(ClassifyTask, config, Console(quiet=True))
    task = trainer.task
    if balance == "loss":
        assert torch.allclose(task.criterion.weight, torch.tensor([18 / (3 * 2), 18 / (3 * 8), 18 / (3 * 8)]))
    else:
        assert task.criterion.weight is None
        loader = trainer.train_loader
        drawn = Counter()
        for epoch in range(1, 31):
            loader.sampler.set_epoch(epoch)
            drawn.update(task.train_set.samples[i][1] for i in loader.sampler)
        assert drawn[0] / sum(drawn.values()) == pytest.approx(1 / 3, abs=0.06)  # 2 of 18 images, a third of the draws
    trainer.fit()
    assert (out / "model.safetensors").is_file()
