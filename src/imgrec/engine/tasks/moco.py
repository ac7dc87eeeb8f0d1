"""MoCo v3 (Chen, Xie and He, 2021): contrastive, with a momentum teacher for the keys.

The online branch (backbone, projector, predictor) embeds one view as a query; the teacher
(backbone + projector, an exponential moving average of the online weights whose rate rises
from 0.99 to 1 along a cosine) embeds the other view as the key. Each query's key is its
positive and every other key of the global batch (all ranks) a negative: InfoNCE both ways,
scaled by 2 x temperature as in the paper's code. Recipe of its ResNet-50 runs: BYOL's
asymmetric views, LARS at 0.6 x batch / 256, weight decay 1e-6, a 2-layer projector ending in
batch norm and a 2-layer predictor, 4096 wide, to 256; temperature 1.0 (0.2 for ViTs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from imgrec.engine.tasks.byol import BYOL_VIEWS
from imgrec.engine.tasks.ssl import MomentumTeacherMethod, gather_across_ranks, mlp


class MoCoV3(MomentumTeacherMethod):
    name = "moco"
    title = "MoCo v3"
    optimizer = "lars"
    base_lr = 0.6
    weight_decay = 1e-6
    proj_hidden_dim = 4096
    proj_dim = 256
    temperature = 1.0
    teacher_momentum = 0.99
    views = BYOL_VIEWS

    def __init__(
        self,
        backbone: nn.Module,
        *,
        proj_hidden_dim: int | None = None,
        proj_dim: int | None = None,
        temperature: float | None = None,
        teacher_momentum: float | None = None,
    ):
        super().__init__(backbone)
        hidden, out = proj_hidden_dim or self.proj_hidden_dim, proj_dim or self.proj_dim
        self.projector = mlp(self.feature_dim, hidden, out, last_norm=True)  # the ResNet heads (3 and 2 layers are for ViTs)
        self.predictor = mlp(out, hidden, out)
        self.temperature = temperature if temperature is not None else type(self).temperature
        self.init_teacher(teacher_momentum)

    def pair_loss(self, predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return info_nce(predictions, targets, self.temperature)  # queries against the teacher's keys


def info_nce(queries: torch.Tensor, keys: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cross-entropy of each query against all keys of the global batch, its own key the answer,
    times 2 x temperature (MoCo v3's scaling); in float32 even under autocast."""
    with torch.autocast(queries.device.type, enabled=False):
        q, k = F.normalize(queries.float(), dim=1), F.normalize(keys.detach().float(), dim=1)
        all_keys, rank = gather_across_ranks(k)
        logits = q @ all_keys.T / temperature
        labels = torch.arange(q.shape[0], device=q.device) + rank * q.shape[0]
        return F.cross_entropy(logits, labels) * (2 * temperature)


__all__ = ["MoCoV3", "info_nce"]
