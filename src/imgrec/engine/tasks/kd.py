"""Knowledge distillation into a classifier: ``imgrec train --teacher RUN_OR_NAME``.

A trained classifier (an ``imgrec train`` run, or hub weights of one, with the same classes)
is frozen and its logits of each training batch become soft targets for the model being
trained, usually a smaller architecture that will be deployed (Hinton et al., 2015). The loss:

    (1 - kd_weight) * cross-entropy(student, labels) + kd_weight * T^2 * KL(softmax(t / T) || softmax(s / T))

with T = ``kd_temperature`` (the T^2 keeps the term's gradients the size of the cross-entropy's).
``--unlabelled DIR`` adds images without labels to the training set: they count in the
distillation term only (the teacher labels them), the labelled ones in both. The teacher sees
the student's batch renormalised to its own mean and std and resized to its own input size, in
eval mode; it is not trained, not checkpointed (it is read again on resume and refused if its
SHA-256 changed) and not saved; the model card names it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from imgrec.config import DataConfig, TrainConfig
from imgrec.data.folder import iter_image_files
from imgrec.engine.tasks.base import Forward, RunContext
from imgrec.engine.tasks.classify import ClassifyTask
from imgrec.engine.tasks.distill import Renormalize, check_same_teacher, locate_teacher, teacher_data
from imgrec.hardware import autocast

UNLABELLED = -1  # the label of an --unlabelled image: cross-entropy ignores it


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), the mean over the rows, in float32."""
    log_p = F.log_softmax(student.float() / temperature, dim=-1)
    log_q = F.log_softmax(teacher.float() / temperature, dim=-1)
    return temperature**2 * (log_q.exp() * (log_q - log_p)).sum(dim=-1).mean()


class Resize(nn.Module):
    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] == self.size and images.shape[-2] == self.size:
            return images
        return F.interpolate(images, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)


def load_classifier_teacher(spec: str, student_data: DataConfig, classes: list[str]) -> tuple[nn.Module, dict[str, Any]]:
    """(the teacher: the student's normalised batch to its own preprocessing, then its logits; where
    its weights came from) for a run directory or hub weights of a classifier with ``classes``."""
    from imgrec.models.factory import WeightsError, create_model

    weights = locate_teacher(spec)
    card = weights.card
    if card is None or not card.classes:
        raise WeightsError(
            f"--teacher {spec}: distillation needs a trained classifier of your classes (an imgrec train run, or hub weights of one); "
            f"{'a bare weights file does not say its architecture or classes' if card is None else 'these weights have no classifier (a pretrained backbone)'}. "
            f"Train the teacher first: imgrec train --data DATA --pretrained NAME --out runs/teacher, then --teacher runs/teacher"
        )
    if list(card.classes) != list(classes):
        raise ValueError(
            f"--teacher {spec} was trained on {len(card.classes)} classes ({', '.join(card.classes[:5])}{', ...' if len(card.classes) > 5 else ''}), "
            f"not this data's {len(classes)} ({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''}): distil from a teacher trained on the same classes"
        )
    model = create_model(card.architecture, num_classes=len(card.classes), pretrained=weights, model_args=card.model_args or None)
    size = card.data_config.img_size if "img_size" in card.stated else student_data.img_size
    teacher = nn.Sequential(Renormalize(student_data, teacher_data(student_data, card)), Resize(size), model).eval()
    teacher.requires_grad_(False)
    return teacher, {**weights.source, "architecture": card.architecture}


class DistillClassifyTask(ClassifyTask):
    """Classification with a frozen teacher's soft targets (and, optionally, images without labels)."""

    @classmethod
    def check(cls, config: TrainConfig) -> None:
        from imgrec.models.factory import is_weights_name

        if not Path(config.teacher).exists() and not is_weights_name(config.teacher):
            raise ValueError(f"--teacher {config.teacher} does not exist: pass a run directory of imgrec train (a classifier of the same classes), or hub weights of one (hf-hub:ORG/REPO)")
        if config.unlabelled and (config.mixup or config.cutmix):
            raise ValueError("--unlabelled images have no label to mix: leave --mixup and --cutmix off with --unlabelled")
        if config.unlabelled and config.balance:
            raise ValueError("--balance weighs classes by their labelled images: leave it off with --unlabelled")

    def __init__(self, config: TrainConfig, run: RunContext):
        if config.teacher and run.checkpoint is None and Path(config.teacher).exists():  # a resume from elsewhere finds it again
            config = dataclasses.replace(config, teacher=str(Path(config.teacher).resolve()))
        super().__init__(config, run)
        teacher, self.teacher_source = load_classifier_teacher(self.config.teacher, self.data_config, list(self.classes))
        self.teacher = teacher.to(run.device, memory_format=torch.channels_last if run.channels_last else torch.preserve_format)
        ignore = dict(ignore_index=UNLABELLED) if self.config.unlabelled else {}
        self.criterion = torch.nn.CrossEntropyLoss(label_smoothing=self.config.label_smoothing, weight=self.class_weights(), **ignore)

    def load_data(self) -> None:
        super().load_data()
        if self.config.unlabelled:
            if not hasattr(self.train_set, "samples"):
                raise ValueError(f"--unlabelled adds image files to a folder dataset; {self.config.data} is read as shards")
            files = iter_image_files(self.config.unlabelled) if Path(self.config.unlabelled).is_dir() else []
            if not files:
                raise ValueError(f"--unlabelled {self.config.unlabelled}: no images there (a folder of image files, in any subfolders)")
            self.labelled_images = len(self.train_set.samples)
            self.train_set.samples.extend((str(path), UNLABELLED) for path in files)
            # The recipe (batch, rate) and the cache's memory plan count every image read; the class figures stay the labelled ones'.
            self.stats = dataclasses.replace(self.stats, images=len(self.train_set.samples))
            self.run.console.print(f"distillation: {len(files):,} unlabelled images from {self.config.unlabelled} join the {self.labelled_images:,} labelled ones", highlight=False)

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor], forward: Forward) -> tuple[torch.Tensor, int]:
        config = self.config
        inputs, targets = self.batch_inputs(batch)
        with autocast(self.run.device, self.run.precision):
            logits = forward(inputs)
            with torch.no_grad():
                teacher = self.teacher(inputs)
        distill = kd_loss(logits, teacher, config.kd_temperature)
        if config.unlabelled and self.mixup is None and not bool((targets != UNLABELLED).any()):  # (a host sync: only where there can be such batches)
            supervised = logits.float().sum() * 0  # a batch of unlabelled images only
        else:
            supervised = self.supervised_loss(logits, targets)
        return (1 - config.kd_weight) * supervised + config.kd_weight * distill, inputs.shape[0]

    def card(self):
        card = super().card()
        card.teacher = dict(self.teacher_source)
        return card

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "teacher_source": self.teacher_source}

    def load_state_dict(self, checkpoint: dict[str, Any]) -> None:
        check_same_teacher(self.config.teacher, checkpoint.get("teacher_source"), self.teacher_source)
        super().load_state_dict(checkpoint)

    def start_line(self, batch: str, lr: float) -> str:
        config = self.config
        return super().start_line(batch, lr) + f"; distilling {self.teacher_source.get('architecture')} ({config.teacher}), weight {config.kd_weight:g}, T {config.kd_temperature:g}"


__all__ = ["DistillClassifyTask", "kd_loss", "load_classifier_teacher"]
