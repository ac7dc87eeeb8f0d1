"""``imgrec train --teacher``: the distillation loss against a hand computation, a student that
moves towards its teacher's answers (with and without labels, with unlabelled images), the
teacher kept out of the checkpoint and named in the card, and the mistakes refused."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from imgrec.engine.tasks.kd import kd_loss
from runs import quiet


def test_kd_loss_matches_a_hand_computation() -> None:
    student = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])
    teacher = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    T = 2.0
    expected = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        zs = sum(math.exp(v / T) for v in s_row)
        zt = sum(math.exp(v / T) for v in t_row)
        p = [math.exp(v / T) / zs for v in s_row]
        q = [math.exp(v / T) / zt for v in t_row]
        expected += sum(qi * math.log(qi / pi) for qi, pi in zip(q, p))
    expected = T * T * expected / 2
    assert kd_loss(student, teacher, T).item() == pytest.approx(expected, rel=1e-5)  # float32
    assert kd_loss(teacher, teacher, T).item() == pytest.approx(0.0, abs=1e-7)  # nothing to learn from itself
    # Its gradient in the student's logits: T (softmax(s / T) - softmax(t / T)) / rows.
    logits = student.clone().requires_grad_(True)
    kd_loss(logits, teacher, T).backward()
    expected_grad = T * (torch.softmax(student / T, dim=-1) - torch.softmax(teacher / T, dim=-1)) / 2
    torch.testing.assert_close(logits.grad, expected_grad, rtol=1e-5, atol=1e-6)


def student_teacher_kl(student_run: Path | None, teacher_run: Path, images: torch.Tensor, seed: int = 0) -> float:
    """KL(teacher || student) at T = 1 on ``images``: the student's trained weights, or (None) a fresh init."""
    from imgrec.models.directory import load_model_dir
    from imgrec.models.factory import create_model

    teacher, card = load_model_dir(teacher_run)
    if student_run is None:
        torch.manual_seed(seed)
        student = create_model("test_resnet", num_classes=card.num_classes).eval()
    else:  # the last epoch's weights (the model directory holds the best val top-1's, which a teacher of noise does not order)
        from imgrec.engine.checkpoint import load_checkpoint

        student = create_model("test_resnet", num_classes=card.num_classes).eval()
        student.load_state_dict(load_checkpoint(student_run / "last.pt")["model"])
    with torch.no_grad():
        return kd_loss(student(images), teacher(images), 1.0).item()


def train_batch(run_dir: Path) -> torch.Tensor:
    from imgrec.card import ModelCard
    from imgrec.inference.export import preprocess

    files = sorted((run_dir.parent / "data" / "train").rglob("*.jpg"))
    return preprocess(ModelCard.read(run_dir), files)


@pytest.fixture(scope="module")
def confident_teacher(run_dir, tmp_path_factory) -> Path:
    """The run_dir model with its classifier's logits scaled x20: answers far from uniform, which
    a fresh student does not give (the 2-epoch model alone is close to uniform everywhere)."""
    from safetensors.torch import load_file, save_file

    teacher = tmp_path_factory.mktemp("kd") / "teacher"
    shutil.copytree(run_dir, teacher)
    weights = load_file(str(teacher / "model.safetensors"))
    save_file({k: v * 20 if k.startswith("fc.") else v for k, v in weights.items()}, str(teacher / "model.safetensors"))
    return teacher


@pytest.fixture(scope="module")
def student(run_dir, confident_teacher, tmp_path_factory) -> Path:
    """test_resnet distilled from the confident teacher with the labels unused (kd_weight 1), 10 epochs."""
    from imgrec.engine.tasks.classify import train

    out = tmp_path_factory.mktemp("kd") / "student"
    return train(
        data=str(run_dir.parent / "data"), out=str(out), model="test_resnet", teacher=str(confident_teacher), kd_weight=1.0, kd_temperature=1.0,
        epochs=10, batch_size=8, device="cpu", precision="fp32", workers=0, tensorboard=False, console=quiet(),
        base_lr=1e-2, warmup_epochs=0.0, ema_decay=0.0, data_config={"img_size": 32, "scale": (1.0, 1.0), "hflip": 0.0},
    )  # fmt: skip


def test_a_student_learns_its_teachers_answers(run_dir, confident_teacher, student) -> None:
    images = train_batch(run_dir)  # the images it learnt from
    before = student_teacher_kl(None, confident_teacher, images)
    after = student_teacher_kl(student, confident_teacher, images)
    assert after < 0.5 * before, (before, after)


def test_the_card_names_the_teacher_and_the_checkpoint_leaves_it_out(confident_teacher, student) -> None:
    from imgrec.engine.checkpoint import load_checkpoint
    from imgrec.utils import file_sha256

    card = json.loads((student / "model.json").read_text())
    assert card["teacher"]["architecture"] == "test_resnet"
    assert card["teacher"]["sha256"] == file_sha256(confident_teacher / "model.safetensors")
    checkpoint = load_checkpoint(student / "last.pt")
    from safetensors.torch import load_file

    assert set(checkpoint["model"]) == set(load_file(str(student / "model.safetensors")))  # the student alone
    assert [key for key in checkpoint if "teacher" in key] == ["teacher_source"] and "sha256" in checkpoint["teacher_source"]  # its source, not its weights


def test_unlabelled_images_join_and_only_the_teacher_labels_them(run_dir, tmp_path) -> None:
    from imgrec.engine.tasks.classify import train
    from imgrec.engine.tasks.kd import UNLABELLED

    unlabelled = tmp_path / "unlabelled"
    unlabelled.mkdir()
    for i, path in enumerate(sorted((run_dir.parent / "data" / "val").rglob("*.jpg"))[:10]):
        shutil.copy(path, unlabelled / f"{i}.jpg")
    console = quiet()
    captured = {}
    from imgrec.engine.tasks import kd

    original = kd.DistillClassifyTask.loss

    def spy(self, batch, forward):
        captured.setdefault("labels", []).extend(batch[1].tolist())
        if (batch[1] == UNLABELLED).all():
            captured["all_unlabelled_loss"] = True
        loss, count = original(self, batch, forward)
        assert torch.isfinite(loss)
        return loss, count

    kd.DistillClassifyTask.loss = spy
    try:
        train(
            data=str(run_dir.parent / "data"), out=str(tmp_path / "run"), model="test_resnet", teacher=str(run_dir), unlabelled=str(unlabelled),
            epochs=1, batch_size=8, device="cpu", precision="fp32", workers=0, tensorboard=False, console=console, data_config={"img_size": 32},
        )  # fmt: skip
    finally:
        kd.DistillClassifyTask.loss = original
    assert "10 unlabelled images" in console.file.getvalue()
    assert len(captured["labels"]) == (72 + 10) // 8 * 8  # an epoch of full batches over both
    assert 8 <= captured["labels"].count(UNLABELLED) <= 10


def test_a_batch_without_labels_is_the_distillation_term_alone(run_dir, tmp_path) -> None:
    """With every label unknown the loss is kd_weight x the KD term (no cross-entropy, no NaN)."""
    from imgrec.engine.tasks.kd import UNLABELLED, DistillClassifyTask

    task = object.__new__(DistillClassifyTask)  # the loss alone: no data, no teacher loading
    from types import SimpleNamespace

    from imgrec.models.directory import load_model_dir

    teacher, _ = load_model_dir(run_dir)
    student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 3))
    task.run = SimpleNamespace(device=torch.device("cpu"), precision="fp32")
    task.config = SimpleNamespace(kd_temperature=2.0, kd_weight=0.25, unlabelled="some folder")
    task.train_normalize = torch.nn.Identity()
    task.mixup = None
    task.teacher = teacher
    task.criterion = torch.nn.CrossEntropyLoss(ignore_index=UNLABELLED)
    images = torch.randn(4, 3, 32, 32)
    loss, count = task.loss((images, torch.full((4,), UNLABELLED)), student)
    with torch.no_grad():
        expected = 0.25 * kd_loss(student(images), teacher(images), 2.0)
    assert count == 4 and loss.item() == pytest.approx(expected.item(), rel=1e-5)
    labels = torch.tensor([0, UNLABELLED, 2, UNLABELLED])
    loss, _ = task.loss((images, labels), student)
    with torch.no_grad():
        logits = student(images)
        ce = torch.nn.functional.cross_entropy(logits[[0, 2]], torch.tensor([0, 2]))
        expected = 0.75 * ce + 0.25 * kd_loss(logits, teacher(images), 2.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_teacher_mistakes_are_refused(run_dir, tmp_path) -> None:
    from imgrec.engine.tasks.classify import train

    data = str(run_dir.parent / "data")
    common = dict(data=data, model="test_resnet", epochs=1, batch_size=8, device="cpu", workers=0, tensorboard=False, console=quiet())
    with pytest.raises(ValueError, match="--unlabelled images are learnt from a teacher"):
        train(out=str(tmp_path / "a"), unlabelled=str(tmp_path), **common)
    with pytest.raises(ValueError, match="--kd-weight 0.8 set the distillation term, which needs a teacher"):
        train(out=str(tmp_path / "a"), kd_weight=0.8, **common)
    with pytest.raises(ValueError, match="--kd-temperature 4 set the distillation term"):
        train(out=str(tmp_path / "a"), kd_temperature=4.0, **common)
    other = tmp_path / "other_classes"
    shutil.copytree(run_dir, other)
    card = json.loads((other / "model.json").read_text())
    card["classes"] = ["x", "y", "z"]
    (other / "model.json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match="trained on 3 classes .* not this data's 3"):
        train(out=str(tmp_path / "b"), teacher=str(other), **common)
    bare = tmp_path / "bare.safetensors"
    shutil.copy(run_dir / "model.safetensors", bare)
    with pytest.raises(ValueError, match="a bare weights file does not say"):
        train(out=str(tmp_path / "c"), teacher=str(bare), **common)


def test_a_changed_teacher_is_refused_on_resume(run_dir, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    from imgrec.engine.tasks.classify import train

    teacher = tmp_path / "teacher"
    shutil.copytree(run_dir, teacher)
    out = tmp_path / "run"
    train(
        data=str(run_dir.parent / "data"), out=str(out), model="test_resnet", teacher=str(teacher), epochs=1, batch_size=8,
        device="cpu", workers=0, tensorboard=False, console=quiet(), data_config={"img_size": 32},
    )  # fmt: skip
    weights = load_file(str(teacher / "model.safetensors"))
    save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in weights.items()}, str(teacher / "model.safetensors"))
    with pytest.raises(ValueError, match="is not the one this run started with"):
        train(resume=str(out), epochs=2, console=quiet())


def test_the_teacher_sees_the_batch_at_its_own_size_and_normalisation(run_dir) -> None:
    import dataclasses

    import torch.nn.functional as F

    from imgrec.card import ModelCard
    from imgrec.engine.tasks.kd import load_classifier_teacher
    from imgrec.models.directory import load_model_dir

    card = ModelCard.read(run_dir)
    student_data = dataclasses.replace(card.data_config, img_size=48, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    teacher, source = load_classifier_teacher(str(run_dir), student_data, list(card.classes))
    model, _ = load_model_dir(run_dir)
    pixels = torch.rand(2, 3, 48, 48)
    as_student = (pixels - 0.5) / 0.25
    mean, std = torch.tensor(card.data_config.mean).view(1, 3, 1, 1), torch.tensor(card.data_config.std).view(1, 3, 1, 1)
    as_teacher = F.interpolate((pixels - mean) / std, size=(card.img_size, card.img_size), mode="bilinear", align_corners=False, antialias=True)
    with torch.no_grad():
        torch.testing.assert_close(teacher(as_student), model(as_teacher), rtol=1e-4, atol=1e-4)
    assert source["architecture"] == card.architecture and not any(p.requires_grad for p in teacher.parameters())
