"""BYOL (Grill et al., 2020): no negatives; an online network predicts a momentum teacher.

The online branch (backbone, projector, predictor) predicts the teacher's projection of the
other view; the teacher (backbone + projector) is an exponential moving average of the online
weights, its rate rising from 0.996 to 1 along a cosine over the run. Loss: 2 - 2 cos between
prediction and teacher projection, both ways. Recipe of the paper: asymmetric views (blur always
on the first, rarely on the second; solarisation only on the second), LARS at 0.2 x batch / 256,
weight decay 1.5e-6, 4096-wide heads projecting to 256.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from imgrec.data.views import ViewSpec
from imgrec.engine.tasks.ssl import MomentumTeacherMethod, mlp

BYOL_VIEWS = (
    ViewSpec(jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, greyscale_p=0.2, blur_p=1.0, solarize_p=0.0),
    ViewSpec(jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, greyscale_p=0.2, blur_p=0.1, solarize_p=0.2),
)


class BYOL(MomentumTeacherMethod):
    name = "byol"
    title = "BYOL"
    optimizer = "lars"
    base_lr = 0.2
    weight_decay = 1.5e-6
    proj_hidden_dim = 4096
    proj_dim = 256
    teacher_momentum = 0.996
    views = BYOL_VIEWS

    def __init__(self, backbone: nn.Module, *, proj_hidden_dim: int | None = None, proj_dim: int | None = None, teacher_momentum: float | None = None):
        super().__init__(backbone)
        hidden, out = proj_hidden_dim or self.proj_hidden_dim, proj_dim or self.proj_dim
        self.projector = mlp(self.feature_dim, hidden, out)
        self.predictor = mlp(out, hidden, out)
        self.init_teacher(teacher_momentum)

    def pair_loss(self, predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return regression_loss(predictions, targets)  # summed both ways: the paper's loss, 0 to 8


def regression_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """2 - 2 cos(prediction, target), the mean over the batch: the squared distance of unit vectors."""
    return (2 - 2 * F.cosine_similarity(prediction, target.detach(), dim=-1)).mean()


__all__ = ["BYOL", "regression_loss"]
