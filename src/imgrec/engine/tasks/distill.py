"""Feature distillation: a student backbone learns a frozen teacher's embeddings of unlabelled images.

The teacher is any network with weights (a timm tag or ``hf-hub:`` name, an ``imgrec pretrain``
or ``imgrec train`` run): its pooled features of each view are the targets, and the student's
pooled features, through a linear projection where the widths differ, are pulled towards them
by 2 - 2 cos (BYOL's regression loss), averaged over the views. The usual way to put what a
large pretrained model knows into the small one that will be deployed, on the user's own
images. The teacher keeps its batch-norm statistics (eval mode) and sees each view normalised
by its own mean and std. Views: BYOL's two, the crop range of the run.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from imgrec.config import DataConfig
from imgrec.engine.tasks.byol import BYOL_VIEWS, regression_loss
from imgrec.engine.tasks.ssl import SSLMethod, frozen_copy, pooled_width


class Renormalize(nn.Module):
    """Images normalised by (mean_a, std_a) to the same images normalised by (mean_b, std_b)."""

    scale: torch.Tensor
    shift: torch.Tensor

    def __init__(self, source: DataConfig, target: DataConfig):
        super().__init__()
        mean_a, std_a, mean_b, std_b = (
            torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in (source.mean, source.std, target.mean, target.std)
        )
        self.register_buffer("scale", std_a / std_b)
        self.register_buffer("shift", (mean_a - mean_b) / std_b)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images * self.scale.to(images.dtype) + self.shift.to(images.dtype)


class Distill(SSLMethod):
    name = "distill"
    optimizer = "lars"  # at large batches; the recipe picks AdamW at small ones, as for the other methods
    base_lr = 0.2
    weight_decay = 1.5e-6
    proj_hidden_dim = 0  # unused: the projection is one linear layer
    proj_dim = 0  # the teacher's width
    views = BYOL_VIEWS
    needs_teacher = True

    def __init__(self, backbone: nn.Module, *, teacher: nn.Module, teacher_dim: int):
        super().__init__(backbone)
        self.teacher = frozen_copy(teacher).eval()
        self.teacher_dim = int(teacher_dim)
        self.projector = nn.Linear(self.feature_dim, self.teacher_dim) if self.teacher_dim != self.feature_dim else nn.Identity()
        # The teacher is read again from its source when a run resumes (the run checks its SHA-256):
        # state dicts leave its weights out (they may be far larger than the student's), at any
        # depth of wrapping, and loading puts the live teacher's back.
        self.register_state_dict_post_hook(_drop_teacher)
        self.register_load_state_dict_pre_hook(_keep_teacher)

    def train(self, mode: bool = True) -> Distill:
        super().train(mode)
        self.teacher.eval()  # the teacher's batch-norm statistics are part of what it knows
        return self

    def forward(self, images: torch.Tensor, num_views: int = 2) -> torch.Tensor:
        student = self.projector(self.backbone(images)).float()
        with torch.no_grad():
            target = self.teacher(images).float()
        return distill_loss(student, target)


def _drop_teacher(module: Distill, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    for key in [k for k in state if k.startswith(prefix + "teacher.")]:
        del state[key]


def _keep_teacher(module: Distill, state: dict[str, Any], prefix: str, *args: Any) -> None:
    for key, value in module.teacher.state_dict().items():
        state.setdefault(f"{prefix}teacher.{key}", value)


def distill_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """2 - 2 cos(student[i], teacher[i]), the mean over the rows (every view of every image)."""
    return regression_loss(student, teacher)


def locate_teacher(spec: str) -> Any:
    """The weights ``--teacher spec`` names (a run, a file, hub weights), errors prefixed with the flag."""
    from imgrec.models.factory import WeightsError, locate_weights

    try:
        return locate_weights(spec)
    except WeightsError as exc:
        raise WeightsError(f"--teacher: {exc}") from None


def teacher_data(student_data: DataConfig, card: Any) -> DataConfig:
    """The student's preprocessing with the teacher's mean and std, where its card states them."""
    return dataclasses.replace(student_data, **{k: getattr(card.data_config, k) for k in ("mean", "std") if k in card.stated})


def check_same_teacher(spec: str, recorded: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse to resume with another teacher than the run's checkpoint ``recorded`` (SHA-256 of the weights)."""
    recorded = dict(recorded or {})
    if recorded.get("sha256") != current.get("sha256"):
        raise ValueError(
            f"the teacher {spec} is not the one this run started with (SHA-256 {current.get('sha256', '-')[:12]}, "
            f"recorded {recorded.get('sha256', '-')[:12]}): put its weights back ({recorded.get('file', '?')}) to resume exactly"
        )


def load_teacher(spec: str, student_data: DataConfig) -> tuple[nn.Module, int, dict[str, Any]]:
    """(the teacher: its input renormalised from the student's preprocessing to its own, then its
    pooled features; its width; where its weights came from) for a weights name or a run."""
    from imgrec.models.factory import WeightsError, create_model

    weights = locate_teacher(spec)
    if weights.card is None:
        raise WeightsError(
            f"--teacher {spec}: a bare weights file does not say its architecture: pass a run directory "
            f"(imgrec train or imgrec pretrain) or a weights name (a timm tag such as resnet50.a1_in1k, or hf-hub:ORG/REPO)"
        )
    card = weights.card
    model = create_model(card.architecture, num_classes=0, pretrained=weights, model_args=card.model_args or None)
    teacher = nn.Sequential(Renormalize(student_data, teacher_data(student_data, card)), model)
    source = {**weights.source, "architecture": card.architecture}
    return teacher, pooled_width(model), source


__all__ = ["Distill", "Renormalize", "check_same_teacher", "distill_loss", "load_teacher", "locate_teacher", "teacher_data"]
